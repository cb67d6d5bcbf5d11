"""EMA teacher update: asa3d's ``models.ema.ema_update_`` (``_foreach_mul_`` + ``_foreach_add_``)
against PyTorch's own helpers on the same SwinUNETR parameters, measured in one run.

- ``torch._foreach_lerp_(teacher, student, 1 - m)``: one fused pass, t + (1 - m) (s - t);
- ``torch.optim.swa_utils.get_ema_multi_avg_fn`` (what ``AveragedModel(multi_avg_fn=...)`` calls
  per update: the same ``_foreach_lerp_`` behind a wrapper);
- a plain per-tensor python loop (``t.mul_(m).add_(s, alpha=1-m)``), for scale.

The variants run interleaved (one update of each per round, ``--repeats`` rounds) and the medians
are compared, so a machine shared with other jobs slows them alike. Each line also says whether
the variant's result is bit-identical to ``ema_update_``'s (the lerp rounds differently, which is
what moves ASA's golden run, tests/test_asa_golden.py; see models/ema.py).

    PYTHONPATH=src python benchmarks/ema_update.py [--feature-size 48] [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def main() -> None:
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from asa3d.config_sections import ModelConfig
    from asa3d.models.backbones.swinunetr import swinunetr_spec
    from asa3d.models.ema import ema_update_

    ap = argparse.ArgumentParser()
    ap.add_argument("--feature-size", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    net = swinunetr_spec(ModelConfig(feature_size=args.feature_size), 1).build().to(dev)
    gen = torch.Generator().manual_seed(0)
    start = [p.detach().clone() for p in net.parameters()]
    student = [p + 0.01 * torch.randn(p.shape, generator=gen).to(dev) for p in start]
    n = sum(p.numel() for p in student)
    m = 0.996
    swa = get_ema_multi_avg_fn(m)
    steps = torch.zeros((), dtype=torch.long)

    def loop(teacher: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(teacher, student, strict=True):
                t.mul_(m).add_(s, alpha=1 - m)

    variants: dict[str, Callable[[list[torch.Tensor]], None]] = {
        "asa3d ema_update_": lambda t: ema_update_(t, student, m),
        "torch._foreach_lerp_": lambda t: torch._foreach_lerp_(t, student, 1 - m),
        "swa_utils ema": lambda t: swa(t, student, steps),
        "python loop": loop,
    }
    teachers = {name: [p.clone() for p in start] for name in variants}
    for name, fn in variants.items():  # warm-up, and one update on equal inputs for the bit check
        fn(teachers[name])
    ref = teachers["asa3d ema_update_"]
    identical = {
        name: all(torch.equal(a, b) for a, b in zip(t, ref, strict=True)) for name, t in teachers.items()
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn(teachers[name])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"SwinUNETR feature_size {args.feature_size}: {len(student)} tensors, {n / 1e6:.1f} M parameters, "
        f"{args.device}, {args.threads} thread(s); medians of {args.repeats} interleaved updates"
    )
    base = med["asa3d ema_update_"]
    for name, sec in med.items():
        same = "bit-identical" if identical[name] else "differs in the last bits"
        print(f"  {name:22s} {sec * 1e3:8.2f} ms  {sec / base:5.2f}x asa3d  ({same})")


if __name__ == "__main__":
    main()

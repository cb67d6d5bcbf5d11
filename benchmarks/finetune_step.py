"""What asa3d adds around the network when fine-tuning and predicting, measured in one run.

1. **A fine-tuning iteration** through the real code path, ``asa3d.eval.finetune.run_finetune``
   (crops read from the on-disk cache by its DataLoader, seeded augmentation, autocast, the shared
   optimisation step with its finite check and gradient norm, the LR schedule, TensorBoard +
   metrics.jsonl logging and the progress bar), against a bare loop written with MONAI and
   PyTorch alone on the same network, crop size, loss and cached volumes: a MONAI ``Dataset`` of
   the same cached arrays in memory, MONAI's ``SpatialPadd`` / ``RandSpatialCropd`` / ``RandFlipd`` /
   ``RandRotate90d`` / ``RandShiftIntensityd`` in the DataLoader workers, ``torch.autocast``,
   ``zero_grad`` / ``backward`` / ``step`` / ``LambdaLR``, a ``SummaryWriter`` scalar per
   iteration. Both create their DataLoader once per pass over the cases (MONAI's tutorial loop).
2. **One sliding-window prediction of a case** through asa3d's inference (``predict_volume``:
   the label map that fine-tuning scores and ``asa3d predict`` resamples) against a bare
   ``monai.inferers.sliding_window_inference`` call followed by the same argmax.

The two sides alternate (``--repeats`` rounds, the first side swapped each round) and the
medians are compared. An iteration is the time between two consecutive optimisation steps (so it
holds the data wait, the augmentation, the logging and the step); the first ``--warmup`` of each
run are left out, and asa3d's last one (the final checkpoint) is never counted. Each is measured
as wall time and, on a CPU, as the CPU time of the training process (all its threads, not the
DataLoader workers): on a machine shared with other jobs the wall time follows their load, the
CPU time is the work done, so there the CPU-time ratio is the one to read (one compute thread by
default: idle OpenMP threads spin, which counts as CPU time under contention). The data wait is
the wall time spent in the DataLoader's ``next()`` (the step waiting for a batch); its share of
the iteration is printed for both loops.

    PYTHONPATH=src python benchmarks/finetune_step.py          # CPU: SwinUNETR-12, 64^3, ~5 min
    PYTHONPATH=src python benchmarks/finetune_step.py --device cuda --feature-size 48 --crop 96 \
        --shape 192 192 160 --spacing 2 2 2 --precision bf16 --workers 4 --threads 0   # a GPU

Target: both ratios <= 1.05x, and a data wait near 0 % (the loader keeps ahead of the step).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ---- instrumentation of the real fine-tuning loop -------------------------------------------------

Stamp = tuple[float, float]  # (wall, CPU time of this process: every thread, no worker process)


def _stamp() -> Stamp:
    return time.perf_counter(), time.process_time()


class _Clock:
    """Stamps of every optimisation step's start and the DataLoader ``next()`` waits."""

    def __init__(self) -> None:
        self.step_starts: list[Stamp] = []
        self.waits: list[tuple[float, float]] = []  # (wall start, wall seconds)


class _TimedIter:
    def __init__(self, it: Iterator[Any], clock: _Clock) -> None:
        self.it, self.clock = it, clock

    def __iter__(self) -> _TimedIter:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.clock.waits.append((t0, time.perf_counter() - t0))


@contextlib.contextmanager
def instrumented(clock: _Clock) -> Iterator[None]:
    """Stamp step starts (wrapping ``optimisation_step`` where fine-tuning looks it up) and
    DataLoader waits (wrapping ``DataLoader.__iter__``); everything else runs unchanged."""
    import asa3d.eval.finetune as ft

    real_step = ft.optimisation_step
    real_iter = torch.utils.data.DataLoader.__iter__

    def step(*args: Any, **kwargs: Any) -> Any:
        clock.step_starts.append(_stamp())
        return real_step(*args, **kwargs)

    def loader_iter(self: torch.utils.data.DataLoader) -> Iterator[Any]:
        return _TimedIter(real_iter(self), clock)

    ft.optimisation_step = step  # type: ignore[assignment]
    torch.utils.data.DataLoader.__iter__ = loader_iter  # type: ignore[method-assign]
    try:
        yield
    finally:
        ft.optimisation_step = real_step  # type: ignore[assignment]
        torch.utils.data.DataLoader.__iter__ = real_iter  # type: ignore[method-assign]


class RunStats:
    """Per-iteration wall and CPU seconds (between consecutive step starts, from ``warmup`` on)
    and the share of the wall time spent waiting in ``next()``."""

    def __init__(self, starts: list[Stamp], waits: list[tuple[float, float]], warmup: int) -> None:
        s = starts[warmup:]
        if len(s) < 2:
            raise SystemExit(f"too few iterations measured ({len(s)}); raise --iters")
        self.wall = [b[0] - a[0] for a, b in zip(s, s[1:], strict=False)]
        self.cpu = [b[1] - a[1] for a, b in zip(s, s[1:], strict=False)]
        lo, hi = s[0][0], s[-1][0]
        self.wait = sum(d for t, d in waits if lo <= t < hi) / (hi - lo)


# ---- the two fine-tuning loops -------------------------------------------------------------------


def asa3d_run(cfg: Any, index: Any, out: Path, warmup: int) -> RunStats:
    from asa3d.eval.finetune import run_finetune

    clock = _Clock()
    with instrumented(clock), contextlib.redirect_stderr(io.StringIO()):  # the bar: drawn, not shown
        run_finetune(cfg, out, train_index=index, resume=False)
    return RunStats(clock.step_starts, clock.waits, warmup)


def bare_run(
    cfg: Any, index: Any, kwargs: dict[str, Any], device: torch.device, precision: str, out: Path, warmup: int
) -> RunStats:
    """The same training written with MONAI and PyTorch alone."""
    from monai.data import DataLoader, Dataset, set_track_meta
    from monai.losses import DiceCELoss, DiceLoss
    from monai.networks.nets import SwinUNETR
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandRotate90d,
        RandShiftIntensityd,
        RandSpatialCropd,
        SpatialPadd,
    )
    from torch.utils.tensorboard import SummaryWriter

    tc = cfg.train
    keys = ["image", "label"]
    crop = tuple(tc.crop_size)
    data = [{"image": c.image()[None], "label": c.label()[None].astype(np.int64)} for c in index.cases]
    transform = Compose(
        [
            SpatialPadd(keys, crop),
            RandSpatialCropd(keys, crop, random_size=False),
            *[RandFlipd(keys, prob=tc.flip_prob, spatial_axis=a) for a in range(3)],
            RandRotate90d(keys, prob=tc.rot90_prob, spatial_axes=(0, 1)),
            RandShiftIntensityd("image", offsets=tc.shift_offset, prob=tc.shift_prob),
        ]
    )
    # the cached arrays in memory (what a CacheDataset holds); plain tensors, no MetaTensor
    # bookkeeping (MONAI's own switch for speed), so the bare loop is as fast as MONAI allows
    set_track_meta(False)
    ds = Dataset(data, transform)
    loader = DataLoader(ds, batch_size=tc.batch_size, shuffle=True, num_workers=cfg.data.num_workers)
    net = SwinUNETR(**kwargs).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, eps=tc.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    loss_fn = (DiceLoss if tc.loss == "dice" else DiceCELoss)(to_onehot_y=True, softmax=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    writer = SummaryWriter(str(out))
    starts: list[Stamp] = []
    waits: list[tuple[float, float]] = []
    it = 0
    while it < tc.iterations:
        batches = iter(loader)  # a pass over the cases
        while it < tc.iterations:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            waits.append((t0, time.perf_counter() - t0))
            starts.append(_stamp())
            x, y = batch["image"].to(device), batch["label"].to(device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(net(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            writer.add_scalar("loss/train", loss.item(), it)
            writer.add_scalar("lr", sched.get_last_lr()[0], it)
            it += 1
    writer.close()
    set_track_meta(True)
    return RunStats(starts, waits, warmup)


# ---- sliding-window prediction -------------------------------------------------------------------


def predict_fns(
    cfg: Any, net: torch.nn.Module, image: np.ndarray, device: torch.device
) -> dict[str, Callable[[], np.ndarray]]:
    from monai.inferers import sliding_window_inference

    try:  # after the split of eval/ by responsibility it lives in eval/inference.py
        from asa3d.eval.inference import predict_volume
    except ImportError:
        from asa3d.eval.finetune import predict_volume

    ev, roi = cfg.eval, tuple(cfg.eval.roi_size or cfg.train.crop_size)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)

    def ours() -> np.ndarray:
        return predict_volume(
            net, image, roi, ev.overlap, ev.mode, ev.sw_batch_size, device, cfg.train.precision
        )

    @torch.no_grad()
    def bare() -> np.ndarray:
        x = torch.as_tensor(image, dtype=torch.float32)[None, None].to(device)
        net.eval()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = sliding_window_inference(x, roi, ev.sw_batch_size, net, overlap=ev.overlap, mode=ev.mode)
        return logits.float().argmax(1)[0].to(torch.uint8).cpu().numpy()

    return {"asa3d": ours, "bare": bare}


# ---- main ------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace, data_json: Path) -> Any:
    from asa3d.config import from_dict
    from asa3d.eval.config_sections import FinetuneConfig

    doc = {
        "mode": "finetune",
        "model": {"feature_size": args.feature_size, "drop_path_rate": 0.0},
        "data": {
            "root": str(data_json),
            "num_workers": args.workers,
            "preprocess": {"spacing": list(args.spacing)},
        },
        "train": {
            "iterations": args.warmup + args.iters + 1,  # +1: the last one (final checkpoint) is not timed
            "batch_size": args.batch,
            "crop_size": [args.crop] * 3,
            "lr": 1e-4,
            "lr_schedule": "constant",
            "loss": "dice",
            "precision": args.precision,
            "device": args.device,
            "ckpt_every": 0,
            "log_every": 1,
            "progress": True,
        },
        "eval": {"split": None, "overlap": 0.5, "mode": "gaussian"},
    }
    return from_dict(FinetuneConfig, doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--feature-size", type=int, default=12)
    ap.add_argument("--crop", type=int, default=64, help="cubic crop (and sliding-window ROI) side")
    ap.add_argument("--cases", type=int, default=4, help="phantom cases written by `asa3d data phantom`")
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 96, 80), help="phantom voxels")
    ap.add_argument("--spacing", type=float, nargs=3, default=(4.0, 4.0, 4.0), help="phantom and cache mm")
    ap.add_argument("--data", type=Path, default=None, help="a dataset.json instead of new phantoms")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (both loops)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations at the start of each run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop")
    ap.add_argument("--predict-repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from asa3d.data.phantom import write_phantom_dataset
    from asa3d.engine.precision import training_precision
    from asa3d.eval.finetune import load_index, make_model, n_classes_of

    work = Path(tempfile.mkdtemp(prefix="asa3d_bench_ft_"))
    data_json = args.data or write_phantom_dataset(
        work / "phantom", n=args.cases, seed=0, shape=args.shape, spacing=args.spacing
    )
    cfg = _config(args, data_json)
    index = load_index(cfg.data)  # the on-disk cache, built once, read by both loops
    device = torch.device(args.device)
    n_classes = n_classes_of(index.label_names)
    _, kwargs = make_model(cfg, n_classes)
    precision = training_precision(cfg.train.precision, device, cfg.train.cpu_bf16)
    vol = index.cases[0].shape
    print(
        f"SwinUNETR feature_size {args.feature_size}, {n_classes} classes, crop {args.crop}^3, batch "
        f"{args.batch}, {precision} on {device} ({torch.get_num_threads()} threads), {args.workers} "
        f"workers; {len(index.cases)} cached cases of {vol}; {args.repeats} x (warm-up {args.warmup} "
        f"+ {args.iters} timed iterations) per loop, alternating",
        flush=True,
    )

    cpu_side = device.type == "cpu"  # the main process's CPU time means something only there
    runs: dict[str, list[RunStats]] = {"asa3d": [], "bare": []}
    for r in range(args.repeats):
        for side in ("asa3d", "bare") if r % 2 == 0 else ("bare", "asa3d"):
            out = work / f"{side}_{r}"
            if side == "asa3d":
                st = asa3d_run(cfg, index, out, args.warmup)
            else:
                st = bare_run(cfg, index, kwargs, device, precision, out, args.warmup)
            runs[side].append(st)
            cpu = f", CPU {statistics.median(st.cpu):.3f} s/it" if cpu_side else ""
            print(
                f"  round {r + 1} {side:5s}: wall {statistics.median(st.wall):.3f} s/it{cpu}, "
                f"data wait {st.wait:.1%}",
                flush=True,
            )
    print("fine-tuning iteration (medians over all timed iterations):")
    ratios = {}
    for what in ("wall", "cpu") if cpu_side else ("wall",):
        med = {k: statistics.median(x for st in v for x in getattr(st, what)) for k, v in runs.items()}
        ratios[what] = med["asa3d"] / med["bare"]
        print(
            f"  {what:4s} bare {med['bare']:.3f} s/it, asa3d {med['asa3d']:.3f} s/it: "
            f"ratio {ratios[what]:.3f}x (target <= 1.05x)"
        )
    for side in ("bare", "asa3d"):
        w = statistics.median(st.wait for st in runs[side])
        print(f"  {side:5s} step waits for data {w:.1%} of the wall time (median of runs)")

    net = make_model(cfg, n_classes)[0].to(device)
    image = index.cases[0].image()
    fns = predict_fns(cfg, net, image, device)
    preds = {k: fn() for k, fn in fns.items()}  # warm-up, and the two must agree
    same = bool(np.array_equal(preds["asa3d"], preds["bare"]))
    pt: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for r in range(args.predict_repeats):
        for side in ("asa3d", "bare") if r % 2 == 0 else ("bare", "asa3d"):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            w0, c0 = _stamp()
            fns[side]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            w1, c1 = _stamp()
            pt[side]["wall"].append(w1 - w0)
            pt[side]["cpu"].append(c1 - c0)
    print(
        f"sliding-window prediction of one {tuple(image.shape)} case (ROI {args.crop}^3, overlap "
        f"{cfg.eval.overlap}, {cfg.eval.mode}; medians of {args.predict_repeats}; labels identical: {same}):"
    )
    for what in ("wall", "cpu") if cpu_side else ("wall",):
        med = {k: statistics.median(v[what]) for k, v in pt.items()}
        print(
            f"  {what:4s} bare {med['bare']:.3f} s, asa3d {med['asa3d']:.3f} s: "
            f"ratio {med['asa3d'] / med['bare']:.3f}x (target <= 1.05x)"
        )
    print(f"(work files in {work})")


if __name__ == "__main__":
    main()

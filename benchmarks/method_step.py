"""One training iteration of every method, divided by the network passes it inherently needs.

Per method: ``training_step`` (views included) + backward + ``on_step_end`` (EMA) at the paper's
width (feature size 48) on 64^3 inputs with the smallest batch the method allows, against its
floor: the passes it inherently needs through a plain MONAI ``SwinUNETR`` on the same number of
64^3 samples, k forward + backward passes (one per sample the student sees) plus, for a teacher, a
no-grad forward per sample it sees. k is printed per method. Everything is timed in one run,
interleaved (after a warm-up round that is not counted), so a busy spell of the shared machine hits
every variant; process CPU time with one thread is the measure (it counts our work only), and the
peak resident memory is printed at the end.

    nice python benchmarks/method_step.py            # 1 warm-up + 3 timed rounds
    nice python benchmarks/method_step.py --quick    # 1 + 2
    nice python benchmarks/method_step.py --rounds 0 1 --feature-size 12   # a smoke run
    nice python benchmarks/method_step.py --voco-paper  # also VoCo at the supplement's 4x4 geometry

Target: step / floor <= 1.2 for every method (no avoidable overhead around the network). A method
that runs only the encoder (Swin UNETR SSL, VoCo, ASA's teacher and phase 2) can go below 1: the
floor is the whole SwinUNETR, as a user of the backbone would run it.

VoCo runs at 2x2 base crops + 2 random crops of one 128x128x64 volume by default (6 crops of 64^3:
its per-crop work is that of the supplement's geometry, whose 4x4 + 4 crops of 384x384x64 make 20).
``--voco-paper`` adds the 20-crop case: its backward holds the activations of 20 crops at once
(all crops share the projector's BatchNorm), several times the memory of the others.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.networks.nets import SwinUNETR

from asa3d.config_sections import ModelConfig
from asa3d.methods.base import PretrainMethod, build_method
from asa3d.models.backbone import monai_swinunetr_kwargs

S = 64  # input cube of every pass


@dataclass
class Case:
    """One method's iteration and its inherent passes: (samples, with grad) per SwinUNETR pass."""

    label: str
    method: dict[str, Any]
    phase: str
    volumes: int  # volumes in the batch
    passes: list[tuple[int, bool]]
    why: str


CASES = [
    Case(
        "ASA P1",
        {"name": "asa", "input_size": S, "subvolume_size": 16},
        "P1",
        1,
        [(1, True), (1, False)],
        "student on the shuffled volume (full SwinUNETR: appearance recovery needs the decoder) "
        "+ teacher encoder on the original, no grad",
    ),
    Case(
        "ASA P2",
        {"name": "asa", "input_size": S, "subvolume_size": 16, "p2_max_offset_cells": 2},
        "P2",
        1,
        [(1, True), (1, False)],
        "student encoder on crop 1 + teacher encoder on crop 2, no grad (paper: one direction)",
    ),
    Case(
        "SimMIM-3D",
        {"name": "simmim", "input_size": S, "mask_cell_size": 16},
        "mim",
        1,
        [(1, True)],
        "one masked volume through the student (full SwinUNETR with the decoder head)",
    ),
    Case(
        "Swin UNETR SSL",
        {"name": "swinssl", "crop_size": S, "crops_per_volume": 2},
        "ssl",
        1,
        [(4, True)],
        "2 crops x 2 augmented views of one volume, one batched pass (swinViT only)",
    ),
    Case(
        "VoCo",
        {"name": "voco", "volume_size": [128, 128, 64], "grid": 2, "num_random_crops": 2},
        "voco",
        1,
        [(6, True)],
        "2x2 base crops + 2 random crops of one 128x128x64 volume, one batched pass (encoder and "
        "projector; the per-crop work of the supplement's 4x4 geometry, see --voco-paper)",
    ),
]
VOCO_PAPER = Case(
    "VoCo 4x4",
    {"name": "voco"},  # the supplement: 384x384x64, 4x4 bases + 4 random crops, all resized to 64^3
    "voco",
    1,
    [(20, True)],
    "the supplement's geometry: 16 base crops + 4 random crops of one 384x384x64 volume, one batched pass",
)


def k_passes(passes: list[tuple[int, bool]]) -> str:
    """k, as printed: forward+backward passes (+ no-grad forwards)."""
    k = sum(n for n, g in passes if g)
    nograd = sum(n for n, g in passes if not g)
    return f"{k}" + (f" + {nograd} no-grad fwd" if nograd else "")


def _timed(fn: Callable[[], None]) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def method_iteration(m: PretrainMethod, case: Case, vols: list[torch.Tensor]) -> Callable[[], None]:
    params = [p for p in m.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        out = m.training_step({"image": vols, "id": [f"v{i}" for i in range(len(vols))]}, case.phase)
        out.loss.backward()
        with torch.no_grad():
            m.on_step_end(case.phase, 1, 100)

    return run


def floor_passes(net: SwinUNETR, passes: list[tuple[int, bool]]) -> Callable[[], None]:
    """k single-sample passes (CPU time is linear in the batch; one sample at a time keeps the
    floor's memory to one sample's activations)."""
    xs = [(torch.rand(1, 1, S, S, S), grad) for n, grad in passes for _ in range(n)]

    def run() -> None:
        for p in net.parameters():
            p.grad = None
        for x, grad in xs:
            if grad:
                net(x).mean().backward()
            else:
                with torch.no_grad():
                    net(x)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed rounds (default 1 + 3)")
    ap.add_argument("--rounds", type=int, nargs=2, default=None, metavar=("WARMUP", "TIMED"))
    ap.add_argument("--feature-size", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    ap.add_argument("--voco-paper", action="store_true", help="also VoCo at the supplement's 4x4 geometry")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warmup, repeats = args.rounds or ((1, 2) if args.quick else (1, 3))
    model = ModelConfig(feature_size=args.feature_size, drop_path_rate=0.0)
    from asa3d.data.phantom import make_phantom

    img, _, _ = make_phantom((0, 0), shape=(96, 96, 80), spacing=(4.0, 4.0, 4.0))
    vol = torch.from_numpy(np.clip((img.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0))[None]
    cases = [
        c
        for c in [*CASES, *([VOCO_PAPER] if args.voco_paper else [])]
        if not args.only or c.label in args.only
    ]
    torch.manual_seed(0)
    plain = SwinUNETR(**monai_swinunetr_kwargs(model.swinunetr_kwargs(1)))
    plain.train()
    variants: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    for c in cases:
        m = build_method(c.method, model)
        m.train()
        m.on_round_start(0, 1)
        variants[c.label] = (method_iteration(m, c, [vol] * c.volumes), floor_passes(plain, c.passes))
    step: dict[str, list[float]] = {k: [] for k in variants}
    floor: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + repeats):
        for key, (run_method, run_floor) in variants.items():
            a, b = _timed(run_method), _timed(run_floor)
            if i >= warmup:
                step[key].append(a)
                floor[key].append(b)
            print(f"  round {i} {key}: step {a:.2f} s, floor {b:.2f} s, ratio {a / b:.2f}", flush=True)
    print(
        f"\n== feature_size {args.feature_size}, {S}^3, {torch.get_num_threads()} thread(s), "
        f"process CPU s, min of {repeats} =="
    )
    print("| method | k: plain SwinUNETR fwd+bwd passes | step s | floor s | step/floor | target <= 1.2 |")
    print("|---|---|---|---|---|---|")
    for c in cases:
        s, f = min(step[c.label]), min(floor[c.label])
        verdict = "ok" if s / f <= 1.2 else "MISSED"
        print(f"| {c.label} | {k_passes(c.passes)} | {s:.2f} | {f:.2f} | {s / f:.2f} | {verdict} |")
    print()
    for c in cases:
        print(f"- {c.label}: {c.why}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"\npeak resident memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()

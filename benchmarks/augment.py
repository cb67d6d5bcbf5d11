"""Fine-tuning augmentation: asa3d's batched tensor version against MONAI's dictionary transforms.

Both apply the same family (flip per axis, axial rot90, intensity shift) jointly to image and
label on a collated (B, 1, X, Y, Z) batch; MONAI's run per sample, as a MONAI pipeline would
after collation. Prints the time per batch of each and their ratio, measured in one run.

    python benchmarks/augment.py [--size 96] [--batch 2] [--reps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.transforms import Compose, RandFlipd, RandRotate90d, RandShiftIntensityd

from asa3d.eval.finetune import FinetuneTrainConfig, augment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = FinetuneTrainConfig(flip_prob=0.5, rot90_prob=0.5, shift_prob=0.5)
    s = args.size
    img = torch.rand(args.batch, 1, s, s, s)
    lbl = torch.randint(0, 14, (args.batch, 1, s, s, s))
    keys = ["image", "label"]
    monai_aug = Compose(
        [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)]
        + [
            RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)),
            RandShiftIntensityd("image", offsets=cfg.shift_offset, prob=0.5),
        ]
    )
    monai_aug.set_random_state(0)
    gen = torch.Generator().manual_seed(0)

    def ours() -> None:
        augment(img, lbl, cfg, gen)

    def theirs() -> None:
        outs = [monai_aug({"image": img[b], "label": lbl[b]}) for b in range(args.batch)]
        torch.stack([o["image"].as_tensor() for o in outs])
        torch.stack([o["label"].as_tensor() for o in outs])

    times = {}
    for name, fn in (("asa3d", ours), ("monai", theirs)):
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.reps):
            fn()
        times[name] = (time.perf_counter() - t0) / args.reps
    print(f"batch {args.batch} x 1 x {s}^3, 1 thread, mean of {args.reps}")
    print(f"asa3d batched augment : {times['asa3d'] * 1e3:8.2f} ms/batch")
    print(f"MONAI dict transforms : {times['monai'] * 1e3:8.2f} ms/batch")
    print(f"ratio MONAI / asa3d   : {times['monai'] / times['asa3d']:.2f}x")


if __name__ == "__main__":
    main()

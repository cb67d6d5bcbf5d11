"""Volumes/second delivered to a training loop: asa3d's cache vs per-sample MONAI preprocessing.

The reference ASA code loads, reorients, resamples, windows and resizes every volume in every
epoch (LoadImaged + EnsureChannelFirstd + Orientationd + Spacingd + ScaleIntensityRanged +
Resized to 128^3). asa3d does the first four once into a blosc2 cache; the whole-volume resize
happens on the training device. Both are measured here in one run, on every CT image in
../shared/data, with a DataLoader over the same number of worker processes.

    .venv/bin/python benchmarks/data_throughput.py [--data ../shared/data] [--loader-workers 0]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
CT_PATTERNS = (
    "**/CT_image.nii.gz",
    "**/example_ct.nii.gz",
    "**/example_ct_sm.nii.gz",
    "**/ct_cropped.nii.gz",
    "popi_4dct/*.nii.gz",
)


def ct_images(root: Path) -> list[Path]:
    return sorted({p for pat in CT_PATTERNS for p in root.glob(pat)})


def rate(loader: DataLoader, epochs: int, per_batch=None) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            imgs = batch["image"]
            if per_batch is not None:
                imgs = per_batch(imgs)
            n += len(imgs)
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder, removed after")
    ap.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers for both pipelines")
    ap.add_argument("--build-workers", type=int, default=2)
    ap.add_argument("--cache-epochs", type=int, default=3)
    ap.add_argument("--ref-epochs", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from monai.data import Dataset
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        Resized,
        ScaleIntensityRanged,
        Spacingd,
    )

    from asa3d.config_sections import PreprocessConfig
    from asa3d.data.cache import build_cache
    from asa3d.data.datalist import Datalist, unique_ids
    from asa3d.data.dataset import CachedVolumeDataset
    from asa3d.methods.base import SampleSpec

    images = ct_images(args.data)
    if not images:
        raise SystemExit(f"no CT images under {args.data}")
    cfg = PreprocessConfig()
    items = [{"id": i, "image": str(p)} for p, i in zip(images, unique_ids(images), strict=True)]
    dl = Datalist(items=items, label_names={}, name="shared-ct", root=args.data)
    tmp = args.cache_dir or Path(tempfile.mkdtemp(prefix="asa3d_bench_cache_"))
    print(f"{len(images)} CT volumes from {args.data}; cache in {tmp}")
    try:
        t0 = time.perf_counter()
        index = build_cache(dl, cfg, tmp, workers=args.build_workers)
        build_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for c in index.cases for f in c.dir.iterdir())
        src = sum(p.stat().st_size for p in images)
        print(
            f"cache build: {build_s:.1f} s with {args.build_workers} processes ({index.built} built, "
            f"{index.reused} reused); {size / 1e6:.1f} MB on disk (sources {src / 1e6:.1f} MB .nii.gz)"
        )

        kw = dict(batch_size=1, num_workers=args.loader_workers, persistent_workers=args.loader_workers > 0)
        whole = CachedVolumeDataset(index, SampleSpec("whole"))
        r_whole, n1 = rate(DataLoader(whole, collate_fn=whole.collate_fn, **kw), args.cache_epochs)

        def resize128(imgs):  # what the method does on the device, here on the CPU
            return [F.interpolate(x[None], size=(128, 128, 128), mode="area")[0] for x in imgs]

        r_whole_rs, _ = rate(
            DataLoader(whole, collate_fn=whole.collate_fn, **kw), args.cache_epochs, resize128
        )
        crops = CachedVolumeDataset(index, SampleSpec("crop", (96, 96, 96)), seed=0)
        r_crop, _ = rate(DataLoader(crops, collate_fn=crops.collate_fn, **kw), args.cache_epochs)

        ref_tf = Compose([
            LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS", labels=None),
            Spacingd(keys="image", pixdim=cfg.spacing, mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=cfg.window[0], a_max=cfg.window[1], b_min=0.0, b_max=1.0,
                                 clip=True),
            Resized(keys="image", spatial_size=(128, 128, 128), mode="area"),
        ])  # fmt: skip
        ref = Dataset([{"image": it["image"]} for it in items], transform=ref_tf)
        r_ref, n2 = rate(DataLoader(ref, **kw), args.ref_epochs)

        print(f"\nDataLoader(batch 1, {args.loader_workers} workers), torch threads 1:")
        print(f"  cache, whole volumes          : {r_whole:8.2f} volumes/s ({n1} volumes)")
        print(f"  cache, whole + resize 128^3   : {r_whole_rs:8.2f} volumes/s (resize on CPU here)")
        print(f"  cache, random 96^3 crops      : {r_crop:8.2f} crops/s")
        print(f"  per-sample MONAI from files   : {r_ref:8.2f} volumes/s ({n2} volumes, incl. Resized 128^3)")
        print(f"\nratio cache whole / per-sample          : {r_whole / r_ref:6.1f}x (target >= 20x)")
        print(f"ratio cache whole+resize / per-sample   : {r_whole_rs / r_ref:6.1f}x")
        print(f"ratio cache 96^3 crops / per-sample     : {r_crop / r_ref:6.1f}x")
    finally:
        if args.cache_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Render the Eve pictures of docs/methods/adam.md: the tiny Adam-2D and Adam-3D runs on the phantom.

    python scripts/render_eve_pictures.py --work /tmp/eve_docs    # about 2 minutes on 2 CPU cores

Runs, through the command line as a user would:
1. two phantom radiographs the 2D run never sees (DRR seed 1; the run trains on seed 0) and a
   phantom CT set of 10 (8 train, 2 validation: the 3D pictures use the validation pair);
2. ``asa3d pretrain --config pretrain/adam2d_tiny.yaml`` and ``pretrain/adam3d_tiny.yaml``;
3. ``asa3d eve`` on each, with the label maps as landmarks;
and copies the PNGs to ``docs/methods/adam_eve_{tsne,correspondence,whole_parts}_{2d,3d}.png``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from asa3d.cli import main as cli
from asa3d.data.dataset2d import DRR_SPACING, DRR_VOLUME
from asa3d.data.drr import write_drr_dataset

REPO = Path(__file__).resolve().parents[1]
PICTURES = ("tsne", "correspondence", "whole_parts")


def _ok(args: list[str]) -> None:
    print("asa3d", " ".join(args), flush=True)
    if cli(args) != 0:
        raise SystemExit(f"failed: asa3d {' '.join(args)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (data, runs, Eve outputs)")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "methods", help="where the PNGs go")
    a = ap.parse_args()
    w = a.work
    js2d = write_drr_dataset(w / "drr", n=2, seed=1, shape=DRR_VOLUME, spacing=DRR_SPACING, overwrite=True)
    drr = js2d.parent
    _ok(["data", "phantom", "--n", "10", "--n-validation", "2", "--out", str(w / "phantom"), "--overwrite"])
    _ok(["pretrain", "--config", "pretrain/adam2d_tiny.yaml", "--out", str(w / "adam2d_tiny")])
    js = w / "phantom" / "dataset.json"
    _ok(["pretrain", "--config", "pretrain/adam3d_tiny.yaml", "--out", str(w / "adam3d_tiny"),
         f"data.root={js}"])  # fmt: skip
    runs = {
        "2d": (
            w / "adam2d_tiny" / "last.pt",
            [drr / "imagesTr" / f"drr_00{i}.png" for i in (0, 1)],
            [drr / "masksTr" / f"drr_00{i}.npz" for i in (0, 1)],
        ),
        "3d": (
            w / "adam3d_tiny" / "last.pt",
            [w / "phantom" / "imagesTr" / f"phantom_00{i}.nii.gz" for i in (8, 9)],
            [w / "phantom" / "labelsTr" / f"phantom_00{i}.nii.gz" for i in (8, 9)],
        ),
    }
    for tag, (ckpt, images, labels) in runs.items():
        out = w / f"eve_{tag}"
        files = ["--images", *map(str, images), "--labels", *map(str, labels)]
        _ok(["eve", str(ckpt), *files, "--out", str(out), "--overwrite"])
        for name in PICTURES:
            shutil.copyfile(out / f"{name}.png", a.docs / f"adam_eve_{name}_{tag}.png")
    print(f"pictures in {a.docs}")


if __name__ == "__main__":
    main()

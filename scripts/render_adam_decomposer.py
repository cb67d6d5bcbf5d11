"""Render Adam's anatomy decomposition for the docs: 2D on a phantom DRR, 3D on a phantom CT.

    python scripts/render_adam_decomposer.py          # -> docs/methods/adam_decomposer.png

Top row: a digitally reconstructed radiograph split at levels n = 0, 2, 4 (1, 2x2, 4x4 parts),
the anchor part of a seeded draw outlined. Bottom row: a phantom CT split at levels 0, 3, 6
(``split_axes="xyz"``: 1, 2x2x2, 4x4x4 parts), shown on the coronal slice through the anchor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from asa3d.data.drr import phantom_drr
from asa3d.data.montage import oriented_slice
from asa3d.data.phantom import make_phantom
from asa3d.views.decompose import decompose, grid_shape, part_boxes

REPO = Path(__file__).resolve().parents[1]
ANCHOR = "#ff3b30"
GRID = "#ffd60a"


def _draw_grid(ax, boxes_rc: list[tuple[int, int, int, int]], anchor: tuple[int, int, int, int]) -> None:
    """Boxes as (row0, row1, col0, col1) in display pixels; imshow pixel centres sit on integers."""
    for r0, r1, c0, c1 in boxes_rc:
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, ec=GRID, lw=0.8))
    r0, r1, c0, c1 = anchor
    ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, ec=ANCHOR, lw=2.2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "methods" / "adam_decomposer.png")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)

    drr = phantom_drr((0, 0), shape=(128, 100, 128), spacing=(3.0, 3.0, 3.0)).image
    hu, _, _ = make_phantom((0, 1), (96, 80, 96), (4.0, 4.0, 4.0))
    ct = np.clip((hu.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0)  # abdomen window -175..250 HU

    fig = Figure(figsize=(9.0, 6.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    gen = torch.Generator().manual_seed(args.seed)
    for ax, n in zip(axes[0], (0, 2, 4), strict=True):
        d = decompose((1, 1, *drr.shape), n, generator=gen)
        boxes = [(b[0][0], b[0][1], b[1][0], b[1][1]) for b in part_boxes(drr.shape, n).tolist()]
        a = d.boxes[0].tolist()
        ax.imshow(drr, cmap="gray", vmin=0, vmax=1)
        _draw_grid(ax, boxes, (a[0][0], a[0][1], a[1][0], a[1][1]))
        rows, cols = grid_shape(n, 2)
        ax.set_title(f"2D, n = {n}: {rows}x{cols} = {2**n} part{'s' if n else ''}", fontsize=9)
    x, _, z = ct.shape
    for ax, n in zip(axes[1], (0, 3, 6), strict=True):
        d = decompose((1, 1, *ct.shape), n, "xyz", generator=gen)
        (ax0, ax1), (ay0, ay1), (az0, az1) = d.boxes[0].tolist()
        centre = ((ax0 + ax1) // 2, (ay0 + ay1) // 2, (az0 + az1) // 2)
        # Coronal display: rows = z from the top (superior), cols = x from the patient's right.
        boxes = {
            (z - b[2][1], z - b[2][0], x - b[0][1], x - b[0][0])
            for b in part_boxes(ct.shape, n, "xyz").tolist()
            if b[1][0] <= centre[1] < b[1][1]
        }
        ax.imshow(oriented_slice(ct, "coronal", centre), cmap="gray", vmin=0, vmax=1)
        _draw_grid(ax, sorted(boxes), (z - az1, z - az0, x - ax1, x - ax0))
        g = grid_shape(n, 3, "xyz")
        ax.set_title(f"3D, n = {n}: {g[0]}x{g[1]}x{g[2]} = {2**n} part{'s' if n else ''}", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("phantom DRR", fontsize=9)
    axes[1, 0].set_ylabel("phantom CT (coronal slice\nthrough the anchor part)", fontsize=9)
    fig.suptitle(
        "Adam's anatomy decomposer: grid per level, anchor part of one seeded draw in red", fontsize=10
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

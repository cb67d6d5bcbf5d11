"""Render phantom radiographs (DRRs) with their projected organ masks for the docs.

    python scripts/render_phantom_drr.py          # -> docs/phantom_drr.png

Top row: the DRRs of three phantom subjects. Bottom row: the same with the outlines of the
projected masks (a pixel belongs to an organ if any voxel along its ray does; masks overlap).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from asa3d.data.drr import phantom_drr

REPO = Path(__file__).resolve().parents[1]
SHOWN = ("lungs", "liver", "spleen", "right kidney", "left kidney", "stomach", "vertebrae", "aorta")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "phantom_drr.png")
    ap.add_argument("--subjects", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)

    drrs = [phantom_drr((0, i), shape=(128, 100, 128), spacing=(3.0, 3.0, 3.0)) for i in args.subjects]
    fig = Figure(figsize=(3.0 * len(drrs), 7.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(drrs), squeeze=False)
    colours = matplotlib.colormaps["tab10"]
    for j, (i, d) in enumerate(zip(args.subjects, drrs, strict=True)):
        for ax in axes[:, j]:
            ax.imshow(d.image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(f"phantom (0, {i})", fontsize=9)
        for k, name in enumerate(SHOWN):
            m = d.masks[d.names.index(name)]
            if m.any():
                axes[1, j].contour(m, levels=[0.5], colors=[colours(k)], linewidths=0.9)
    handles = [Line2D([], [], color=colours(k), label=n) for k, n in enumerate(SHOWN)]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("Phantom radiographs (DRR) and their projected organ masks", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

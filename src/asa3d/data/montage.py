"""Orthogonal-slice montages of a CT volume with an optional label overlay.

Volumes use the project convention: array axes (x, y, z) in RAS (x towards the patient's
right, y anterior, z superior). Slices are shown the radiological way: axial with anterior up
and the patient's right on the image left; coronal and sagittal with superior up (sagittal
with anterior on the left). Pixel aspect comes from the voxel spacing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from asa3d.atomic import atomic_path

VIEWS = ("axial", "coronal", "sagittal")


@dataclass
class MontageRow:
    """One volume to show as a row of axial / coronal / sagittal slices."""

    image: np.ndarray
    label: np.ndarray | None = None
    spacing: Sequence[float] = (1.0, 1.0, 1.0)
    title: str = ""
    center: Sequence[int] | str | None = None  # voxel (x, y, z), "label", or None = volume centre


def _label_colors(n: int) -> np.ndarray:
    """Distinct RGBA colours; index 0 (background) is transparent."""
    base = matplotlib.colormaps["tab20"](np.linspace(0, 1, 20))
    reorder = np.r_[0:20:2, 1:20:2]  # saturated colours first
    colors = np.concatenate([np.zeros((1, 4)), base[reorder][np.arange(max(n - 1, 1)) % 20]])
    return colors[: max(n, 2)]


def _center(row: MontageRow) -> tuple[int, int, int]:
    shape = row.image.shape
    if isinstance(row.center, str):
        if row.center != "label":
            raise ValueError(f"center must be a voxel index, 'label' or None, not {row.center!r}")
        if row.label is not None and np.any(row.label > 0):
            c = np.argwhere(row.label > 0).mean(0).round().astype(int)
            return int(c[0]), int(c[1]), int(c[2])
        return shape[0] // 2, shape[1] // 2, shape[2] // 2
    if row.center is None:
        return shape[0] // 2, shape[1] // 2, shape[2] // 2
    c = [int(v) for v in row.center]
    return c[0], c[1], c[2]


def oriented_slice(vol: np.ndarray, view: str, c: Sequence[int]) -> np.ndarray:
    """The 2-D slice ``view`` through voxel ``c`` (x, y, z) of an RAS volume, oriented for display.

    Rows run top to bottom and columns left to right of the screen: anterior (axial) or superior
    (coronal, sagittal) on top, patient right (axial, coronal) or anterior (sagittal) on the left.
    """
    if view == "axial":
        s = vol[:, :, c[2]]  # (x, y)
    elif view == "coronal":
        s = vol[:, c[1], :]  # (x, z)
    else:
        s = vol[c[0], :, :]  # (y, z)
    # Each slice is (horizontal axis, vertical axis), both pointing to patient R / A / S; the
    # screen wants patient right / anterior on the left and anterior / superior on top.
    return s[::-1, ::-1].T


def _extent(view: str, shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float, float, float]:
    h, v = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[view]
    return (0.0, shape[h] * spacing[h], 0.0, shape[v] * spacing[v])


def _to_display(
    image: np.ndarray, window: tuple[float, float] | None
) -> tuple[np.ndarray, tuple[float, float]]:
    img = np.asarray(image, dtype=np.float32)
    if window is None:
        # Heuristic: preprocessed volumes live in [0, 1]; raw CT is in HU.
        window = (0.0, 1.0) if img.min() >= -0.01 and img.max() <= 1.01 else (-175.0, 250.0)
    return img, (float(window[0]), float(window[1]))


def render_rows(
    rows: Sequence[MontageRow],
    out_png: str | Path,
    window: tuple[float, float] | None = None,
    label_names: Mapping[int, str] | None = None,
    suptitle: str = "",
    alpha: float = 0.35,
    panel_height: float = 3.2,
    dpi: int = 100,
) -> Path:
    """Render one row of axial / coronal / sagittal slices per volume into a PNG."""
    n_labels = 1 + max((int(r.label.max()) for r in rows if r.label is not None), default=0)
    colors = _label_colors(n_labels)
    cmap = ListedColormap(colors)
    # Panel widths follow the physical extent so that mm are square across the figure.
    widths = []
    for r in rows:
        widths.append([_extent(v, r.image.shape, r.spacing) for v in VIEWS])
    ratios = [max(w[i][1] / max(w[i][3], 1e-6) for w in widths) for i in range(3)]
    # A bare Figure on the Agg canvas: no pyplot state, no display, works in any backend setup.
    fig = Figure(
        figsize=(panel_height * sum(ratios) + 0.3, panel_height * len(rows) + (0.5 if suptitle else 0.2))
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 3, gridspec_kw={"width_ratios": ratios}, squeeze=False)
    present: set[int] = set()
    for ri, row in enumerate(rows):
        img, (lo, hi) = _to_display(row.image, window)
        c = _center(row)
        for vi, view in enumerate(VIEWS):
            ax = axes[ri][vi]
            ext = _extent(view, img.shape, row.spacing)
            ax.imshow(
                oriented_slice(img, view, c),
                cmap="gray",
                vmin=lo,
                vmax=hi,
                extent=ext,
                interpolation="nearest",
            )
            if row.label is not None:
                lab = oriented_slice(np.asarray(row.label), view, c).astype(np.int64)
                present.update(int(v) for v in np.unique(lab) if v > 0)
                ax.imshow(
                    np.ma.masked_equal(lab, 0),
                    cmap=cmap,
                    vmin=-0.5,
                    vmax=len(colors) - 0.5,
                    alpha=alpha,
                    extent=ext,
                    interpolation="nearest",
                )
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            axis = {"axial": 2, "coronal": 1, "sagittal": 0}[view]
            name = f"{view} ({'xyz'[axis]}={c[axis]})"
            ax.set_title(f"{row.title}: {name}" if row.title and vi == 0 else name, fontsize=8)
            side = {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("A", "P")}[view]
            ax.text(0.01, 0.5, side[0], color="yellow", fontsize=7, transform=ax.transAxes, va="center")
            ax.text(
                0.99,
                0.5,
                side[1],
                color="yellow",
                fontsize=7,
                transform=ax.transAxes,
                va="center",
                ha="right",
            )
    if present and label_names:
        handles = [
            Patch(color=colors[k], label=label_names.get(k, str(k)))
            for k in sorted(present)
            if k < len(colors)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if present and label_names else 0, 1, 1))
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return out


def render_montage(
    image: np.ndarray,
    label: np.ndarray | None = None,
    out_png: str | Path = "montage.png",
    window: tuple[float, float] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
    center: Sequence[int] | str | None = None,
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Axial / coronal / sagittal slices of one volume, in HU or preprocessed to [0, 1].

    ``window=None`` picks (-175, 250) HU (soft tissue) for HU input and (0, 1) for [0, 1] input.
    ``center`` picks the slices: a voxel index, ``"label"`` (label centroid) or None (centre).
    """
    row = MontageRow(image=image, label=label, spacing=spacing, title=title, center=center)
    return render_rows([row], out_png, window=window, label_names=label_names)


def render_side_by_side(
    volumes: Sequence[MontageRow],
    out_png: str | Path,
    window: tuple[float, float] | None = None,
    label_names: Mapping[int, str] | None = None,
    suptitle: str = "",
) -> Path:
    """Several volumes (e.g. phantom vs real CT, image vs prediction), one row each."""
    return render_rows(volumes, out_png, window=window, label_names=label_names, suptitle=suptitle)

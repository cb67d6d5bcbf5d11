"""Dense correspondence (Adam supplement C.1): match feature vectors of two images by cosine
similarity and draw the strongest matches as lines. In 3D, on the three orthogonal slices
through a point of each volume.

Matching runs on the encoder's feature grid (one vector per stride x stride pixels), not the
upsampled map: the upsampled vectors are interpolations of the same ones. Match locations are
the centres of the feature cells in input pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from asa3d.data.montage import oriented_slice
from asa3d.eve.embed import EveEncoder, crop_embeddings
from asa3d.eve.figure_io import MIN_DPI, new_figure, save_png

__all__ = [
    "Matches",
    "draw_correspondences",
    "draw_correspondences_3d",
    "display_to_voxel",
    "informative_cells",
    "match_features",
    "orthogonal_feature_slices",
    "window_features",
]


@dataclass
class Matches:
    points_a: np.ndarray  # (M, D) input pixel coordinates in image A
    points_b: np.ndarray  # (M, D) in image B
    similarity: np.ndarray  # (M,) cosine, descending


def _cell_centres(grid: Sequence[int], image: Sequence[int]) -> torch.Tensor:
    axes = [(torch.arange(g) + 0.5) * (s / g) - 0.5 for g, s in zip(grid, image, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))


def match_features(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    image_shape_a: Sequence[int],
    image_shape_b: Sequence[int],
    top_k: int = 20,
    mutual: bool = True,
    centre: bool = False,
    valid_a: torch.Tensor | np.ndarray | None = None,
    valid_b: torch.Tensor | np.ndarray | None = None,
) -> Matches:
    """For every cell of ``feat_a`` (F, *grid_a) its most similar cell of ``feat_b`` (F, *grid_b);
    with ``mutual`` only pairs that are each other's best match are kept; the ``top_k`` most
    similar are returned, in input-pixel coordinates of the two images.

    ``centre``: subtract the mean feature of both sets' (valid) cells before the cosine. Pooled
    features after a ReLU share a large common component (every cosine is near 1, as for any
    non-negative vectors), which hides the differences the matches are about; centring removes it
    (the reported similarities are then cosines of centred features). ``valid_a`` / ``valid_b``
    (flattened cell masks): cells that may take part (e.g. not flat background)."""
    fa = feat_a.float().flatten(1)  # (F, Na)
    fb = feat_b.float().flatten(1)
    va = (
        torch.ones(fa.shape[1], dtype=torch.bool)
        if valid_a is None
        else torch.as_tensor(valid_a).flatten().bool()
    )
    vb = (
        torch.ones(fb.shape[1], dtype=torch.bool)
        if valid_b is None
        else torch.as_tensor(valid_b).flatten().bool()
    )
    if centre and (va.any() or vb.any()):
        mu = torch.cat([fa[:, va], fb[:, vb]], 1).mean(1, keepdim=True)
        fa, fb = fa - mu, fb - mu
    fa, fb = F.normalize(fa, dim=0), F.normalize(fb, dim=0)
    sim = fa.T @ fb  # (Na, Nb)
    sim = sim.masked_fill(~va[:, None] | ~vb[None, :], float("-inf"))
    best_b = sim.argmax(1)
    ia = torch.arange(sim.shape[0])[va]
    if mutual:
        ia = ia[sim.argmax(0)[best_b[ia]] == ia]
    s = sim[ia, best_b[ia]]
    keep = torch.isfinite(s)
    ia, s = ia[keep], s[keep]
    order = torch.argsort(s, descending=True, stable=True)[:top_k]
    ia, ib, s = ia[order], best_b[ia][order], s[order]
    pa = _cell_centres(feat_a.shape[1:], image_shape_a)[ia]
    pb = _cell_centres(feat_b.shape[1:], image_shape_b)[ib]
    return Matches(pa.numpy(), pb.numpy(), s.numpy())


def _overlap(c: np.ndarray, half: float, n: int) -> np.ndarray:
    """Length of [c - half, c + half] inside the image's [-0.5, n - 0.5] along one axis."""
    return np.clip(np.minimum(c + half, n - 0.5) - np.maximum(c - half, -0.5), 0, None)


def informative_cells(
    image: np.ndarray,
    grid: Sequence[int],
    size_px: Sequence[float],
    tol: float = 0.02,
    floor: float = 0.05,
    max_outside: float = 0.75,
) -> np.ndarray:
    """(prod(grid),) bool: cells on the subject whose crop is not flat. A cell qualifies when its own
    box has mean intensity >= ``floor`` (not air / background on [0, 1] images), its crop (side
    ``size_px`` around the cell centre) lies at least ``max_outside`` inside the image (crops mostly
    of zero padding are left out) and has intensity sd >= ``tol``. Background matches background
    anywhere: such lines say nothing about anatomy."""
    img = np.asarray(image, np.float32)
    shape = np.array(img.shape)
    centres = _cell_centres(grid, img.shape).numpy()
    half = np.asarray(size_px, np.float64) / 2
    cell = shape / np.asarray(grid, np.float64) / 2

    def box(c: np.ndarray, h: np.ndarray) -> np.ndarray:
        lo = np.clip(np.floor(c - h + 0.5).astype(int), 0, shape - 1)
        hi = np.clip(np.ceil(c + h + 0.5).astype(int), lo + 1, shape)
        return img[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]

    inside = np.prod([_overlap(c, h, n) for c, h, n in zip(centres.T, half, shape, strict=True)], axis=0)
    inside = inside / np.prod(2 * half)
    on = [box(c, cell).mean() >= floor and box(c, half).std() >= tol for c in centres]
    return np.asarray(on, bool) & (inside >= max_outside)


def _panel(ax, img_a: np.ndarray, img_b: np.ndarray, m: Matches, label: str | None) -> None:
    import matplotlib

    h = max(img_a.shape[0], img_b.shape[0])
    gap = max(4, img_a.shape[1] // 20)
    canvas = np.full((h, img_a.shape[1] + gap + img_b.shape[1]), np.nan, np.float32)
    canvas[: img_a.shape[0], : img_a.shape[1]] = img_a
    canvas[: img_b.shape[0], img_a.shape[1] + gap :] = img_b
    ax.imshow(canvas, cmap="gray", vmin=float(np.nanmin(canvas)), vmax=float(np.nanmax(canvas)))
    cmap = matplotlib.colormaps["viridis"]
    lo, hi = (float(m.similarity.min()), float(m.similarity.max())) if len(m.similarity) else (0.0, 1.0)
    for (ra, ca), (rb, cb), s in zip(m.points_a, m.points_b, m.similarity, strict=True):
        colour = cmap((s - lo) / max(hi - lo, 1e-6))
        xb = cb + img_a.shape[1] + gap
        ax.plot([ca, xb], [ra, rb], "-", color=colour, lw=0.9, alpha=0.9)
        ax.plot([ca, xb], [ra, rb], "o", color=colour, ms=2.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if label:
        ax.set_ylabel(label, fontsize=8)


def draw_correspondences(
    img_a: np.ndarray,
    img_b: np.ndarray,
    matches: Matches,
    path: str | Path,
    title: str = "Eve: dense correspondence (top matches by cosine similarity)",
    dpi: int = MIN_DPI,
) -> Path:
    """Images side by side (A left, B right), each match a line coloured by its similarity."""
    fig = new_figure(8.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    _panel(ax, np.asarray(img_a, np.float32), np.asarray(img_b, np.float32), matches, None)
    if len(matches.similarity):
        sim = matches.similarity
        ax.set_xlabel(f"{len(sim)} matches, cosine {sim.min():.2f}..{sim.max():.2f}", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi)


def display_to_voxel(view: str, shape: Sequence[int], centre: Sequence[int], rc: np.ndarray) -> np.ndarray:
    """(N, 3) voxel (x, y, z) coordinates of (row, col) points of ``oriented_slice(vol, view, centre)``
    (its inverse: the slice is the volume's plane, both axes reversed, transposed)."""
    rc = np.asarray(rc, np.float64).reshape(-1, 2)
    x, y, z = (float(v) for v in centre)
    nx, ny, nz = (int(s) for s in shape)
    r, c = rc[:, 0], rc[:, 1]
    if view == "axial":
        return np.stack([nx - 1 - c, ny - 1 - r, np.full_like(r, z)], 1)
    if view == "coronal":
        return np.stack([nx - 1 - c, np.full_like(r, y), nz - 1 - r], 1)
    return np.stack([np.full_like(r, x), ny - 1 - c, nz - 1 - r], 1)


def orthogonal_feature_slices(
    volume: np.ndarray, features: torch.Tensor, centre: Sequence[int]
) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    """``{view: (image slice, feature slice (F, rows, cols))}`` through voxel ``centre`` of
    ``volume`` (x, y, z) and its feature grid ``features`` (F, gx, gy, gz), both oriented as
    ``asa3d.data.montage`` shows slices."""
    grid = features.shape[1:]
    cell = [min(int(c * g / s), g - 1) for c, g, s in zip(centre, grid, volume.shape, strict=True)]
    out = {}
    for view in ("axial", "coronal", "sagittal"):
        img = np.ascontiguousarray(oriented_slice(volume, view, centre))
        fs = torch.stack(
            [torch.from_numpy(np.ascontiguousarray(oriented_slice(f, view, cell))) for f in features.numpy()]
        )
        out[view] = (img, fs)
    return out


def draw_correspondences_3d(
    vol_a: np.ndarray,
    vol_b: np.ndarray,
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    centre_a: Sequence[int],
    centre_b: Sequence[int],
    path: str | Path,
    top_k: int = 12,
    mutual: bool = True,
    title: str = "Eve 3D: dense correspondence on orthogonal slices",
    dpi: int = MIN_DPI,
) -> tuple[Path, dict[str, Matches]]:
    """Match and draw, one row per view, the slices through ``centre_a`` / ``centre_b``."""
    sa = orthogonal_feature_slices(vol_a, feat_a.cpu(), centre_a)
    sb = orthogonal_feature_slices(vol_b, feat_b.cpu(), centre_b)
    fig = new_figure(7.0, 9.0)
    axes = fig.subplots(3, 1)
    found = {}
    for ax, view in zip(axes, ("axial", "coronal", "sagittal"), strict=True):
        (ia, fa), (ib, fb) = sa[view], sb[view]
        m = match_features(fa, fb, ia.shape, ib.shape, top_k=top_k, mutual=mutual)
        found[view] = m
        _panel(ax, ia, ib, m, view)
    axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi), found


def window_features(
    enc: EveEncoder, image: torch.Tensor, size_px: np.ndarray, n: int, centre: Sequence[float] | None = None
) -> torch.Tensor:
    """Dense Eve by sliding windows: crop embeddings on an n^D grid of cell centres (the centres
    ``match_features`` assumes), as a feature grid (F, n, ...). 2D: the whole grid. 3D: only the
    three orthogonal planes through ``centre`` (voxel coordinates) are computed, each crop centred
    on that plane (the rest of the grid is zero): what ``draw_correspondences_3d`` reads."""
    shape = tuple(int(s) for s in image.shape[1:])
    axes = [(np.arange(n) + 0.5) * (s / n) - 0.5 for s in shape]
    if len(shape) == 2:
        centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
        vec = crop_embeddings(enc, image, centres, size_px[None])
        return vec.T.reshape(vec.shape[1], n, n)
    c = np.asarray(centre if centre is not None else [(s - 1) / 2 for s in shape], np.float64)
    cell = [min(int(c[d] * n / shape[d]), n - 1) for d in range(3)]
    idx, pts = [], []
    for d in range(3):  # the plane normal to axis d, crops centred on the slice through c
        others = [a for a in range(3) if a != d]
        for i in range(n):
            for j in range(n):
                p = np.empty(3)
                p[d], p[others[0]], p[others[1]] = c[d], axes[others[0]][i], axes[others[1]][j]
                ix = [0, 0, 0]
                ix[d], ix[others[0]], ix[others[1]] = cell[d], i, j
                idx.append(tuple(ix))
                pts.append(p)
    vec = crop_embeddings(enc, image, np.stack(pts), size_px[None])
    out = torch.zeros(vec.shape[1], n, n, n)
    for k, (a, b, cc) in enumerate(idx):
        out[:, a, b, cc] = vec[k]
    return out


def draw_correspondence_grid(
    panels: Sequence[Sequence[tuple]],
    path: str | Path,
    title: str,
    column_titles: Sequence[str] | None = None,
    caption: str | None = None,
    dpi: int = MIN_DPI,
) -> Path:
    """Rows x columns of side-by-side pairs (``panels[row][col]`` = (row label, image A, image B,
    matches[, note])), each match a line coloured by its cosine (viridis, per panel's range)."""
    rows, cols = len(panels), max(len(r) for r in panels)
    fig = new_figure(4.6 * cols, 2.5 * rows + 0.9)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for r, row in enumerate(panels):
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(row):
                ax.axis("off")
                continue
            label, ia, ib, m, *note = row[c]
            _panel(ax, np.asarray(ia, np.float32), np.asarray(ib, np.float32), m, label if c == 0 else None)
            text = (
                f"{len(m.similarity)} mutual best matches, "
                f"cosine {m.similarity.min():.2f}..{m.similarity.max():.2f}"
                if len(m.similarity)
                else "no mutual matches"
            )
            ax.set_xlabel("; ".join([text, *note]), fontsize=7)
            if r == 0 and column_titles:
                ax.set_title(column_titles[c], fontsize=9)
    fig.suptitle(title, fontsize=10)
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.04 if caption else 0, 1, 0.97))
    return save_png(fig, path, dpi)

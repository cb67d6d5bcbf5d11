"""2D slices of a cached CT volume (array axes (x, y, z), RAS) for 2D methods.

Slices are oriented the radiological way, as ``asa3d.data.montage`` shows them (rows top to
bottom of the screen): axial with anterior on top and the patient's right on the left; coronal
with superior on top and the patient's right on the left (the layout of a frontal chest
radiograph); sagittal with superior on top and anterior on the left. Pure functions: the data
layer's sampling decides which volumes and how many slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from asa3d.data.montage import oriented_slice

__all__ = ["VIEW_AXIS", "draw_slices", "volume_slice"]

VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the volume axis each view holds fixed


def volume_slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """The ``view`` slice at ``index`` along its fixed axis, oriented for display (a copy)."""
    if volume.ndim != 3:
        raise ValueError(f"expected an (x, y, z) volume, got shape {tuple(volume.shape)}")
    if view not in VIEW_AXIS:
        raise ValueError(f"view {view!r}: use one of {sorted(VIEW_AXIS)}")
    axis = VIEW_AXIS[view]
    if not 0 <= index < volume.shape[axis]:
        raise ValueError(f"{view} index {index} outside 0..{volume.shape[axis] - 1}")
    c = [0, 0, 0]
    c[axis] = int(index)
    return np.ascontiguousarray(oriented_slice(volume, view, c))


def draw_slices(
    volume: np.ndarray,
    n: int,
    rng: np.random.Generator,
    views: Sequence[str] = ("axial", "coronal", "sagittal"),
    margin: float = 0.1,
) -> list[tuple[str, int, np.ndarray]]:
    """``n`` slices, each of a uniformly chosen view and a uniformly chosen index that leaves
    ``margin`` (fraction of the axis) out at both ends (the edges of a body crop are mostly air).
    Returns ``(view, index, slice)`` triples; seeded by ``rng`` (e.g. ``default_rng([seed, epoch, i])``)."""
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin={margin} must lie in [0, 0.5)")
    out = []
    for _ in range(n):
        view = views[int(rng.integers(len(views)))]
        length = volume.shape[VIEW_AXIS[view]]
        lo = int(np.floor(margin * length))
        hi = max(lo + 1, length - lo)
        idx = int(rng.integers(lo, hi))
        out.append((view, idx, volume_slice(volume, view, idx)))
    return out

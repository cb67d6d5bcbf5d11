"""Landmarks for Eve's pictures: centroids of labelled structures, in pixel (voxel) coordinates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["label_landmarks", "mask_landmarks"]


def mask_landmarks(
    masks: np.ndarray,
    names: Sequence[str],
    wanted: Sequence[str] | None = None,
    min_pixels: int = 4,
    counts: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """``{name: centroid}`` of the channels of a multi-label ``masks`` (C, *spatial), e.g. a DRR's
    projected organs, in ``wanted`` order. Centroids are float (D,) in array index order;
    structures with fewer than ``min_pixels`` pixels are left out; ``counts`` receives the pixel
    count of each structure kept."""
    if masks.shape[0] != len(names):
        raise ValueError(f"{masks.shape[0]} mask channels but {len(names)} names")
    out = {}
    for name in wanted if wanted is not None else names:
        if name in names:
            pts = np.argwhere(masks[list(names).index(name)] > 0)
            if len(pts) >= min_pixels:
                out[name] = pts.mean(0)
                if counts is not None:
                    counts[name] = len(pts)
    return out


def label_landmarks(
    label: np.ndarray,
    names: Mapping[int, str],
    wanted: Sequence[str] | None = None,
    min_pixels: int = 4,
    counts: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """The same for an integer label map (*spatial) with class ``names`` (e.g. a CT's organs)."""
    index = {v: k for k, v in names.items() if k != 0}
    out = {}
    for name in wanted if wanted is not None else list(index):
        if name in index:
            pts = np.argwhere(label == index[name])
            if len(pts) >= min_pixels:
                out[name] = pts.mean(0)
                if counts is not None:
                    counts[name] = len(pts)
    return out

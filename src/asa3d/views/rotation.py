"""Swin UNETR SSL rotations: each sample turned by k * 90 degrees in one plane, k its label.

Tang et al. (CVPR 2022) train a 4-way rotation classifier. The released pretraining code rotates a
(C, X, Y, Z) sample over tensor dims (2, 3): the plane of spatial axes 1 and 2, i.e. about axis
0 (left-right after RAS orientation). The paper's text says "along the z axis", which in MONAI's
(x, y, z) layout is the plane of axes 0 and 1. asa3d's default is the code's plane (``sagittal``),
which produced the released weights; ``axial`` is the paper's reading. ``torch.rot90`` turns from
the plane's first axis towards its second; both need a square cross-section in the plane.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["ROTATION_PLANES", "random_rotations", "rotate90", "unrotate"]

RotationPlane = Literal["sagittal", "axial"]
# Spatial axes of the rotation plane (dims 2 + axis of a (B, C, X, Y, Z) batch).
ROTATION_PLANES: dict[str, tuple[int, int]] = {"sagittal": (1, 2), "axial": (0, 1)}


def _dims(plane: str, x: torch.Tensor) -> tuple[int, int]:
    if plane not in ROTATION_PLANES:
        raise ValueError(f"rotation plane {plane!r}: use one of {sorted(ROTATION_PLANES)}")
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, X, Y, Z), got shape {tuple(x.shape)}")
    a, b = (2 + d for d in ROTATION_PLANES[plane])
    if x.shape[a] != x.shape[b]:
        raise ValueError(
            f"rotating in the {plane} plane needs equal sizes on spatial axes {ROTATION_PLANES[plane]}, "
            f"got {tuple(x.shape[2:])}"
        )
    return a, b


def rotate90(x: torch.Tensor, k: torch.Tensor, plane: RotationPlane = "sagittal") -> torch.Tensor:
    """Sample i of ``x`` (B, C, X, Y, Z) turned by ``k[i]`` quarter turns (any integer, mod 4)."""
    dims = _dims(plane, x)
    k = k.to(device=x.device, dtype=torch.long).remainder(4)
    if k.shape != (x.shape[0],):
        raise ValueError(f"need one rotation per sample: k {tuple(k.shape)} for batch {x.shape[0]}")
    out = x.clone()
    for r in (1, 2, 3):  # one batched rot90 per class instead of one per sample
        idx = (k == r).nonzero().flatten()
        if idx.numel():
            out[idx] = torch.rot90(x[idx], r, dims)
    return out


def unrotate(x: torch.Tensor, k: torch.Tensor, plane: RotationPlane = "sagittal") -> torch.Tensor:
    """Inverse of ``rotate90``: turn every sample back by its label."""
    return rotate90(x, -k.to(torch.long), plane)


def random_rotations(
    x: torch.Tensor, plane: RotationPlane = "sagittal", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent uniform k in {0, 1, 2, 3} per sample; returns (rotated, labels (B,) long)."""
    gdev = generator.device if generator is not None else x.device
    k = torch.randint(0, 4, (x.shape[0],), device=gdev, generator=generator).to(x.device)
    return rotate90(x, k, plane), k

"""F_src: two grid-aligned crops of one upsampled volume, with their overlap masks (ASA P2/P3).

The volume (already resized to S2 = S + M*p) gives two S^3 crops with origins p*a and p*b,
each a_j, b_j drawn independently and uniformly from {0..M} per axis and per crop. Offsets are
multiples of p, so the two token grids are exactly aligned. The masks flag, in raster order (axis
2 fastest, as the tokens), the cells inside the shared box; the true rows of ``mask1`` and of
``mask2`` list the same physical cells in the same order, so ``tokens1[mask1]`` and
``tokens2[mask2]`` are matched pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asa3d.views.shuffle import block_coords

__all__ = ["CropPair", "overlap_masks", "related_crops"]


@dataclass
class CropPair:
    crop1: torch.Tensor  # (B, C, S, S, S)
    crop2: torch.Tensor  # (B, C, S, S, S)
    offset1: torch.Tensor  # (B, 3) long, in cells (multiply by p for voxels)
    offset2: torch.Tensor  # (B, 3) long
    mask1: torch.Tensor  # (B, N) bool, raster order
    mask2: torch.Tensor  # (B, N) bool


def overlap_masks(a: torch.Tensor, b: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks over the G^3 cells of crops with cell offsets a, b (each (B, 3)) of the shared box."""
    coords = block_coords(g, a.device)[None]  # (1, N, 3)
    lo = torch.maximum(a, b)[:, None]  # (B, 1, 3), global cells
    hi = (torch.minimum(a, b) + g)[:, None]

    def inside(off: torch.Tensor) -> torch.Tensor:
        cell = coords + off[:, None]
        return ((cell >= lo) & (cell < hi)).all(-1)

    return inside(a), inside(b)


def related_crops(
    volume: torch.Tensor,
    size: int,
    p: int,
    max_offset_cells: int,
    generator: torch.Generator | None = None,
) -> CropPair:
    """Draw two crops of ``size``^3 from ``volume`` (B, C, S2, S2, S2), S2 >= size + M*p."""
    if volume.ndim != 5:
        raise ValueError(f"expected (B, C, X, Y, Z), got shape {tuple(volume.shape)}")
    if size % p:
        raise ValueError(f"crop size {size} is not divisible by the sub-volume size {p}")
    g = size // p
    m = int(max_offset_cells)
    if not 0 <= m < g:
        raise ValueError(f"max_offset_cells={m} must lie in [0, G-1] = [0, {g - 1}] or crops may not overlap")
    need = size + m * p
    if any(s < need for s in volume.shape[2:]):
        raise ValueError(f"volume {tuple(volume.shape[2:])} is smaller than size + M*p = {need}")
    bsz = volume.shape[0]
    dev = volume.device
    # Draw on the generator's device (CPU unless a device generator is given), then move.
    gdev = generator.device if generator is not None else dev
    a = torch.randint(0, m + 1, (bsz, 3), device=gdev, generator=generator).to(dev)
    b = torch.randint(0, m + 1, (bsz, 3), device=gdev, generator=generator).to(dev)

    def crop(off: torch.Tensor) -> torch.Tensor:
        o = (off * p).tolist()
        return torch.stack(
            [volume[i, :, x : x + size, y : y + size, z : z + size] for i, (x, y, z) in enumerate(o)]
        )

    mask1, mask2 = overlap_masks(a, b, g)
    return CropPair(crop1=crop(a), crop2=crop(b), offset1=a, offset2=b, mask1=mask1, mask2=mask2)

"""SimMIM-3D masks: random cells of ``cell_size``^3 voxels, an exact count masked per sample.

The ASA supplement's SimMIM baseline masks 16^3 cells of a 128^3 volume at 50 %: an 8^3 = 512 cell
grid with exactly ceil(0.5 * 512) = 256 cells masked in every sample (SimMIM's official mask
generator also draws a fixed count, not a Bernoulli mask). Cells are raster-ordered like the
tokens (axis 2 fastest). One cell covers ``cell_size / patch_size`` tokens per axis after the patch
embedding and ``cell_size`` voxels per axis, so the token and voxel masks are the cell mask
upsampled by those factors (``upsample_mask``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "MaskedView",
    "cell_grid",
    "fill_masked",
    "masked_count",
    "random_cell_mask",
    "simmim_view",
    "upsample_mask",
]

MaskFill = Literal["zero", "mean"]


def cell_grid(spatial_shape: Sequence[int], cell_size: int) -> tuple[int, int, int]:
    """Cells per axis of a volume; every axis must be a multiple of ``cell_size``."""
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3:
        raise ValueError(f"expected 3 spatial dims, got {shape}")
    if cell_size < 1 or any(s % cell_size for s in shape):
        raise ValueError(f"spatial shape {shape} is not divisible by the mask cell size {cell_size}")
    return shape[0] // cell_size, shape[1] // cell_size, shape[2] // cell_size


def masked_count(num_cells: int, ratio: float) -> int:
    """Cells masked per sample: ceil(ratio * N), as SimMIM's mask generator (tolerant to float noise)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} must lie in (0, 1)")
    return min(num_cells, max(1, math.ceil(ratio * num_cells - 1e-9)))


def random_cell_mask(
    batch: int,
    grid: Sequence[int],
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, G0, G1, G2) bool: exactly ``masked_count(G0*G1*G2, ratio)`` true cells per sample,
    drawn uniformly and independently per sample (drawn on the generator's device, then moved)."""
    g = tuple(int(v) for v in grid)
    n = g[0] * g[1] * g[2]
    k = masked_count(n, ratio)
    gdev = generator.device if generator is not None else (device or "cpu")
    chosen = torch.argsort(torch.rand(batch, n, device=gdev, generator=generator), dim=1)[:, :k]
    mask = torch.zeros(batch, n, dtype=torch.bool, device=gdev)
    mask.scatter_(1, chosen, True)
    return mask.reshape(batch, *g).to(device if device is not None else gdev)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, G0, G1, G2) -> (B, G0*f, G1*f, G2*f): every cell repeated f times per axis."""
    if mask.ndim != 4:
        raise ValueError(f"expected a (B, G0, G1, G2) mask, got shape {tuple(mask.shape)}")
    if factor < 1:
        raise ValueError(f"upsampling factor must be >= 1, got {factor}")
    out = mask
    for dim in (1, 2, 3):
        out = out.repeat_interleave(factor, dim=dim)
    return out


def fill_masked(x: torch.Tensor, voxel_mask: torch.Tensor, fill: MaskFill = "zero") -> torch.Tensor:
    """``x`` (B, C, X, Y, Z) with the voxels of ``voxel_mask`` (B, X, Y, Z) replaced.

    ``zero``: 0, which in asa3d's [0, 1] intensity space is the lower end of the HU window (e.g.
    -175 HU soft tissue for ASA's window). ``mean``: each volume's mean over its VISIBLE voxels
    (a mean over all voxels would let the masked content leak into the fill value).
    """
    if voxel_mask.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"mask {tuple(voxel_mask.shape)} does not match volume {tuple(x.shape)}")
    m = voxel_mask[:, None].to(x.dtype)
    if fill == "zero":
        value = torch.zeros((), dtype=x.dtype, device=x.device)
    elif fill == "mean":
        keep = 1 - m
        value = (x * keep).sum(dim=(1, 2, 3, 4), keepdim=True) / (
            keep.sum(dim=(1, 2, 3, 4), keepdim=True) * x.shape[1]
        ).clamp_min(1)
    else:
        raise ValueError(f"mask fill {fill!r}: use 'zero' or 'mean'")
    return x * (1 - m) + value * m


@dataclass
class MaskedView:
    x_masked: torch.Tensor  # (B, C, X, Y, Z): masked voxels filled
    cell_mask: torch.Tensor  # (B, G0, G1, G2) bool
    token_mask: torch.Tensor  # (B, X/patch, Y/patch, Z/patch) bool
    voxel_mask: torch.Tensor  # (B, X, Y, Z) bool


def simmim_view(
    x: torch.Tensor,
    cell_size: int = 16,
    ratio: float = 0.5,
    patch_size: int = 2,
    fill: MaskFill = "zero",
    generator: torch.Generator | None = None,
) -> MaskedView:
    """The SimMIM-3D view of a batch (B, C, X, Y, Z): a random cell mask at token and voxel scale."""
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, X, Y, Z), got shape {tuple(x.shape)}")
    if cell_size % patch_size:
        raise ValueError(f"mask cell size {cell_size} must be a multiple of the patch size {patch_size}")
    grid = cell_grid(x.shape[2:], cell_size)
    cells = random_cell_mask(x.shape[0], grid, ratio, generator, x.device)
    voxels = upsample_mask(cells, cell_size)
    return MaskedView(
        x_masked=fill_masked(x, voxels, fill),
        cell_mask=cells,
        token_mask=upsample_mask(cells, cell_size // patch_size),
        voxel_mask=voxels,
    )

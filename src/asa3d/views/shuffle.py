"""F_perm: shuffle the p^3 sub-volumes of a cube (ASA phase 1).

Blocks and tokens share one raster order, axis 2 fastest: block r = (i0 * G + i1) * G + i2 sits
at voxels [i0*p:(i0+1)*p, i1*p:(i1+1)*p, i2*p:(i2+1)*p], exactly where SwinUNETR's stage-k token
r (flattening (B, C, G, G, G) over its spatial dims) sits when p = patch_size * 2**k.

Convention: ``x_perm`` block k holds the content of source block ``perm[k]``; the order target of
token k is the grid coordinate that content came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ShuffleResult", "block_coords", "from_blocks", "shuffle_blocks", "to_blocks", "unshuffle"]


@dataclass
class ShuffleResult:
    x_perm: torch.Tensor  # (B, C, S, S, S)
    perm: torch.Tensor  # (B, N) long: source block of each position
    target3d: torch.Tensor  # (B, N, 3) source coordinates scaled to [-3, 3]
    target1d: torch.Tensor  # (B, N) source raster index scaled to [-3, 3]


def block_coords(g: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, 3) long grid coordinates (i0, i1, i2) of the N = g^3 blocks in raster order."""
    r = torch.arange(g, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def _grid(x: torch.Tensor, p: int) -> tuple[int, int, int]:
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, X, Y, Z), got shape {tuple(x.shape)}")
    if any(s % p for s in x.shape[2:]):
        raise ValueError(f"spatial shape {tuple(x.shape[2:])} is not divisible by the sub-volume size {p}")
    return tuple(s // p for s in x.shape[2:])  # type: ignore[return-value]


def to_blocks(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, G0*p, G1*p, G2*p) -> (B, N, C, p, p, p), blocks in raster order."""
    g0, g1, g2 = _grid(x, p)
    b, c = x.shape[:2]
    x = x.reshape(b, c, g0, p, g1, p, g2, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, g0 * g1 * g2, c, p, p, p)


def from_blocks(blocks: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of ``to_blocks``."""
    b, n, c, p = blocks.shape[:4]
    g0, g1, g2 = grid
    x = blocks.reshape(b, g0, g1, g2, c, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, c, g0 * p, g1 * p, g2 * p)


def _random_perm(
    b: int, n: int, ratio: float, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, N) permutations, fresh per sample; with ratio < 1 only round(ratio*N) random positions
    are shuffled among themselves, the rest stay in place."""
    out_device = device
    device = generator.device if generator is not None else device  # draw where the generator lives
    k = n if ratio >= 1.0 else int(round(ratio * n))
    if k >= n:
        return torch.argsort(torch.rand(b, n, device=device, generator=generator), dim=1).to(out_device)
    perm = torch.arange(n, device=device).repeat(b, 1)
    if k < 2:
        return perm.to(out_device)
    chosen = torch.argsort(torch.rand(b, n, device=device, generator=generator), dim=1)[:, :k]
    order = torch.argsort(torch.rand(b, k, device=device, generator=generator), dim=1)
    perm.scatter_(1, chosen, chosen.gather(1, order))
    return perm.to(out_device)


def shuffle_blocks(
    x: torch.Tensor, p: int, perm_ratio: float = 1.0, generator: torch.Generator | None = None
) -> ShuffleResult:
    """F_perm on a cube batch (B, C, S, S, S) with sub-volume size ``p`` (G = S/p per axis)."""
    g0, g1, g2 = _grid(x, p)
    if not (g0 == g1 == g2) or g0 < 2:
        raise ValueError(f"F_perm needs a cube with at least 2 sub-volumes per axis, got grid {(g0, g1, g2)}")
    if not 0.0 < perm_ratio <= 1.0:
        raise ValueError(f"perm_ratio={perm_ratio} must lie in (0, 1]")
    g = g0
    n = g**3
    b = x.shape[0]
    perm = _random_perm(b, n, perm_ratio, x.device, generator)
    blocks = to_blocks(x, p)
    x_perm = from_blocks(blocks[torch.arange(b, device=x.device)[:, None], perm], (g, g, g))
    coords = block_coords(g, x.device)
    target3d = coords[perm].to(torch.float32) * (6.0 / (g - 1)) - 3.0
    target1d = perm.to(torch.float32) * (6.0 / (n - 1)) - 3.0
    return ShuffleResult(x_perm=x_perm, perm=perm, target3d=target3d, target1d=target1d)


def unshuffle(x_perm: torch.Tensor, perm: torch.Tensor, p: int) -> torch.Tensor:
    """Put every block back at its source position (the inverse of ``shuffle_blocks``)."""
    grid = _grid(x_perm, p)
    inv = torch.argsort(perm, dim=1)
    blocks = to_blocks(x_perm, p)
    b = x_perm.shape[0]
    return from_blocks(blocks[torch.arange(b, device=x_perm.device)[:, None], inv], grid)


def perm_from_target3d(target3d: torch.Tensor, g: int) -> torch.Tensor:
    """Recover the (B, N) source indices from scaled 3D targets (rounding to the grid)."""
    c = torch.round((target3d + 3.0) * (g - 1) / 6.0).long()
    return (c[..., 0] * g + c[..., 1]) * g + c[..., 2]

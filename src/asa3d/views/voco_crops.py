"""VoCo views (Wu et al., CVPR 2024): n x n base crops, random crops, overlap-area position labels.

The volume, resized to (n*b, n*b, Z) (the supplement: 384 x 384 x 64 with n = 4, b = 96), is tiled
in the x-y plane into n*n non-overlapping base crops of b x b x Z (z is not split). Base k = i*n + j
covers x in [i*b, (i+1)*b) and y in [j*b, (j+1)*b). A random crop of the same size has its
centre drawn uniformly over the integers in [b/2, n*b - b/2) on x and y (z centred, so the whole
depth), i.e. its corner over [0, (n-1)*b): it lies inside the plane and touches at most 4 bases.
Its position label over the bases is y_k = (x-y overlap area with base k) / b^2, which sums to 1.
Every crop is then resized to ``out_size``^3 (trilinear, the released code's mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asa3d.views.rotation import rotate90

__all__ = [
    "VoCoViews",
    "augment_crops",
    "base_crops",
    "crop_at",
    "overlap_labels",
    "random_corners",
    "voco_views",
]


@dataclass
class VoCoViews:
    bases: torch.Tensor  # (B, n*n, C, o, o, o)
    crops: torch.Tensor  # (B, sw, C, o, o, o)
    labels: torch.Tensor  # (B, sw, n*n) float, rows sum to 1
    corners: torch.Tensor  # (B, sw, 2) long: x, y corner of each random crop in the resized plane


def _base_side(x: torch.Tensor, n: int) -> int:
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, X, Y, Z), got shape {tuple(x.shape)}")
    sx, sy = x.shape[2], x.shape[3]
    if n < 1 or sx != sy or sx % n:
        raise ValueError(f"VoCo needs a square x-y plane divisible by n={n}, got {tuple(x.shape[2:])}")
    return sx // n


def base_crops(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, n*b, n*b, Z) -> (B, n*n, C, b, b, Z), base k = i*n + j at x-tile i, y-tile j."""
    b = _base_side(x, n)
    bsz, c, _, _, z = x.shape
    t = x.reshape(bsz, c, n, b, n, b, z).permute(0, 2, 4, 1, 3, 5, 6)
    return t.reshape(bsz, n * n, c, b, b, z)


def random_corners(
    batch: int, num: int, n: int, b: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """(B, num, 2) long corners uniform over [0, (n-1)*b] (centres over [b/2, n*b - b/2))."""
    gdev = generator.device if generator is not None else (device or "cpu")
    hi = (n - 1) * b  # centre b/2 + corner < n*b - b/2 <=> corner < (n-1)*b
    if hi == 0:
        return torch.zeros(batch, num, 2, dtype=torch.long, device=device)
    c = torch.randint(0, hi, (batch, num, 2), device=gdev, generator=generator)
    return c.to(device if device is not None else gdev)


def overlap_labels(corners: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """(B, sw, 2) corners -> (B, sw, n*n): overlap area of each crop with each base over b^2."""
    lo = torch.arange(n, device=corners.device) * b  # base tile starts, per axis
    c = corners[..., None]  # (B, sw, 2, 1)
    ov = (torch.minimum(c + b, lo + b) - torch.maximum(c, lo)).clamp_min(0)  # (B, sw, 2, n)
    area = ov[:, :, 0, :, None] * ov[:, :, 1, None, :]  # (B, sw, n_i, n_j)
    return area.flatten(2).to(torch.float32) / float(b * b)


def crop_at(x: torch.Tensor, corners: torch.Tensor, b: int) -> torch.Tensor:
    """(B, C, X, Y, Z) and (B, sw, 2) corners -> (B, sw, C, b, b, Z)."""
    rows = []
    for i, per in enumerate(corners.tolist()):
        rows.append(torch.stack([x[i, :, cx : cx + b, cy : cy + b, :] for cx, cy in per]))
    return torch.stack(rows)


def _resize(t: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, K, C, b, b, Z) -> (B, K, C, o, o, o), trilinear."""
    bsz, k = t.shape[:2]
    flat = t.flatten(0, 1).float()
    if tuple(flat.shape[2:]) != (out_size,) * 3:
        flat = F.interpolate(flat, size=(out_size,) * 3, mode="trilinear", align_corners=False)
    return flat.reshape(bsz, k, *flat.shape[1:])


def voco_views(
    x: torch.Tensor,
    n: int = 4,
    num_crops: int = 4,
    out_size: int = 64,
    generator: torch.Generator | None = None,
) -> VoCoViews:
    """Base crops, ``num_crops`` random crops per volume and their position labels."""
    b = _base_side(x, n)
    corners = random_corners(x.shape[0], num_crops, n, b, generator, x.device)
    return VoCoViews(
        bases=_resize(base_crops(x, n), out_size),
        crops=_resize(crop_at(x, corners, b), out_size),
        labels=overlap_labels(corners, n, b),
        corners=corners,
    )


def augment_crops(
    t: torch.Tensor,
    p_flip: float = 0.2,
    p_rot: float = 0.2,
    p_shift: float = 0.1,
    shift_offset: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Independent per crop of (M, C, o, o, o), bases included (the released code's probabilities):
    a flip per axis with p_flip, k in {1, 2, 3} quarter turns in the axial plane with p_rot, and an
    intensity shift by U(-offset, offset) with p_shift."""
    if t.ndim != 5:
        raise ValueError(f"expected (M, C, X, Y, Z), got shape {tuple(t.shape)}")
    m = t.shape[0]
    gdev = generator.device if generator is not None else torch.device("cpu")

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=gdev).to(t.device)

    out = t
    flips = draw(m, 3) < p_flip
    for axis in range(3):
        idx = flips[:, axis].nonzero().flatten()
        if idx.numel():
            out = out.clone() if out is t else out
            out[idx] = out[idx].flip(2 + axis)
    rot = draw(m) < p_rot
    k = torch.where(
        rot, 1 + (draw(m) * 3).long().clamp_max(2), torch.zeros(m, dtype=torch.long, device=t.device)
    )
    out = rotate90(out, k, "axial")
    shift = torch.where(draw(m) < p_shift, (draw(m) * 2 - 1) * shift_offset, torch.zeros(m, device=t.device))
    return out + shift.to(out.dtype)[:, None, None, None, None]

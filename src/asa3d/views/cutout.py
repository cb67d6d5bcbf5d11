"""Swin UNETR SSL inpainting views: random boxes cut out of each sample (Tang et al., CVPR 2022).

As the released pretraining code does it, per sample of shape (X, Y, Z):
1. draw a target fraction f ~ U(0, ``max_fraction``) (0.3);
2. draw boxes until their summed volume reaches f * X*Y*Z (overlaps count twice, so the voxel
   fraction really cut out is lower): corner uniform in [0, S - floor(``min_side`` * S)), side
   uniform in [floor(``min_side`` * S), floor(``max_side`` * S)) (0.05 and 0.25 of each axis),
   clipped to the volume; the box is filled with Gaussian noise min-max scaled to [0, 1];
3. ``partner``: draw j uniformly over the batch; if j != i, a second pass with a fresh f pastes
   boxes copied from sample j at the same coordinates. The code copies from a sample that may
   already carry its own noise (it edits the batch in place, samples in order); asa3d copies from
   the clean input by default, ``partner_source="in_place"`` reproduces the code.

The box volume counted towards f is the clipped one (the voxels actually written). Both passes are
switches (``noise`` and ``partner``). Python loops draw the boxes (a few dozen per sample, each a
slice assignment); no library offers this sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["CutoutResult", "cutout"]


@dataclass
class CutoutResult:
    x: torch.Tensor  # (B, C, X, Y, Z): the cut-out views
    mask: torch.Tensor  # (B, X, Y, Z) bool: voxels inside any box (noise or pasted)


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, device=_gdev(generator)))


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    if hi <= lo:
        return lo
    return int(torch.randint(lo, hi, (), generator=generator, device=_gdev(generator)))


def _gdev(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _boxes(
    shape: tuple[int, int, int],
    fraction: float,
    min_side: float,
    max_side: float,
    generator: torch.Generator | None,
) -> list[tuple[slice, slice, slice]]:
    """Boxes (as slices) whose summed clipped volume first reaches ``fraction`` of the volume."""
    target = fraction * math.prod(shape)
    lo = [max(1, math.floor(min_side * s)) for s in shape]
    hi = [max(lo[a] + 1, math.floor(max_side * s)) for a, s in enumerate(shape)]
    total, out = 0, []
    while total < target:
        box = []
        for a, s in enumerate(shape):
            start = _randint(0, s - lo[a], generator)
            side = _randint(lo[a], hi[a], generator)
            box.append(slice(start, min(s, start + side)))
        out.append(tuple(box))
        total += math.prod(b.stop - b.start for b in box)
    return out


def cutout(
    x: torch.Tensor,
    max_fraction: float = 0.3,
    min_side: float = 0.05,
    max_side: float = 0.25,
    noise: bool = True,
    partner: bool = True,
    partner_source: Literal["clean", "in_place"] = "clean",
    generator: torch.Generator | None = None,
) -> CutoutResult:
    """Cut-out views of a batch (B, C, X, Y, Z); ``x`` itself is not modified."""
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, X, Y, Z), got shape {tuple(x.shape)}")
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"cutout max_fraction={max_fraction} must lie in [0, 1]")
    if not 0.0 < min_side < max_side <= 1.0:
        raise ValueError(f"cutout sides need 0 < min_side < max_side <= 1, got {min_side}, {max_side}")
    if partner_source not in ("clean", "in_place"):
        raise ValueError(f"cutout partner_source {partner_source!r}: use 'clean' or 'in_place'")
    b, c = x.shape[:2]
    shape: tuple[int, int, int] = tuple(int(s) for s in x.shape[2:])  # type: ignore[assignment]
    out = x.clone()
    source = x if partner_source == "clean" else out  # in_place: samples < i are already cut
    mask = torch.zeros(b, *shape, dtype=torch.bool, device=x.device)
    for i in range(b):
        if noise:
            for box in _boxes(shape, _rand(generator) * max_fraction, min_side, max_side, generator):
                size = [c] + [s.stop - s.start for s in box]
                z = torch.randn(size, generator=generator, device=_gdev(generator)).to(x.device, x.dtype)
                z = (z - z.min()) / (z.max() - z.min()).clamp_min(1e-12)  # min-max to [0, 1]
                out[(i, slice(None), *box)] = z
                mask[(i, *box)] = True
        if partner:
            j = _randint(0, b, generator)
            if j != i:
                for box in _boxes(shape, _rand(generator) * max_fraction, min_side, max_side, generator):
                    out[(i, slice(None), *box)] = source[(j, slice(None), *box)].clone()
                    mask[(i, *box)] = True
    return CutoutResult(x=out, mask=mask)

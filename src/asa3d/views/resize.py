"""Whole-volume resize to a cube, on the training device (ASA: 128^3 for P1, 160^3 for P2).

The aspect ratio is not kept: this is a resize, not a crop. ``area`` (MONAI ``Resized``'s
default, = adaptive average pooling) behaves like nearest-neighbour upsampling on axes shorter
than the target; ``trilinear`` is the smooth alternative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["resize_volumes"]

ResizeMode = Literal["area", "trilinear"]


def _resize_one(x: torch.Tensor, size: tuple[int, int, int], mode: ResizeMode) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, C, *size), computed in fp32."""
    x = x.float()
    if tuple(x.shape[2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    if mode == "trilinear":
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    raise ValueError(f"resize mode {mode!r}: use 'area' or 'trilinear'")


def resize_volumes(
    volumes: Sequence[torch.Tensor] | torch.Tensor, size: int | Sequence[int], mode: ResizeMode = "area"
) -> torch.Tensor:
    """Resize whole volumes to one shape and stack them into (B, 1, S, S, S).

    ``volumes``: a list of (C, X, Y, Z) tensors of any shapes (whole volumes), or an already
    stacked (B, C, X, Y, Z) tensor.
    """
    shape = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(shape) != 3:
        raise ValueError(f"size must be an int or 3 ints, got {size!r}")
    if isinstance(volumes, torch.Tensor):
        if volumes.ndim != 5:
            raise ValueError(f"expected (B, C, X, Y, Z), got shape {tuple(volumes.shape)}")
        return _resize_one(volumes, shape, mode)  # type: ignore[arg-type]
    if len(volumes) == 0:
        raise ValueError("resize_volumes: empty batch")
    out = []
    for v in volumes:
        if v.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {tuple(v.shape)}")
        out.append(_resize_one(v[None], shape, mode))  # type: ignore[arg-type]
    return torch.cat(out, 0)

"""Adam's anatomy decomposer: level n splits an image into 2^n equal, non-overlapping parts.

Level n halves the spatial axes of an *axis cycle* in turn, n times. In 2D (tensor (B, C, H, W))
the cycle is columns then rows, so n = 1 is 1x2, n = 2 is 2x2, n = 3 is 2x4, n = 4 is 4x4 (rows =
2^floor(n/2), cols = 2^ceil(n/2), as in the method figure of Adam). In 3D (tensor (B, C, X, Y, Z),
a canonical body cube) the cycle is x, y, z (``split_axes="xyz"``: levels 0, 3, 6 give 1, 2x2x2,
4x4x4 parts) or x, y (``"xy"``: levels 0, 2, 4 give 1, 2x2x1, 4x4x1 columns over the full z range).

Cell boundaries along an axis of length L split into g parts sit at ``i * L // g``: the parts tile
the whole image exactly and differ in size by at most one pixel (``remainder="spread"``, the
default). ``remainder="drop"`` gives exactly equal parts of ``L // g`` and drops the last
``L % g`` pixels (what the reference code's integer division does); the two agree whenever L is
divisible by g (1024^2 chest radiographs, 128^3 canonical cubes). Boundaries of level n+k nest
inside those of level n with ``spread``, so the parts form a hierarchy.

The decomposer returns boxes, not pixels: the view generator that follows (a random resized
crop) reads each anchor from its box, so parts of unequal size never need stacking.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "SPLIT_AXES",
    "Decomposition",
    "crop_box",
    "decompose",
    "grid_shape",
    "part_boxes",
]

Remainder = Literal["spread", "drop"]
# Axis cycles (spatial-dim indices, halved in this order) by name.
SPLIT_AXES: dict[str, tuple[int, ...]] = {"wh": (1, 0), "xyz": (0, 1, 2), "xy": (0, 1)}
DEFAULT_AXES = {2: "wh", 3: "xyz"}


def _axes(spatial_dims: int, split_axes: str | Sequence[int] | None) -> tuple[int, ...]:
    if split_axes is None:
        split_axes = DEFAULT_AXES.get(spatial_dims)
        if split_axes is None:
            raise ValueError(f"spatial_dims={spatial_dims}: the decomposer handles 2D and 3D images")
    if isinstance(split_axes, str):
        if split_axes not in SPLIT_AXES:
            raise ValueError(f"split_axes {split_axes!r}: use one of {sorted(SPLIT_AXES)} or axis indices")
        axes = SPLIT_AXES[split_axes]
    else:
        axes = tuple(int(a) for a in split_axes)
    if not axes or len(set(axes)) != len(axes) or any(not 0 <= a < spatial_dims for a in axes):
        raise ValueError(f"split_axes {split_axes!r} must name distinct axes of a {spatial_dims}D image")
    return axes


def grid_shape(
    level: int, spatial_dims: int, split_axes: str | Sequence[int] | None = None
) -> tuple[int, ...]:
    """Parts per spatial axis at ``level``: the axes of the cycle are halved in turn, ``level`` times."""
    if level < 0:
        raise ValueError(f"granularity level {level} must be >= 0")
    axes = _axes(spatial_dims, split_axes)
    grid = [1] * spatial_dims
    for j in range(level):
        grid[axes[j % len(axes)]] *= 2
    return tuple(grid)


def _bounds(length: int, parts: int, remainder: Remainder) -> list[tuple[int, int]]:
    if parts > length:
        raise ValueError(f"cannot split an axis of {length} pixels into {parts} parts")
    if remainder == "spread":
        return [(i * length // parts, (i + 1) * length // parts) for i in range(parts)]
    if remainder == "drop":
        w = length // parts
        return [(i * w, (i + 1) * w) for i in range(parts)]
    raise ValueError(f"remainder {remainder!r}: use 'spread' or 'drop'")


def part_boxes(
    shape: Sequence[int],
    level: int,
    split_axes: str | Sequence[int] | None = None,
    remainder: Remainder = "spread",
) -> torch.Tensor:
    """All parts of ``shape`` (spatial only) at ``level``: (P, D, 2) long [lo, hi) boxes, raster
    order with the last spatial axis fastest."""
    grid = grid_shape(level, len(shape), split_axes)
    per_axis = [_bounds(int(n), g, remainder) for n, g in zip(shape, grid, strict=True)]
    boxes = [list(cell) for cell in itertools.product(*per_axis)]
    return torch.tensor(boxes, dtype=torch.long)


@dataclass
class Decomposition:
    """One anchor part per sample."""

    level: int
    grid: tuple[int, ...]  # parts per spatial axis
    cell: torch.Tensor  # (B,) long raster index of the chosen part
    boxes: torch.Tensor  # (B, D, 2) long [lo, hi) per spatial axis

    def crops(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The anchor pixels of each sample of ``x`` (B, C, *spatial), as (C, *part) views."""
        return [crop_box(x[i], self.boxes[i]) for i in range(x.shape[0])]

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *part) when all parts have one size (always with ``remainder='drop'``)."""
        parts = self.crops(x)
        if len({tuple(p.shape) for p in parts}) != 1:
            raise ValueError("parts differ in size (remainder='spread'); use crops() or remainder='drop'")
        return torch.stack(parts)


def crop_box(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """``x`` (C, *spatial) restricted to ``box`` (D, 2) [lo, hi)."""
    idx = (slice(None),) + tuple(slice(int(lo), int(hi)) for lo, hi in box.tolist())
    return x[idx]


def decompose(
    batch_shape: Sequence[int],
    level: int,
    split_axes: str | Sequence[int] | None = None,
    remainder: Remainder = "spread",
    generator: torch.Generator | None = None,
) -> Decomposition:
    """Choose one part uniformly per sample of a batch (B, C, *spatial) at ``level``.

    Only the shape is needed; draws use ``generator`` (CPU unless a device generator is given),
    so a seeded generator gives the same anchors on every run.
    """
    if len(batch_shape) not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, X, Y, Z), got shape {tuple(batch_shape)}")
    b, spatial = int(batch_shape[0]), tuple(int(s) for s in batch_shape[2:])
    all_boxes = part_boxes(spatial, level, split_axes, remainder)
    gdev = generator.device if generator is not None else "cpu"
    cell = torch.randint(0, all_boxes.shape[0], (b,), generator=generator, device=gdev).cpu()
    return Decomposition(
        level=level,
        grid=grid_shape(level, len(spatial), split_axes),
        cell=cell,
        boxes=all_boxes[cell],
    )

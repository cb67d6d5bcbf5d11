"""Adam's anatomy decomposer: part geometry, exact tiling, nesting, seeded batched draws."""

from __future__ import annotations

import pytest
import torch

from asa3d.views.decompose import crop_box, decompose, grid_shape, part_boxes


def _coverage(shape: tuple[int, ...], boxes: torch.Tensor) -> torch.Tensor:
    cover = torch.zeros(shape, dtype=torch.long)
    for box in boxes:
        cover[tuple(slice(int(lo), int(hi)) for lo, hi in box.tolist())] += 1
    return cover


@pytest.mark.parametrize(("level", "grid"), [(0, (1, 1)), (1, (1, 2)), (2, (2, 2)), (3, (2, 4)), (4, (4, 4))])
def test_grid_2d_follows_the_method_figure(level: int, grid: tuple[int, int]) -> None:
    assert grid_shape(level, 2) == grid  # rows = 2^floor(n/2), cols = 2^ceil(n/2)


def test_grid_3d_axis_groups() -> None:
    assert [grid_shape(n, 3, "xyz") for n in (0, 3, 6)] == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    assert [grid_shape(n, 3, "xy") for n in (0, 2, 4)] == [(1, 1, 1), (2, 2, 1), (4, 4, 1)]
    assert grid_shape(1, 3, "xyz") == (2, 1, 1)


@pytest.mark.parametrize(
    ("shape", "levels", "axes"),
    [((37, 29), (0, 2, 4), None), ((64, 64), (0, 2, 4), None), ((19, 23, 17), (0, 3, 6), "xyz"),
     ((16, 20, 9), (0, 2, 4), "xy")],
)  # fmt: skip
def test_parts_tile_their_parent_exactly(shape, levels, axes) -> None:
    prev = None
    for n in levels:
        boxes = part_boxes(shape, n, axes)
        assert boxes.shape[0] == 2**n
        assert torch.equal(_coverage(shape, boxes), torch.ones(shape, dtype=torch.long))  # no gap, no overlap
        sizes = (boxes[..., 1] - boxes[..., 0]).float()
        assert (sizes.amax(0) - sizes.amin(0)).max() <= 1  # "equal" up to one pixel of remainder
        if prev is not None:  # every finer part lies inside exactly one coarser part (a hierarchy)
            for box in boxes:
                inside = ((box[:, 0] >= prev[:, :, 0]) & (box[:, 1] <= prev[:, :, 1])).all(-1)
                assert int(inside.sum()) == 1
            # and the finer parts of each coarse part tile it
            for parent in prev:
                kids = [b for b in boxes if ((b[:, 0] >= parent[:, 0]) & (b[:, 1] <= parent[:, 1])).all()]
                assert len(kids) == 2**n // prev.shape[0]
                vol = int((parent[:, 1] - parent[:, 0]).prod())
                assert sum(int((k[:, 1] - k[:, 0]).prod()) for k in kids) == vol
        prev = boxes


def test_drop_gives_equal_parts_tiling_the_leading_box() -> None:
    shape = (37, 30)
    boxes = part_boxes(shape, 4, remainder="drop")
    assert ((boxes[..., 1] - boxes[..., 0]) == torch.tensor([9, 7])).all()
    cover = _coverage(shape, boxes)
    assert torch.equal(cover[:36, :28], torch.ones(36, 28, dtype=torch.long))
    assert cover[36:].sum() == 0 and cover[:, 28:].sum() == 0
    # identical to 'spread' when the axes divide evenly
    assert torch.equal(part_boxes((64, 32), 4, remainder="drop"), part_boxes((64, 32), 4))


@pytest.mark.parametrize(("shape", "level"), [((6, 1, 20, 24), 2), ((5, 2, 16, 12, 8), 3)])
def test_decompose_batched_and_seeded(shape, level) -> None:
    x = torch.randn(shape)
    a = decompose(shape, level, generator=torch.Generator().manual_seed(3))
    b = decompose(shape, level, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.cell, b.cell) and torch.equal(a.boxes, b.boxes)
    allb = part_boxes(shape[2:], level)
    for i, crop in enumerate(a.crops(x)):
        assert torch.equal(a.boxes[i], allb[a.cell[i]])
        assert torch.equal(crop, crop_box(x[i], allb[a.cell[i]]))
        assert crop.shape[0] == shape[1]
    assert a.stacked(x).shape[:2] == shape[:2]  # divisible shapes: equal parts stack


def test_decompose_draws_every_cell_uniformly() -> None:
    d = decompose((4000, 1, 16, 16), 4, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(d.cell, minlength=16).float()
    assert counts.min() > 0.7 * 250 and counts.max() < 1.3 * 250
    assert decompose((3, 1, 8, 8), 0).boxes.tolist() == [[[0, 8], [0, 8]]] * 3  # level 0 = whole image


def test_decompose_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="cannot split"):
        part_boxes((3, 8), 4)
    with pytest.raises(ValueError, match="split_axes"):
        grid_shape(2, 3, "xq")
    with pytest.raises(ValueError, match="B, C"):
        decompose((8, 8), 2)

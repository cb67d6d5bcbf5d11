"""View generators: F_perm (shuffle), F_src (related crops), whole-volume resize. No network."""

from __future__ import annotations

import itertools

import pytest
import torch

from asa3d.views.related_crops import overlap_masks, related_crops
from asa3d.views.resize import resize_volumes
from asa3d.views.shuffle import block_coords, perm_from_target3d, shuffle_blocks, to_blocks, unshuffle


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_block_raster_order_axis2_fastest() -> None:
    c = block_coords(3)
    assert c[:4].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]
    x = torch.zeros(1, 1, 12, 12, 12)
    x[0, 0, 4:8, 8:12, 0:4] = 1.0  # block (1, 2, 0)
    blocks = to_blocks(x, 4)
    assert blocks.flatten(2).sum(-1)[0].nonzero().flatten().tolist() == [(1 * 3 + 2) * 3 + 0]


@pytest.mark.parametrize("g", [2, 4, 8])
def test_shuffle_bijection_and_targets(g: int) -> None:
    p = 4
    x = torch.randn(3, 1, g * p, g * p, g * p)
    sh = shuffle_blocks(x, p, generator=_gen(g))
    n = g**3
    # each sample has its own permutation, and it is a bijection
    assert all(sorted(row.tolist()) == list(range(n)) for row in sh.perm)
    assert not torch.equal(sh.perm[0], sh.perm[1])
    assert torch.equal(unshuffle(sh.x_perm, sh.perm, p), x)
    # un-permuting with the perm recovered from the 3D targets restores x exactly
    assert torch.equal(unshuffle(sh.x_perm, perm_from_target3d(sh.target3d, g), p), x)
    # block k of x_perm is source block perm[k]
    src, dst = to_blocks(x, p), to_blocks(sh.x_perm, p)
    assert torch.equal(dst[1, 5], src[1, sh.perm[1, 5]])
    t = sh.target3d
    assert t.min() >= -3 and t.max() <= 3
    for axis in range(3):
        vals = torch.unique(t[..., axis])
        assert len(vals) == g
        assert torch.allclose(vals, torch.linspace(-3, 3, g))
    # 1D targets are monotone (strictly increasing) in the source index
    order = torch.argsort(sh.perm[0])
    assert torch.all(torch.diff(sh.target1d[0][order]) > 0)
    assert sh.target1d.min() == -3 and sh.target1d.max() == 3


def test_shuffle_trivial_predictor_variance() -> None:
    # The constant-0 predictor's MSE is the target variance: 3.86 at G=8 (docs/methods/asa.md), 5.0 at G=4.
    for g, expected in [(8, 3.857), (4, 5.0)]:
        sh = shuffle_blocks(torch.zeros(1, 1, 8 * g, 8 * g, 8 * g), 8, generator=_gen())
        assert sh.target3d.pow(2).mean().item() == pytest.approx(expected, abs=1e-3)


def test_perm_ratio_keeps_other_blocks() -> None:
    sh = shuffle_blocks(torch.zeros(4, 1, 32, 32, 32), 4, perm_ratio=0.25, generator=_gen())
    for row in sh.perm:
        assert sorted(row.tolist()) == list(range(512))
        assert (row != torch.arange(512)).sum() <= 128
    with pytest.raises(ValueError):
        shuffle_blocks(torch.zeros(1, 1, 32, 32, 32), 4, perm_ratio=0.0)


def test_overlap_masks_count_all_offsets() -> None:
    g, m = 8, 2
    offs = torch.tensor(list(itertools.product(range(m + 1), repeat=3)))
    a = offs.repeat_interleave(len(offs), 0)
    b = offs.repeat(len(offs), 1)
    m1, m2 = overlap_masks(a, b, g)
    expected = (g - (a - b).abs()).prod(-1)
    assert torch.equal(m1.sum(-1), expected) and torch.equal(m2.sum(-1), expected)
    assert expected.min().item() == 216 and expected.max().item() == 512
    s, p = 128, 16
    inter = expected.double() * p**3
    iou = inter / (2 * s**3 - inter)
    assert iou.min().item() == pytest.approx(96**3 / (2 * 128**3 - 96**3)) and iou.min() >= 0.267 - 1e-4
    assert iou.max().item() == 1.0


def test_related_crops_pair_same_voxels() -> None:
    p, s, m = 4, 16, 2
    s2 = s + m * p
    r = torch.arange(s2, dtype=torch.float32)
    coords = torch.stack(torch.meshgrid(r, r, r, indexing="ij"))[None].repeat(6, 1, 1, 1, 1)  # (B, 3, ...)
    pair = related_crops(coords, s, p, m, generator=_gen(3))
    g = s // p
    for i in range(6):
        b1, b2 = to_blocks(pair.crop1[i : i + 1], p)[0], to_blocks(pair.crop2[i : i + 1], p)[0]
        rows1, rows2 = b1[pair.mask1[i]], b2[pair.mask2[i]]
        assert len(rows1) == (g - (pair.offset1[i] - pair.offset2[i]).abs()).prod().item()
        assert torch.equal(rows1, rows2)  # same physical voxel coordinates, same order
        # crop origin = p * offset
        assert pair.crop1[i, :, 0, 0, 0].tolist() == (pair.offset1[i] * p).float().tolist()
    assert pair.offset1.min() >= 0 and pair.offset1.max() <= m
    with pytest.raises(ValueError):
        related_crops(coords, s, p, g)  # M must be < G


def test_resize_whole_volumes() -> None:
    vols = [torch.rand(1, 20, 30, 12), torch.rand(1, 64, 64, 64)]
    out = resize_volumes(vols, 32)
    assert out.shape == (2, 1, 32, 32, 32)
    # area on an integer factor is block averaging
    assert torch.allclose(out[1, 0, 0, 0, 0], vols[1][0, :2, :2, :2].mean())
    tri = resize_volumes(torch.stack(vols[1:]), 16, mode="trilinear")
    assert tri.shape == (1, 1, 16, 16, 16)
    with pytest.raises(ValueError):
        resize_volumes(vols, 16, mode="cubic")  # type: ignore[arg-type]

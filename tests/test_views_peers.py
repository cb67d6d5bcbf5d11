"""View generators of the peer methods: SimMIM masks, Swin SSL rotations and cut-outs, VoCo crops."""

from __future__ import annotations

import pytest
import torch

from asa3d.views.cutout import cutout
from asa3d.views.masking import (
    cell_grid,
    fill_masked,
    masked_count,
    random_cell_mask,
    simmim_view,
    upsample_mask,
)
from asa3d.views.rotation import random_rotations, rotate90, unrotate
from asa3d.views.voco_crops import (
    augment_crops,
    base_crops,
    crop_at,
    overlap_labels,
    random_corners,
    voco_views,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- SimMIM masks ------------------------------------------------------------------------------
def test_paper_mask_is_exactly_half_of_512_cells() -> None:
    assert cell_grid((128, 128, 128), 16) == (8, 8, 8)
    assert masked_count(512, 0.5) == 256
    assert masked_count(512, 0.6) == 308  # ceil(307.2), SimMIM's own default ratio
    m = random_cell_mask(5, (8, 8, 8), 0.5, _gen())
    assert m.shape == (5, 8, 8, 8) and m.dtype == torch.bool
    assert m.flatten(1).sum(1).tolist() == [256] * 5
    assert len({tuple(row.flatten().tolist()) for row in m}) == 5  # fresh per sample


def test_mask_is_seeded_by_the_generator() -> None:
    a = random_cell_mask(2, (4, 4, 4), 0.5, _gen(3))
    b = random_cell_mask(2, (4, 4, 4), 0.5, _gen(3))
    c = random_cell_mask(2, (4, 4, 4), 0.5, _gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_upsampled_masks_match_tokens_and_voxels() -> None:
    cells = random_cell_mask(2, (8, 8, 8), 0.5, _gen())
    tokens, voxels = upsample_mask(cells, 8), upsample_mask(cells, 16)
    assert tokens.shape == (2, 64, 64, 64) and voxels.shape == (2, 128, 128, 128)
    assert tokens.float().mean().item() == 0.5 and voxels.float().mean().item() == 0.5
    # cell (i, j, k) covers tokens [8i, 8i+8) ... and voxels [16i, 16i+16) ...
    for i, j, k in [(0, 0, 0), (3, 5, 7), (7, 1, 2)]:
        want = bool(cells[1, i, j, k])
        assert tokens[1, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8, 8 * k : 8 * k + 8].eq(want).all()
        assert voxels[1, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16, 16 * k : 16 * k + 16].eq(want).all()
    # the voxel mask is the token mask upsampled by the patch size
    assert torch.equal(upsample_mask(tokens, 2), voxels)


def test_simmim_view_fills_masked_voxels_only() -> None:
    x = torch.rand(2, 1, 32, 32, 32) + 0.5
    v = simmim_view(x, cell_size=8, ratio=0.5, patch_size=2, generator=_gen())
    assert v.cell_mask.shape == (2, 4, 4, 4) and v.token_mask.shape == (2, 16, 16, 16)
    m = v.voxel_mask[:, None]
    assert v.x_masked[m].eq(0).all()
    assert torch.equal(v.x_masked[~m], x[~m])
    mean = fill_masked(x, v.voxel_mask, "mean")
    for i in range(2):
        visible_mean = x[i][~v.voxel_mask[i][None]].mean()
        assert torch.allclose(mean[i][v.voxel_mask[i][None]], visible_mean)
    with pytest.raises(ValueError, match="divisible"):
        simmim_view(torch.zeros(1, 1, 30, 32, 32), cell_size=8)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        simmim_view(x, cell_size=3, patch_size=2)
    with pytest.raises(ValueError, match="ratio"):
        random_cell_mask(1, (2, 2, 2), 1.0)


# ---- rotations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("plane,dims", [("sagittal", (3, 4)), ("axial", (2, 3))])
def test_rotation_labels_match_the_applied_rotation(plane: str, dims: tuple[int, int]) -> None:
    x = torch.randn(8, 1, 6, 6, 6)
    xr, k = random_rotations(x, plane, _gen(1))  # type: ignore[arg-type]
    assert k.dtype == torch.long and set(k.tolist()) <= {0, 1, 2, 3} and len(set(k.tolist())) > 1
    for i in range(8):
        assert torch.equal(xr[i], torch.rot90(x[i : i + 1], int(k[i]), dims)[0])
    assert torch.equal(unrotate(xr, k, plane), x)  # type: ignore[arg-type]


def test_rotation_plane_of_the_code_keeps_axis0() -> None:
    # A quarter turn about spatial axis 0 (the code's plane) moves a voxel (a, b, c) to (a, S-1-c, b)
    # (torch.rot90: first plane axis towards the second) and never changes its axis-0 index.
    x = torch.zeros(1, 1, 4, 4, 4)
    x[0, 0, 1, 0, 3] = 1.0
    y = rotate90(x, torch.tensor([1]), "sagittal")
    assert y.nonzero()[0, 2:].tolist() == [1, 0, 0]
    y = rotate90(x, torch.tensor([1]), "axial")
    assert y.nonzero()[0, 2:].tolist() == [3, 1, 3]
    with pytest.raises(ValueError, match="equal sizes"):
        rotate90(torch.zeros(1, 1, 4, 4, 6), torch.tensor([1]), "sagittal")


# ---- cut-out -----------------------------------------------------------------------------------
def test_cutout_noise_boxes_bounded_and_inside() -> None:
    x = torch.full((4, 1, 20, 20, 20), 5.0)  # outside [0, 1]: every changed voxel is noise
    res = cutout(x, partner=False, generator=_gen(2))
    changed = (res.x != x)[:, 0]
    assert torch.equal(changed, res.mask)  # noise lands exactly where the mask says
    assert res.x[res.mask[:, None]].min() >= 0 and res.x[res.mask[:, None]].max() <= 1
    frac = res.mask.flatten(1).float().mean(1)
    assert frac.max() <= 0.3 + 0.25**3 + 1e-6  # target <= 0.3, overshoot <= one box
    assert torch.equal(x, torch.full_like(x, 5.0))  # the input is not modified
    assert torch.equal(cutout(x, noise=False, partner=False, generator=_gen()).x, x)


def test_cutout_partner_pastes_from_another_sample_at_the_same_place() -> None:
    x = torch.arange(3.0).view(3, 1, 1, 1, 1).expand(3, 1, 16, 16, 16).contiguous()
    res = cutout(x, noise=False, partner=True, generator=_gen(5))
    pasted = 0
    for i in range(3):
        vals = set(res.x[i, 0][res.mask[i]].tolist())
        assert i not in vals or not res.mask[i].any()  # pasted voxels come from a partner j != i
        assert torch.equal(res.x[i, 0][~res.mask[i]], x[i, 0][~res.mask[i]])
        pasted += int(res.mask[i].any())
    assert pasted >= 1


# ---- VoCo --------------------------------------------------------------------------------------
def test_voco_labels_by_hand() -> None:
    # n=2, b=4: a crop at corner (2, 1) overlaps x-tiles by (2, 2) and y-tiles by (3, 1).
    y = overlap_labels(torch.tensor([[[2, 1], [0, 0], [4, 4]]]), n=2, b=4)
    assert y.shape == (1, 3, 4)
    assert y[0, 0].tolist() == [6 / 16, 2 / 16, 6 / 16, 2 / 16]
    assert y[0, 1].tolist() == [1.0, 0.0, 0.0, 0.0]  # exactly on base 0: one-hot
    assert y[0, 2].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_voco_random_crops_touch_at_most_four_bases_and_labels_sum_to_one() -> None:
    c = random_corners(3, 50, n=4, b=8, generator=_gen())
    assert c.min() >= 0 and c.max() < 3 * 8
    y = overlap_labels(c, 4, 8)
    assert (y >= 0).all() and torch.allclose(y.sum(-1), torch.ones(3, 50))
    assert ((y > 0).sum(-1) <= 4).all()


def test_voco_crops_cut_where_the_labels_say() -> None:
    x = torch.randn(2, 1, 16, 16, 6)
    bases = base_crops(x, 2)
    assert bases.shape == (2, 4, 1, 8, 8, 6)
    assert torch.equal(bases[1, 2], x[1, :, 8:16, 0:8])  # k = i*n + j, i on x
    corners = torch.tensor([[[8, 0]], [[3, 5]]])
    crops = crop_at(x, corners, 8)
    assert torch.equal(crops[0, 0], bases[0, 2])  # on base 2: the label is one-hot there
    assert overlap_labels(corners, 2, 8)[0, 0].argmax().item() == 2
    assert torch.equal(crops[1, 0], x[1, :, 3:11, 5:13])
    v = voco_views(x, n=2, num_crops=3, out_size=4, generator=_gen())
    assert v.bases.shape == (2, 4, 1, 4, 4, 4) and v.crops.shape == (2, 3, 1, 4, 4, 4)
    assert torch.allclose(v.labels, overlap_labels(v.corners, 2, 8))


def test_voco_augmentation_is_independent_per_crop() -> None:
    t = torch.randn(64, 1, 4, 4, 4)
    out = augment_crops(t, p_flip=0.5, p_rot=0.5, p_shift=0.0, generator=_gen())
    same = [(out[i] == t[i]).all().item() for i in range(64)]
    assert 0 < sum(same) < 64  # some crops changed, some not
    assert torch.equal(augment_crops(t, 0.0, 0.0, 0.0, generator=_gen()), t)


def test_cutout_in_place_partner_may_copy_noise_like_the_code() -> None:
    x = torch.full((2, 1, 16, 16, 16), 5.0)
    x[1] = 7.0
    found_noise = False
    for seed in range(20):
        res = cutout(x, partner_source="in_place", generator=_gen(seed))
        clean = cutout(x, partner_source="clean", generator=_gen(seed))
        assert torch.equal(clean.mask, res.mask)  # same boxes; only the pasted content differs
        vals = res.x[1, 0][res.mask[1]]
        # sample 1 may paste from sample 0, which already carries noise in [0, 1]
        found_noise |= bool(((vals >= 0) & (vals <= 1)).any() & (clean.x[1] != res.x[1]).any())
    assert found_noise


# ---- whole-volume helpers of the methods -------------------------------------------------------
def test_random_resized_crop_keeps_a_box_of_the_volume() -> None:
    from asa3d.views.resized_crop import random_resized_crops

    v = torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 8, 8).contiguous()  # value = axis-0 index
    full = random_resized_crops([v], 8, scale=(1.0, 1.0), p_flip=0.0, generator=_gen())
    assert torch.equal(full[0], v)  # scale 1, no flip: the volume itself
    flipped = random_resized_crops([v], 8, scale=(1.0, 1.0), p_flip=1.0, generator=_gen())
    assert torch.equal(flipped[0], v.flip(1))  # the left-right axis (array axis 0)
    small = random_resized_crops([v, v], 4, scale=(0.125, 0.125), p_flip=0.0, generator=_gen(3))
    assert small.shape == (2, 1, 4, 4, 4)
    for i in range(2):  # a 4^3 box (1/8 of the volume): 4 consecutive axis-0 indices
        col = small[i, 0, :, 0, 0]
        assert torch.equal(col, col[0] + torch.arange(4.0))


def test_swinssl_crops_come_from_their_own_volume_and_pad() -> None:
    from asa3d.methods.swinssl import random_crops

    vols = [torch.full((1, 20, 20, 20), float(i)) for i in range(3)] + [torch.full((1, 8, 20, 20), 9.0)]
    torch.manual_seed(0)
    x = random_crops(vols, 16, 2)
    assert x.shape == (8, 1, 16, 16, 16)
    for i in range(3):  # volume-major: crops 2i and 2i + 1 come from volume i
        assert x[2 * i].eq(i).all() and x[2 * i + 1].eq(i).all()
    assert x[6, 0, :8].eq(9).all() and x[6, 0, 8:].eq(0).all()  # padded on axis 0 past the volume


def test_voco_body_box_crop() -> None:
    from asa3d.methods.voco import body_box_crop

    v = torch.zeros(1, 10, 10, 10)
    v[0, 2:5, 3:9, 1:2] = 0.8
    assert body_box_crop(v, 0.3).shape == (1, 3, 6, 1)
    assert body_box_crop(torch.zeros(1, 4, 4, 4), 0.3).shape == (1, 4, 4, 4)  # nothing above: whole

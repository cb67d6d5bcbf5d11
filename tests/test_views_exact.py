"""Exact values of the view generators on tiny hand-built inputs (coordinate-encoded volumes,
deltas, constants), checked against independent references (scipy's Gaussian filter, the
closed-form geometry of each view). No network."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import ndimage

from asa3d.views.anatomy_views import (
    _theta,
    anatomy_views,
    gaussian_blur,
    intensity_jitter,
    random_rotate,
    resized_crops,
)
from asa3d.views.cutout import _boxes, cutout
from asa3d.views.decompose import decompose, grid_shape, part_boxes
from asa3d.views.masking import (
    cell_grid,
    fill_masked,
    masked_count,
    random_cell_mask,
    simmim_view,
    upsample_mask,
)
from asa3d.views.related_crops import CropPair, overlap_masks, related_crops
from asa3d.views.resize import resize_volumes
from asa3d.views.resized_crop import random_resized_crops
from asa3d.views.rotation import random_rotations, rotate90, unrotate
from asa3d.views.shuffle import (
    block_coords,
    from_blocks,
    perm_from_target3d,
    shuffle_blocks,
    to_blocks,
    unshuffle,
)
from asa3d.views.voco_crops import augment_crops, base_crops, overlap_labels, random_corners, voco_views

# Several tests run views on meta tensors; torch loads its meta kernels on the first meta op (about
# 3 s). Doing it at import lets mutmut's forked per-mutant runs (forked after test collection)
# inherit them instead of paying it per mutant.
torch.nn.functional.affine_grid(torch.zeros(1, 2, 3, device="meta"), [1, 1, 2, 2], align_corners=False)


def _coords(*shape: int) -> torch.Tensor:
    """(D, *shape) float: channel a holds each pixel's index along axis a."""
    r = [torch.arange(n, dtype=torch.float32) for n in shape]
    return torch.stack(torch.meshgrid(*r, indexing="ij"))


def _sampled_box(out: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, side) per axis of the box a resized crop of a coordinate image read: bilinear
    sampling is exact on a linear image, output pixel i reads lo + (i + 0.5) * side / size - 0.5."""
    d = out.shape[0]
    lo, side = [], []
    for a in range(d):
        first = out[(a,) + (0,) * d].item()
        idx = [0] * d
        idx[a] = size - 1
        last = out[(a, *idx)].item()
        s = (last - first) * size / (size - 1)
        side.append(s)
        lo.append(first + 0.5 - 0.5 * s / size)
    return torch.tensor(lo), torch.tensor(side)


# ---- Adam's view generator T ---------------------------------------------------------------------


def test_theta_maps_the_output_grid_onto_the_box() -> None:
    lo = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    hi = torch.tensor([[2.0, 6.0], [4.0, 10.0]])
    th = _theta(lo, hi, (4, 10))
    assert th.dtype == torch.float32 and th.shape == (2, 2, 3)
    # grid coordinate 0 runs along array axis 1 (10 wide), grid coordinate 1 along axis 0 (4 high)
    expected = torch.tensor(
        [[[0.5, 0.0, 0.7 - 1.0], [0.0, 0.5, 0.5 - 1.0]], [[1.0, 0.0, 0.0], [0.0, 0.5, 1.5 - 1.0]]]
    )
    assert torch.allclose(th, expected, atol=1e-6)
    th3 = _theta(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 4.0, 7.0]]), (4, 8, 10))
    expected3 = torch.tensor([[[0.4, 0, 0, 0.0], [0, 0.25, 0, -0.25], [0, 0, 0.5, 0.0]]])
    assert torch.allclose(th3, expected3, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 20), (6, 8, 10)])
def test_resized_crop_of_the_whole_part_at_its_own_size_is_the_part(shape: tuple[int, ...]) -> None:
    img = _coords(*shape) + 1.0
    d = len(shape)
    # part boxes away from the image origin; size = part extent on every axis (a cube/square part)
    box = torch.tensor([[2, 6]] * d)
    out = resized_crops([img, img * 2], torch.stack([box, box]), 4, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert out.shape == (2, d, *[4] * d)
    part = img[(slice(None),) + (slice(2, 6),) * d]
    assert torch.allclose(out[0], part, atol=1e-5)
    assert torch.allclose(out[1], 2 * part, atol=1e-5)


def test_resized_crop_of_a_stacked_batch_and_an_integer_image() -> None:
    img = _coords(8, 8).to(torch.int64)[None].repeat(3, 1, 1, 1)  # (B, C, H, W) long
    out = resized_crops(img, torch.tensor([[[0, 8], [0, 8]]] * 3), 8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert out.dtype == torch.float32
    assert torch.allclose(out, img.float(), atol=1e-5)


def test_resized_crop_2d_sides_follow_scale_and_ratio_like_torchvision() -> None:
    torch.manual_seed(0)
    img = _coords(64, 64)
    boxes = torch.tensor([[[8, 56], [16, 64]]] * 8)  # a 48 x 48 part
    size = 6
    out = resized_crops([img] * 8, boxes, size, scale=(0.25, 0.25), ratio=(2.0, 2.0))
    for i in range(8):
        lo, side = _sampled_box(out[i], size)
        # height = sqrt(s / r), width = sqrt(s * r) of the part
        assert side.tolist() == pytest.approx([48 * math.sqrt(0.125), 48 * math.sqrt(0.5)], abs=1e-3)
        assert lo[0] >= 8 - 1e-3 and lo[0] + side[0] <= 56 + 1e-3
        assert lo[1] >= 16 - 1e-3 and lo[1] + side[1] <= 64 + 1e-3


def test_resized_crop_3d_keeps_the_volume_fraction_and_the_part_aspect() -> None:
    torch.manual_seed(1)
    img = _coords(40, 40, 40)
    boxes = torch.tensor([[[0, 40], [4, 36], [8, 40]]] * 6)  # 40 x 32 x 32
    size = 4
    out = resized_crops([img] * 6, boxes, size, scale=(0.125, 0.125), ratio=(1.5, 1.5))
    for i in range(6):
        lo, side = _sampled_box(out[i], size)
        # a degenerate ratio interval: the zero-mean log-ratios are 0, each side is s^(1/3) of the part
        assert side.tolist() == pytest.approx([20.0, 16.0, 16.0], abs=1e-3)
        assert (lo >= torch.tensor([0.0, 4.0, 8.0]) - 1e-3).all()
        assert (lo + side <= torch.tensor([40.0, 36.0, 40.0]) + 1e-3).all()


def test_resized_crop_draws_scale_ratio_and_position_over_their_ranges() -> None:
    torch.manual_seed(2)
    n, size = 48, 5
    img = _coords(60, 60)
    boxes = torch.tensor([[[10, 50], [10, 50]]] * n)  # a 40 x 40 part
    out = resized_crops([img] * n, boxes, size, scale=(0.2, 0.6), ratio=(3 / 4, 4 / 3))
    fracs, ratios, rel = [], [], []
    for i in range(n):
        lo, side = _sampled_box(out[i], size)
        f = side / 40
        fracs.append((f[0] * f[1]).item())
        ratios.append((f[1] / f[0]).item())
        rel.append(((lo - 10) / (40 - side)).tolist())
        assert (lo >= 10 - 1e-3).all() and (lo + side <= 50 + 1e-3).all()
    fr, ra, rp = torch.tensor(fracs), torch.tensor(ratios), torch.tensor(rel)
    assert fr.min() >= 0.2 - 1e-3 and fr.max() <= 0.6 + 1e-3
    assert fr.min() < 0.3 and fr.max() > 0.5  # the whole range is drawn
    assert ra.min() >= 0.75 - 1e-3 and ra.max() <= 4 / 3 + 1e-3
    assert ra.min() < 0.85 and ra.max() > 1.2
    assert rp.min() < 0.15 and rp.max() > 0.85  # uniform positions inside the part


def test_resized_crop_sides_are_clipped_to_the_part_and_to_one_pixel() -> None:
    torch.manual_seed(3)
    img = _coords(16, 16)
    # ratio 16: width wants sqrt(s*16) = 4 parts, clipped to the part; height sqrt(1/16) = 1/4
    out = resized_crops([img], torch.tensor([[[0, 16], [0, 16]]]), 4, scale=(1.0, 1.0), ratio=(16.0, 16.0))
    lo, side = _sampled_box(out[0], 4)
    assert side.tolist() == pytest.approx([4.0, 16.0], abs=1e-3)
    assert lo[1].item() == pytest.approx(0.0, abs=1e-3)
    # a part of 2 pixels at scale 0.01: 0.2 of 2 = 0.4 pixels, clamped to one pixel
    out = resized_crops([img], torch.tensor([[[3, 5], [3, 5]]]), 4, scale=(0.04, 0.04), ratio=(1.0, 1.0))
    lo, side = _sampled_box(out[0], 4)
    assert side.tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    assert (lo >= 3 - 1e-3).all() and (lo + 1 <= 5 + 1e-3).all()


def test_intensity_jitter_off_is_the_clipped_input() -> None:
    x = torch.linspace(-0.5, 1.5, 2 * 3 * 16).reshape(2, 3, 4, 4)
    for mode in ("scale", "shift"):
        assert torch.allclose(intensity_jitter(x, 0.4, 0.4, 0.0, mode), x.clamp(0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="brightness_mode"):
        intensity_jitter(x, 0.4, 0.4, 1.0, "gamma")


def test_intensity_jitter_brightness_scales_or_shifts_each_sample() -> None:
    torch.manual_seed(4)
    x = 0.3 + 0.2 * torch.rand(64, 2, 3, 3)  # in [0.3, 0.5]: no clipping at b = 0.4
    y = intensity_jitter(x, 0.4, 0.0, 1.0, "scale")
    f = y / x
    assert torch.allclose(f, f[:, :1, :1, :1].expand_as(f), atol=1e-5)  # one factor per sample
    f = f[:, 0, 0, 0]
    assert f.min() >= 0.6 - 1e-5 and f.max() <= 1.4 + 1e-5
    assert f.min() < 0.7 and f.max() > 1.3
    y = intensity_jitter(x, 0.25, 0.0, 1.0, "shift")
    s = y - x
    assert torch.allclose(s, s[:, :1, :1, :1].expand_as(s), atol=1e-6)
    s = s[:, 0, 0, 0]
    assert s.min() >= -0.25 - 1e-6 and s.max() <= 0.25 + 1e-6
    assert s.min() < -0.2 and s.max() > 0.2


def test_intensity_jitter_contrast_keeps_the_sample_mean() -> None:
    torch.manual_seed(5)
    x = torch.zeros(64, 2, 4, 4)
    x[:, 0] = 0.4 + 0.1 * torch.rand(64, 4, 4)  # channel means differ: the mean is over the sample
    x[:, 1] = 0.6 + 0.1 * torch.rand(64, 4, 4)
    y = intensity_jitter(x, 0.0, 0.4, 1.0)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = (y - mean) / (x - mean)
    assert torch.allclose(c, c[:, :1, :1, :1].expand_as(c), atol=1e-3)
    c = c[:, 0, 0, 0]
    assert c.min() >= 0.6 - 1e-3 and c.max() <= 1.4 + 1e-3
    assert c.min() < 0.7 and c.max() > 1.3
    assert torch.allclose(y.mean(dim=(1, 2, 3)), mean.flatten(), atol=1e-5)


def test_intensity_jitter_clips_after_brightness_and_after_contrast() -> None:
    torch.manual_seed(6)
    x = torch.full((32, 1, 2, 2), 0.9)
    y = intensity_jitter(x, 0.5, 0.0, 1.0, "scale")  # factors up to 1.5: 1.35 clipped to 1
    assert y.max() == 1.0 and (y == 1.0).any() and (y < 0.9).any()
    x = torch.zeros(32, 1, 2, 2)
    x[:, :, 0] = 1.0  # mean 0.5, contrast 2x at most
    y = intensity_jitter(x, 0.0, 0.9, 1.0)
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert (y == 1.0).sum() > 0 and (y == 0.0).sum() > 0
    # the brightness result is clipped before the contrast mean: a sample of halves -1 and 2 reads as
    # halves 0 and 1 (mean 0.5), so any contrast keeps it symmetric about 0.5
    x = torch.full((16, 1, 2, 2), -1.0)
    x[:, :, 1] = 2.0
    y = intensity_jitter(x, 0.0, 0.5, 1.0)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.full((16,), 0.5), atol=1e-6)
    assert (y[:, :, 1] > 0.5).all() and (y[:, :, 0] < 0.5).all()


def test_intensity_jitter_applies_with_probability_p() -> None:
    torch.manual_seed(7)
    x = torch.full((400, 1, 2, 2), 0.5)
    y = intensity_jitter(x, 0.4, 0.0, 0.8, "shift")
    changed = (y[:, 0, 0, 0] != 0.5).float().mean().item()
    assert 0.7 < changed < 0.9


def _blur_reference(x: np.ndarray, sigma: float, r: int) -> np.ndarray:
    # scipy's "mirror" is torch's "reflect" (no edge repeat); radius r, normalised kernel
    return ndimage.gaussian_filter(x, sigma, mode="mirror", radius=r)


@pytest.mark.parametrize(
    ("shape", "sigma", "max_radius", "r"),
    [
        ((9, 11), 1.0, 6, 3),
        ((12, 12), 0.9, 6, 3),
        ((16, 16), 2.5, 6, 6),
        ((7, 9, 8), 1.5, 2, 2),
        ((6, 20), 2.0, 6, 3),
    ],
)
def test_gaussian_blur_matches_scipy(shape: tuple[int, ...], sigma: float, max_radius: int, r: int) -> None:
    torch.manual_seed(8)
    x = torch.rand(2, 3, *shape)
    y = gaussian_blur(x, (sigma, sigma), 1.0, max_radius=max_radius)
    assert y.shape == x.shape
    for i in range(2):
        for c in range(3):
            ref = _blur_reference(x[i, c].double().numpy(), sigma, r)
            assert np.allclose(y[i, c].numpy(), ref, atol=1e-5)


def test_gaussian_blur_default_radius_is_at_most_six() -> None:
    x = torch.rand(1, 1, 20, 20)
    y = gaussian_blur(x, (3.0, 3.0), 1.0)  # 3 sigma = 9 > 6
    assert np.allclose(y[0, 0].numpy(), _blur_reference(x[0, 0].double().numpy(), 3.0, 6), atol=1e-5)


def test_gaussian_blur_radius_one_and_too_small_images() -> None:
    x = torch.rand(1, 1, 3, 5)
    y = gaussian_blur(x, (1.0, 1.0), 1.0)  # min side 3 -> radius 1
    assert np.allclose(y[0, 0].numpy(), _blur_reference(x[0, 0].double().numpy(), 1.0, 1), atol=1e-5)
    x = torch.rand(1, 1, 1, 5)
    assert gaussian_blur(x, (1.0, 1.0), 1.0) is x  # radius 0: nothing to blur
    x = torch.rand(2, 1, 8, 8)
    assert gaussian_blur(x, (1.0, 1.0), 0.0) is x


def test_gaussian_blur_sigma_per_sample_shared_by_channels() -> None:
    torch.manual_seed(9)
    b, c = 24, 3
    x = torch.zeros(b, c, 15, 15)
    x[:, :, 7, 7] = 1.0
    y = gaussian_blur(x, (0.5, 1.5), 1.0)
    assert torch.allclose(y.sum((2, 3)), torch.ones(b, c), atol=1e-5)  # kernels are normalised
    # k[1] / k[0] = exp(-1 / (2 sigma^2)) along each axis
    sig = (-0.5 / torch.log(y[:, :, 7, 8] / y[:, :, 7, 7])).sqrt()
    sig_v = (-0.5 / torch.log(y[:, :, 8, 7] / y[:, :, 7, 7])).sqrt()
    assert torch.allclose(sig, sig_v, atol=1e-4)
    assert torch.allclose(sig, sig[:, :1].expand_as(sig), atol=1e-4)  # one sigma per sample
    sig = sig[:, 0]
    assert sig.min() >= 0.5 - 1e-4 and sig.max() <= 1.5 + 1e-4
    assert sig.min() < 0.75 and sig.max() > 1.25


def test_gaussian_blur_applies_with_probability_p() -> None:
    torch.manual_seed(10)
    x = torch.zeros(200, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    y = gaussian_blur(x, (1.0, 1.0), 0.3)
    blurred = (y[:, 0, 4, 4] < 1.0).float().mean().item()
    assert 0.2 < blurred < 0.4
    assert torch.equal(y[y[:, 0, 4, 4] == 1.0], x[y[:, 0, 4, 4] == 1.0])


def _rotation_of(out: torch.Tensor, centre: tuple[int, ...]) -> torch.Tensor:
    """The linear map read off a rotated centred-coordinate image around ``centre`` (D x D)."""
    d = out.shape[0]
    m = torch.zeros(d, d)
    for a in range(d):
        hi, lo = list(centre), list(centre)
        hi[a] += 1
        lo[a] -= 1
        m[:, a] = (out[(slice(None), *hi)] - out[(slice(None), *lo)]) / 2
    return m


@pytest.mark.parametrize("shape", [(17, 17), (17, 17, 9)])
def test_random_rotate_turns_the_plane_of_axes_0_and_1(shape: tuple[int, ...]) -> None:
    torch.manual_seed(11)
    b, d = 32, len(shape)
    img = _coords(*shape) - torch.tensor([(n - 1) / 2 for n in shape]).view(d, *[1] * d)
    out = random_rotate(img[None].repeat(b, 1, *[1] * d), 40.0)
    angles = []
    for i in range(b):
        m = _rotation_of(out[i], tuple(n // 2 for n in shape))
        assert torch.allclose(m @ m.T, torch.eye(d), atol=1e-4)  # a rotation, no shear or scale
        assert torch.det(m).item() == pytest.approx(1.0, abs=1e-4)
        if d == 3:  # about z: the z coordinate and the z axis are kept
            assert torch.allclose(m[2], torch.tensor([0.0, 0.0, 1.0]), atol=1e-4)
            assert torch.allclose(m[:, 2], torch.tensor([0.0, 0.0, 1.0]), atol=1e-4)
        angles.append(math.degrees(math.atan2(m[1, 0].item(), m[0, 0].item())))
    a = torch.tensor(angles)
    assert a.abs().max() <= 40.0 + 1e-3
    assert a.min() < -20 and a.max() > 20  # both senses, the whole range
    # zero fill: a ones image loses its corners once turned by more than a few degrees
    ones = random_rotate(torch.ones(b, 1, *shape), 40.0)
    corner = ones[(slice(None), 0) + (0,) * d]
    assert corner.min() == 0.0


def test_random_rotate_off_returns_the_input() -> None:
    x = torch.rand(2, 1, 5, 5)
    assert random_rotate(x, 0.0) is x and random_rotate(x, -5.0) is x
    y = random_rotate(x, 0.5)  # tiny but on: resampled (floats), not the same object
    assert y is not x and torch.allclose(y[:, :, 2, 2], x[:, :, 2, 2], atol=0.05)


def test_anatomy_views_off_switches_give_the_exact_part() -> None:
    img = _coords(8, 8, 8)
    boxes = torch.tensor([[[2, 6], [0, 4], [4, 8]]] * 2)
    kw = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_jitter=0.0, p_blur=0.0, rotation_deg=0.0)
    v = anatomy_views([img / 8, img / 8], boxes, 4, **kw)
    assert torch.allclose(v[0], img[:, 2:6, 0:4, 4:8] / 8, atol=1e-5)


def test_anatomy_views_passes_every_setting_on() -> None:
    torch.manual_seed(12)
    img = _coords(16, 16) / 16
    boxes = torch.tensor([[[0, 16], [0, 16]]] * 4)
    base = dict(p_jitter=0.0, p_blur=0.0, rotation_deg=0.0)
    # scale and ratio reach the crop
    v = anatomy_views([img] * 4, boxes, 4, scale=(0.25, 0.25), ratio=(2.0, 2.0), **base)
    for i in range(4):
        _, side = _sampled_box(v[i] * 16, 4)
        assert side.tolist() == pytest.approx([16 * math.sqrt(0.125), 16 * math.sqrt(0.5)], abs=1e-3)
    crop = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    # jitter: a shift with contrast off moves a constant image by one value per sample (a scale
    # would leave a black image black)
    black = [torch.zeros(1, 16, 16)] * 16
    v = anatomy_views(
        black, boxes.repeat(4, 1, 1), 16, **crop, brightness=0.3, contrast=0.0, p_jitter=1.0,
        brightness_mode="shift", p_blur=0.0, rotation_deg=0.0,
    )  # fmt: skip
    assert (v.flatten(1).amax(1) > 0).any()
    flat = [torch.full((1, 16, 16), 0.5)] * 4
    v = anatomy_views(
        flat, boxes, 16, **crop, brightness=0.3, contrast=0.0, p_jitter=1.0, brightness_mode="shift",
        p_blur=0.0, rotation_deg=0.0,
    )  # fmt: skip
    s = v[:, 0, 0, 0] - 0.5
    assert (v.flatten(1).std(1) < 1e-6).all() and s.abs().max() <= 0.3 + 1e-6 and s.abs().min() > 0
    # blur: the same fixed sigma as gaussian_blur
    v = anatomy_views(
        [img] * 4, boxes, 16, **crop, p_jitter=0.0, blur_sigma=(1.0, 1.0), p_blur=1.0, rotation_deg=0.0
    )
    assert torch.allclose(v, gaussian_blur(img[None].repeat(4, 1, 1, 1), (1.0, 1.0), 1.0), atol=1e-5)
    # rotation on (the jitter clips to [0, 1], the coordinate image already lies there)
    v = anatomy_views([img] * 4, boxes, 16, **crop, p_jitter=0.0, p_blur=0.0, rotation_deg=40.0)
    assert not torch.allclose(v, img[None].repeat(4, 1, 1, 1), atol=1e-3)
    assert v.min() >= 0.0 and v.max() <= 1.0


def test_anatomy_views_defaults_are_adams() -> None:
    # the defaults jitter (p 0.8, 0.4), blur (p 0.5) and rotate (30 deg): most views change a flat part
    torch.manual_seed(13)
    x = [torch.full((1, 12, 12), 0.5)] * 64
    boxes = torch.tensor([[[0, 12], [0, 12]]] * 64)
    v = anatomy_views(x, boxes, 12)
    assert v.shape == (64, 1, 12, 12)
    jittered = (v[:, 0, 6, 6] - 0.5).abs() > 1e-4
    assert 0.6 < jittered.float().mean().item() < 0.97
    assert (v[:, 0, 6, 6] - 0.5).abs().max() <= 0.5 * 0.4 * 1.4 + 1e-4
    corners = v[:, 0, 0, 0] == 0.0  # zero fill of the rotation
    assert corners.any()


# ---- F_perm (shuffle) ------------------------------------------------------------------------------


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_block_coords_and_blocks_of_a_non_cubic_grid() -> None:
    assert block_coords(2).tolist() == [[i, j, k] for i in range(2) for j in range(2) for k in range(2)]
    x = _coords(4, 6, 8)[None].repeat(2, 1, 1, 1, 1)  # (B=2, C=3, 4, 6, 8), p = 2: grid (2, 3, 4)
    x[1] += 100
    blocks = to_blocks(x, 2)
    assert blocks.shape == (2, 24, 3, 2, 2, 2)
    for r, (i0, i1, i2) in enumerate(itertools.product(range(2), range(3), range(4))):
        assert torch.equal(
            blocks[1, r], x[1, :, 2 * i0 : 2 * i0 + 2, 2 * i1 : 2 * i1 + 2, 2 * i2 : 2 * i2 + 2]
        )
    assert torch.equal(from_blocks(blocks, (2, 3, 4)), x)
    with pytest.raises(
        ValueError, match=r"spatial shape \(4, 6, 8\) is not divisible by the sub-volume size 3"
    ):
        to_blocks(x, 3)
    with pytest.raises(ValueError, match=r"expected \(B, C, X, Y, Z\)"):
        to_blocks(x[0], 2)


def test_shuffle_targets_are_the_source_coordinates_on_a_linspace() -> None:
    g, p = 3, 2
    x = _coords(6, 6, 6)[None].repeat(2, 1, 1, 1, 1)
    sh = shuffle_blocks(x, p, generator=_gen(1))
    n = g**3
    assert sh.perm.shape == (2, n) and sh.perm.dtype == torch.long
    assert sh.target3d.dtype == torch.float32 and sh.target1d.dtype == torch.float32
    lin = torch.linspace(-3, 3, g)
    for i in range(2):
        for k in range(n):
            src = block_coords(g)[sh.perm[i, k]]
            assert torch.allclose(sh.target3d[i, k], lin[src], atol=1e-6)
            # the content at block k is the coordinate volume of the source block
            blk = to_blocks(sh.x_perm, p)[i, k]
            assert torch.equal(blk[:, 0, 0, 0], (src * p).float())
    assert torch.allclose(sh.target1d, torch.linspace(-3, 3, n)[sh.perm], atol=1e-6)
    assert torch.equal(perm_from_target3d(sh.target3d, g), sh.perm)


def test_shuffle_rejects_bad_grids_and_ratios() -> None:
    with pytest.raises(ValueError, match="at least 2 sub-volumes"):
        shuffle_blocks(torch.zeros(1, 1, 4, 4, 4), 4)
    with pytest.raises(ValueError, match="at least 2 sub-volumes"):
        shuffle_blocks(torch.zeros(1, 1, 8, 8, 4), 4)
    for r in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match="perm_ratio"):
            shuffle_blocks(torch.zeros(1, 1, 8, 8, 8), 4, perm_ratio=r)
    sh = shuffle_blocks(torch.zeros(1, 1, 8, 8, 8), 4, perm_ratio=1.0, generator=_gen())
    assert sorted(sh.perm[0].tolist()) == list(range(8))


def test_partial_shuffle_moves_exactly_the_chosen_positions() -> None:
    b = 300
    x = torch.zeros(b, 1, 8, 8, 8)
    sh = shuffle_blocks(x, 4, perm_ratio=0.5, generator=_gen(2))  # 8 blocks, round(4.0) = 4 chosen
    moved = sh.perm != torch.arange(8)
    assert moved.sum(1).max().item() == 4  # at most the 4 chosen positions move
    assert moved.sum(1).min().item() == 0  # a shuffle of 4 may keep them all in place
    assert moved.any(0).all()  # every position can be chosen
    assert all(sorted(row.tolist()) == list(range(8)) for row in sh.perm)
    # the full permutation moves more than 4 of 8 blocks in some sample
    full = shuffle_blocks(x, 4, perm_ratio=1.0, generator=_gen(2)).perm
    assert (full != torch.arange(8)).sum(1).max().item() > 4
    # fewer than 2 chosen positions: nothing to shuffle, the identity
    for r in (0.1, 0.15):  # round(0.8) = 1, round(1.2) = 1
        ident = shuffle_blocks(x[:3], 4, perm_ratio=r, generator=_gen()).perm
        assert torch.equal(ident, torch.arange(8).repeat(3, 1))
    # round(0.25 * 8) = 2 chosen positions: swapped or kept, so 0 or 2 blocks move
    two = (shuffle_blocks(x[:100], 4, perm_ratio=0.25, generator=_gen(4)).perm != torch.arange(8)).sum(1)
    assert set(two.tolist()) == {0, 2}
    # round(0.94 * 8) = 8: every block may move
    near = shuffle_blocks(x, 4, perm_ratio=0.94, generator=_gen(3)).perm
    assert (near != torch.arange(8)).sum(1).max().item() > 4


def test_shuffle_is_seeded_and_fresh_per_sample() -> None:
    x = torch.zeros(4, 1, 8, 8, 8)
    a = shuffle_blocks(x, 4, generator=_gen(5)).perm
    assert torch.equal(a, shuffle_blocks(x, 4, generator=_gen(5)).perm)
    assert not torch.equal(a, shuffle_blocks(x, 4, generator=_gen(6)).perm)
    torch.manual_seed(0)
    b1 = shuffle_blocks(x, 4).perm
    torch.manual_seed(0)
    assert torch.equal(b1, shuffle_blocks(x, 4).perm)  # no generator: the global stream
    assert len({tuple(r.tolist()) for r in a}) == 4


def test_unshuffle_restores_a_partial_shuffle() -> None:
    x = _coords(8, 8, 8)[None].repeat(3, 1, 1, 1, 1)
    sh = shuffle_blocks(x, 2, perm_ratio=0.5, generator=_gen(4))
    assert torch.equal(unshuffle(sh.x_perm, sh.perm, 2), x)


# ---- Swin SSL rotations ----------------------------------------------------------------------------


def test_rotate90_every_class_by_coordinates() -> None:
    n = 4
    x = _coords(n, n, n)[None].repeat(6, 1, 1, 1, 1)  # channel a = voxel index on spatial axis a
    x_before = x.clone()
    k = torch.tensor([0, 1, 2, 3, 5, -1])  # any integer, mod 4
    y = rotate90(x, k, "sagittal")
    assert torch.equal(x, x_before)  # the input is not modified
    i = torch.arange(n)
    # np.rot90 convention: out[a, b] = in[b, n-1-a] for one quarter turn of plane (a, b)
    ax, ay, az = torch.meshgrid(i, i, i, indexing="ij")
    want = {
        0: torch.stack([ax, ay, az]),
        1: torch.stack([ax, az, n - 1 - ay]),
        2: torch.stack([ax, n - 1 - ay, n - 1 - az]),
        3: torch.stack([ax, n - 1 - az, ay]),
    }
    for s, kk in enumerate([0, 1, 2, 3, 1, 3]):
        assert torch.equal(y[s], want[kk].float()), (s, kk)
    y = rotate90(x, k, "axial")
    want_axial = {0: torch.stack([ax, ay, az]), 1: torch.stack([ay, n - 1 - ax, az])}
    assert torch.equal(y[0], want_axial[0].float()) and torch.equal(y[1], want_axial[1].float())
    assert torch.equal(y[4], want_axial[1].float())
    assert torch.equal(unrotate(y, k, "axial"), x)
    assert torch.equal(unrotate(rotate90(x, k), k), x)  # default plane: the code's (sagittal)
    assert torch.equal(rotate90(x[:1], torch.tensor([0]), "sagittal"), x[:1])


def test_rotate90_rejects_bad_input() -> None:
    x = torch.zeros(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="rotation plane 'coronal'"):
        rotate90(x, torch.tensor([1, 1]), "coronal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected \(B, C, X, Y, Z\)"):
        rotate90(x[0], torch.tensor([1]))
    with pytest.raises(ValueError, match=r"one rotation per sample: k \(3,\) for batch 2"):
        rotate90(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"equal sizes on spatial axes \(0, 1\), got \(4, 6, 4\)"):
        rotate90(torch.zeros(1, 1, 4, 6, 4), torch.tensor([1]), "axial")
    rotate90(torch.zeros(1, 1, 6, 4, 4), torch.tensor([1]), "sagittal")  # axis 0 may differ
    rotate90(torch.zeros(1, 1, 4, 4, 6), torch.tensor([1]), "axial")  # axis 2 may differ


def test_random_rotations_draw_all_four_classes_uniformly() -> None:
    x = _coords(4, 4, 4)[None].repeat(400, 1, 1, 1, 1)
    y, k = random_rotations(x, "axial", _gen(7))
    assert k.dtype == torch.long and k.shape == (400,)
    counts = torch.bincount(k, minlength=4)
    assert counts.numel() == 4 and (counts > 70).all()
    assert torch.equal(y, rotate90(x, k, "axial"))
    y2, k2 = random_rotations(x, generator=_gen(7))  # default plane: the code's (sagittal)
    assert torch.equal(k2, k) and torch.equal(y2, rotate90(x, k, "sagittal"))
    torch.manual_seed(1)
    _, ka = random_rotations(x[:20])
    torch.manual_seed(1)
    assert torch.equal(random_rotations(x[:20])[1], ka)


# ---- SimMIM masks -----------------------------------------------------------------------------------


def test_cell_grid_per_axis_and_errors() -> None:
    assert cell_grid((8, 16, 24), 8) == (1, 2, 3)
    assert cell_grid([4, 4, 4], 1) == (4, 4, 4)
    with pytest.raises(ValueError, match="expected 3 spatial dims"):
        cell_grid((8, 8), 4)
    with pytest.raises(ValueError, match="not divisible by the mask cell size 0"):
        cell_grid((8, 8, 8), 0)
    with pytest.raises(ValueError, match="not divisible"):
        cell_grid((8, 8, 12), 8)


def test_masked_count_rounds_up_tolerantly_and_clips() -> None:
    assert masked_count(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert masked_count(10, 0.31) == 4
    assert masked_count(10, 0.01) == 1  # at least one cell
    assert masked_count(10, 0.999) == 10
    assert masked_count(1, 0.5) == 1
    for r in (0.0, 1.0, -0.1, 1.1):
        with pytest.raises(ValueError, match="mask ratio"):
            masked_count(10, r)


def test_random_cell_mask_on_a_non_cubic_grid() -> None:
    m = random_cell_mask(300, (1, 2, 3), 0.5, _gen(1))
    assert m.shape == (300, 1, 2, 3) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == 3).all()
    freq = m.flatten(1).float().mean(0)
    assert (freq > 0.35).all() and (freq < 0.65).all()  # every cell drawn about half the time
    torch.manual_seed(2)
    a = random_cell_mask(2, (2, 2, 2), 0.25, device="cpu")
    torch.manual_seed(2)
    assert torch.equal(a, random_cell_mask(2, (2, 2, 2), 0.25))
    assert a.device.type == "cpu" and (a.flatten(1).sum(1) == 2).all()


def test_upsample_mask_repeats_each_cell_on_every_axis() -> None:
    m = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    m[1, 0, 1, 2] = True
    m[0, 0, 0, 1] = True
    up = upsample_mask(m, 2)
    assert up.shape == (2, 2, 4, 6)
    i = torch.arange
    want = m[:, i(2)[:, None, None] // 2, i(4)[None, :, None] // 2, i(6)[None, None, :] // 2]
    assert torch.equal(up, want)
    assert torch.equal(upsample_mask(m, 1), m)
    with pytest.raises(ValueError, match=r"\(B, G0, G1, G2\) mask"):
        upsample_mask(m[0], 2)
    with pytest.raises(ValueError, match="factor must be >= 1, got 0"):
        upsample_mask(m, 0)


def test_fill_masked_zero_and_visible_mean_over_channels() -> None:
    x = torch.zeros(2, 2, 1, 1, 4)
    x[0, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 40.0])
    x[0, 1, 0, 0] = torch.tensor([5.0, 6.0, 7.0, 80.0])
    x[1] = 2.0
    mask = torch.zeros(2, 1, 1, 4, dtype=torch.bool)
    mask[0, 0, 0, 3] = True  # the large values are hidden: they must not leak into the fill
    zero = fill_masked(x, mask, "zero")
    want = x.clone()
    want[0, :, 0, 0, 3] = 0.0
    assert torch.equal(zero, want)
    assert torch.equal(fill_masked(x, mask), want)  # zero is the default
    mean = fill_masked(x, mask, "mean")
    want[0, :, 0, 0, 3] = (1 + 2 + 3 + 5 + 6 + 7) / 6
    assert torch.allclose(mean, want)
    # a fully masked sample: no visible voxel, the fill is 0 (no division by zero)
    full = fill_masked(x, torch.ones(2, 1, 1, 4, dtype=torch.bool), "mean")
    assert torch.equal(full, torch.zeros_like(x))
    with pytest.raises(ValueError, match="does not match volume"):
        fill_masked(x, mask[:, 0], "zero")
    with pytest.raises(ValueError, match="mask fill 'noise'"):
        fill_masked(x, mask, "noise")  # type: ignore[arg-type]


def test_simmim_view_passes_cells_patch_and_fill_on() -> None:
    x = _coords(8, 8, 16)[:1][None].repeat(2, 1, 1, 1, 1) + 1.0
    v = simmim_view(x, cell_size=4, ratio=0.25, patch_size=2, fill="mean", generator=_gen(3))
    assert v.cell_mask.shape == (2, 2, 2, 4) and (v.cell_mask.flatten(1).sum(1) == 4).all()
    assert torch.equal(v.voxel_mask, upsample_mask(v.cell_mask, 4))
    assert torch.equal(v.token_mask, upsample_mask(v.cell_mask, 2))
    assert torch.allclose(v.x_masked, fill_masked(x, v.voxel_mask, "mean"))
    assert torch.equal(v.cell_mask, random_cell_mask(2, (2, 2, 4), 0.25, _gen(3)))
    d = simmim_view(torch.ones(1, 1, 32, 32, 32), generator=_gen())  # paper defaults: 16^3 cells, 50 %
    assert d.cell_mask.shape == (1, 2, 2, 2) and d.cell_mask.sum().item() == 4
    assert d.token_mask.shape == (1, 16, 16, 16) and d.x_masked.sum().item() == 32**3 / 2
    with pytest.raises(ValueError, match=r"expected \(B, C, X, Y, Z\)"):
        simmim_view(x[0])


# ---- VoCo ------------------------------------------------------------------------------------------


def test_voco_bases_tile_the_plane_and_reject_bad_planes() -> None:
    x = _coords(8, 8, 3)[None].repeat(2, 1, 1, 1, 1)
    x[1] += 50
    bases = base_crops(x, 2)
    assert bases.shape == (2, 4, 3, 4, 4, 3)
    for k, (i, j) in enumerate(itertools.product(range(2), range(2))):
        assert torch.equal(bases[1, k], x[1, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4, :])
    with pytest.raises(ValueError, match=r"square x-y plane divisible by n=3, got \(8, 8, 3\)"):
        base_crops(x, 3)
    with pytest.raises(ValueError, match="square x-y plane"):
        base_crops(torch.zeros(1, 1, 8, 4, 4), 2)
    with pytest.raises(ValueError, match="square x-y plane"):
        base_crops(x, 0)
    with pytest.raises(ValueError, match=r"expected \(B, C, X, Y, Z\)"):
        base_crops(x[0], 2)
    assert torch.equal(base_crops(x, 1)[:, 0], x)


def test_voco_corners_cover_every_integer_below_the_last_base() -> None:
    c = random_corners(40, 30, n=3, b=2, generator=_gen(1))
    assert c.shape == (40, 30, 2) and c.dtype == torch.long
    assert set(c[..., 0].flatten().tolist()) == {0, 1, 2, 3}
    assert set(c[..., 1].flatten().tolist()) == {0, 1, 2, 3}
    one = random_corners(2, 3, n=1, b=5, generator=_gen(), device="cpu")
    assert one.shape == (2, 3, 2) and one.dtype == torch.long and not one.any()
    torch.manual_seed(3)
    a = random_corners(2, 4, n=4, b=8)
    torch.manual_seed(3)
    assert torch.equal(a, random_corners(2, 4, n=4, b=8, device="cpu"))


def test_voco_labels_are_the_brute_force_overlap_areas() -> None:
    n, b = 3, 4
    corners = torch.tensor([[[cx, cy] for cx in range(0, 9, 3) for cy in (0, 1, 5, 8)]])
    y = overlap_labels(corners, n, b)
    assert y.dtype == torch.float32 and y.shape == (1, 12, 9)
    for s, (cx, cy) in enumerate(corners[0].tolist()):
        for i in range(n):
            for j in range(n):
                ox = len(set(range(cx, cx + b)) & set(range(i * b, i * b + b)))
                oy = len(set(range(cy, cy + b)) & set(range(j * b, j * b + b)))
                assert y[0, s, i * n + j].item() == pytest.approx(ox * oy / b**2)


def test_voco_views_crop_and_resize_exactly() -> None:
    x = _coords(8, 8, 8)[None].repeat(2, 1, 1, 1, 1)  # n = 2, b = 4, Z = 8
    v = voco_views(x, n=2, num_crops=5, out_size=2, generator=_gen(4))
    assert v.corners.shape == (2, 5, 2) and torch.equal(v.labels, overlap_labels(v.corners, 2, 4))
    assert torch.equal(v.corners, random_corners(2, 5, 2, 4, _gen(4)))
    o = torch.arange(2.0)
    # trilinear, align_corners=False: output i reads input (i + 0.5) * in / out - 0.5
    xy, z = 2 * o + 0.5, 4 * o + 1.5
    for i in range(2):
        for s in range(5):
            cx, cy = v.corners[i, s].tolist()
            assert torch.allclose(v.crops[i, s, 0], (cx + xy).view(2, 1, 1).expand(2, 2, 2))
            assert torch.allclose(v.crops[i, s, 1], (cy + xy).view(1, 2, 1).expand(2, 2, 2))
            assert torch.allclose(v.crops[i, s, 2], z.view(1, 1, 2).expand(2, 2, 2))
        for k in range(4):
            assert torch.allclose(v.bases[i, k, 0, :, 0, 0], 4 * (k // 2) + xy)
            assert torch.allclose(v.bases[i, k, 1, 0, :, 0], 4 * (k % 2) + xy)
    # the output size equal to the crop: no resampling at all (an integer volume becomes float)
    same = voco_views(_coords(8, 8, 4)[None].long(), n=2, num_crops=1, out_size=4, generator=_gen())
    assert same.bases.dtype == torch.float32
    assert torch.equal(same.bases[0], base_crops(_coords(8, 8, 4)[None], 2)[0])
    d = voco_views(torch.zeros(1, 1, 16, 16, 8), generator=_gen())  # defaults: n 4, 4 crops, 64^3
    assert d.bases.shape == (1, 16, 1, 64, 64, 64) and d.crops.shape == (1, 4, 1, 64, 64, 64)


def test_voco_augment_flips_rotates_and_shifts_exactly() -> None:
    t = _coords(4, 4, 4)[None].repeat(6, 1, 1, 1, 1)
    t_before = t.clone()
    flipped = augment_crops(t, p_flip=1.0, p_rot=0.0, p_shift=0.0, generator=_gen())
    assert torch.equal(flipped, t.flip(2, 3, 4)) and torch.equal(t, t_before)
    rot = augment_crops(t, p_flip=0.0, p_rot=1.0, p_shift=0.0, generator=_gen(1))
    ks = []
    for i in range(6):
        k = [
            r for r in range(4) if torch.equal(rot[i], rotate90(t[i : i + 1], torch.tensor([r]), "axial")[0])
        ]
        assert len(k) == 1 and k[0] != 0
        ks.append(k[0])
    shifted = augment_crops(t, p_flip=0.0, p_rot=0.0, p_shift=1.0, shift_offset=0.5, generator=_gen(2))
    s = shifted - t
    assert torch.allclose(s, s[:, :1, :1, :1, :1].expand_as(s))
    assert s.abs().max() <= 0.5 and (s[:, 0, 0, 0, 0] != 0).all()
    with pytest.raises(ValueError, match=r"expected \(M, C, X, Y, Z\)"):
        augment_crops(t[0])


def test_voco_augment_probabilities_per_axis_class_and_shift() -> None:
    m = 600
    t = _coords(2, 2, 2)[None].repeat(m, 1, 1, 1, 1)
    out = augment_crops(t, p_flip=0.3, p_rot=0.0, p_shift=0.0, generator=_gen(3))
    flips = torch.stack([out[:, a, 0, 0, 0] == 1 for a in range(3)], 1)  # axis a reversed
    frac = flips.float().mean(0)
    assert ((frac > 0.22) & (frac < 0.38)).all()
    both = (flips[:, 0] & flips[:, 1]).float().mean().item()
    assert 0.04 < both < 0.15  # independent axes: 0.09
    t4 = _coords(2, 2, 1)[None].repeat(m, 1, 1, 1, 1)
    rot = augment_crops(t4, p_flip=0.0, p_rot=0.6, p_shift=0.0, generator=_gen(4))
    cls = torch.full((m,), -1)
    for r in range(4):
        hit = (rot == rotate90(t4, torch.full((m,), r), "axial")).flatten(1).all(1)
        cls[hit] = r
    counts = torch.bincount(cls, minlength=4).float() / m
    assert counts[0].item() == pytest.approx(0.4, abs=0.07)
    assert all(0.12 < c < 0.28 for c in counts[1:].tolist())  # k uniform over {1, 2, 3}
    z = torch.zeros(m, 1, 2, 2, 2)
    sh = augment_crops(z, p_flip=0.0, p_rot=0.0, p_shift=0.4, shift_offset=0.2, generator=_gen(5))[
        :, 0, 0, 0, 0
    ]
    on = sh != 0
    assert 0.32 < on.float().mean().item() < 0.48
    assert sh.abs().max() <= 0.2 and sh.min() < -0.15 and sh.max() > 0.15
    # the released code's defaults: flips 0.2 per axis, quarter turns 0.2, shifts 0.1 by at most 0.1
    d = augment_crops(torch.zeros(m, 1, 2, 2, 2), generator=_gen(6))[:, 0, 0, 0, 0]
    assert 0.05 < (d != 0).float().mean().item() < 0.15 and d.abs().max() <= 0.1
    dt = augment_crops(t, p_shift=0.0, generator=_gen(7))
    fl = torch.stack([dt[:, a, 0, 0, 0] == 1 for a in range(2, 3)], 1).float().mean().item()
    assert 0.13 < fl < 0.27  # z is never turned: its flips alone show p_flip
    # x now reads y: an odd quarter turn (2 of the 3 classes of a turn)
    same = (dt[:, 0] == t[:, 0]).flatten(1).all(1) | (dt[:, 0] == t[:, 0].flip(1)).flatten(1).all(1)
    assert 0.08 < (~same).float().mean().item() < 0.2


# ---- Swin SSL cut-out ------------------------------------------------------------------------------


def test_cutout_boxes_sides_starts_and_the_volume_they_reach() -> None:
    shape = (20, 20, 40)
    lo, hi = (1, 1, 2), (5, 5, 10)  # floor(0.05 S), floor(0.25 S)
    starts, sides = [set(), set(), set()], [set(), set(), set()]
    for seed in range(12):
        boxes = _boxes(shape, 0.3, 0.05, 0.25, _gen(seed))
        vols = [math.prod(s.stop - s.start for s in box) for box in boxes]
        target = 0.3 * math.prod(shape)
        assert sum(vols) >= target and sum(vols[:-1]) < target  # stops once the target is reached
        for box in boxes:
            for a, s in enumerate(box):
                assert 0 <= s.start < shape[a] - lo[a]
                assert s.stop <= shape[a]
                starts[a].add(s.start)
                if s.stop < shape[a]:  # unclipped: the drawn side
                    assert lo[a] <= s.stop - s.start < hi[a]
                    sides[a].add(s.stop - s.start)
    for a in range(3):
        assert min(sides[a]) == lo[a] and max(sides[a]) == hi[a] - 1
        assert min(starts[a]) == 0 and max(starts[a]) == shape[a] - lo[a] - 1
    assert _boxes(shape, 0.0, 0.05, 0.25, _gen()) == []
    # an axis of one voxel: side and start pinned (side 1 at start 0); a side range of one value
    thin = _boxes((1, 4, 30), 0.2, 0.05, 0.1, _gen(1))
    assert all(b[0] == slice(0, 1) for b in thin) and all(b[1].stop - b[1].start == 1 for b in thin)


def test_cutout_single_noise_box_is_min_max_scaled_and_marked() -> None:
    x = torch.full((3, 2, 12, 12, 12), 5.0, dtype=torch.float64)
    res = cutout(x, max_fraction=1e-4, partner=False, generator=_gen(1))  # one box reaches the target
    assert res.x.dtype == torch.float64 and res.mask.dtype == torch.bool and res.mask.shape == (3, 12, 12, 12)
    for i in range(3):
        idx = res.mask[i].nonzero()
        ext = idx.max(0).values - idx.min(0).values + 1
        assert ext.prod().item() == len(idx)  # a box
        assert (ext >= 1).all() and (ext <= 2).all()  # sides in [floor(0.05*12), floor(0.25*12)) = [1, 3)
        vals = res.x[i][:, res.mask[i]]
        if vals.numel() > 1:
            assert vals.min().item() == 0.0 and vals.max().item() == 1.0
        assert (res.x[i][:, ~res.mask[i]] == 5.0).all()


def test_cutout_fraction_scales_with_max_fraction() -> None:
    x = torch.full((8, 1, 16, 16, 16), 5.0)
    small = cutout(x, max_fraction=0.05, partner=False, generator=_gen(2)).mask.float().mean().item()
    large = cutout(x, max_fraction=0.6, partner=False, generator=_gen(2)).mask.float().mean().item()
    assert small < 0.06 and large > 3 * small
    per = cutout(x, max_fraction=0.05, partner=False, generator=_gen(3)).mask.flatten(1).float().mean(1)
    assert per.max() <= 0.05 + 27 / 16**3  # f <= max_fraction, overshoot below one box (sides < 4)
    # a zero target is reached before any box is drawn
    assert not cutout(x, max_fraction=0.0, partner=False, generator=_gen()).mask.any()


def test_cutout_partner_boxes_copy_the_partner_and_defaults_do_both() -> None:
    x = torch.arange(1.0, 5.0).view(4, 1, 1, 1, 1).expand(4, 2, 16, 16, 16).contiguous() + 10
    res = cutout(x, noise=False, partner=True, generator=_gen(3))
    seen = set()
    for i in range(4):
        vals = set(res.x[i][:, res.mask[i]].flatten().tolist())
        assert vals <= {11.0, 12.0, 13.0, 14.0} - {11.0 + i}
        seen |= vals
        assert torch.equal(res.x[i][:, ~res.mask[i]], x[i][:, ~res.mask[i]])
    assert len(seen) >= 2  # partners are drawn over the batch
    d = cutout(x, generator=_gen(4))  # defaults: noise and partner boxes
    noise_vals = (d.x >= 0) & (d.x <= 1)
    pasted = (d.x > 10) & (d.x != x)
    assert noise_vals.any() and pasted.any()
    assert d.mask.float().mean().item() < 0.3 + 0.25**3
    with pytest.raises(ValueError, match=r"expected \(B, C, X, Y, Z\)"):
        cutout(x[0])
    for kw, msg in [
        (dict(max_fraction=1.1), "max_fraction=1.1"),
        (dict(max_fraction=-0.1), "max_fraction"),
        (dict(min_side=0.0), "0 < min_side < max_side <= 1"),
        (dict(min_side=0.3, max_side=0.3), "min_side < max_side"),
        (dict(max_side=1.5), "max_side <= 1"),
        (dict(partner_source="copy"), "partner_source 'copy'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            cutout(x, **kw)  # type: ignore[arg-type]
    assert cutout(x, max_fraction=1.0, min_side=0.5, max_side=1.0, noise=False, partner=False).mask.sum() == 0


# ---- resize, random resized crop, related crops -----------------------------------------------------


def test_resize_area_and_trilinear_exactly() -> None:
    v = _coords(2, 4, 8)[:1] + 1  # value = axis-0 index + 1
    area = resize_volumes([v], (4, 2, 4))
    assert area.shape == (1, 1, 4, 2, 4) and area.dtype == torch.float32
    assert area[0, 0, :, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]  # area upsampling repeats voxels
    tri = resize_volumes([v], (4, 2, 4), mode="trilinear")
    assert tri[0, 0, :, 0, 0].tolist() == [1.0, 1.25, 1.75, 2.0]  # linear, clamped at the border
    same = resize_volumes(v[None].long(), (2, 4, 8))
    assert same.dtype == torch.float32 and torch.equal(same, v[None])
    w = _coords(4, 4, 4)[2:]  # value = axis-2 index
    down = resize_volumes(torch.stack([w, w + 1]), 2)  # an int size: a cube; area = 2x2x2 means
    assert torch.equal(down[1, 0, 0, 0], torch.tensor([1.5, 3.5]))
    mixed = resize_volumes([w, v], 4)
    assert mixed.shape == (2, 1, 4, 4, 4) and torch.equal(mixed[0], w)


def test_resize_rejects_bad_input() -> None:
    v = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="size must be an int or 3 ints"):
        resize_volumes([v], (4, 4))
    with pytest.raises(ValueError, match=r"expected \(B, C, X, Y, Z\)"):
        resize_volumes(v, 4)
    with pytest.raises(ValueError, match="^resize_volumes: empty batch$"):
        resize_volumes([], 4)
    with pytest.raises(ValueError, match=r"expected a \(C, X, Y, Z\) volume"):
        resize_volumes([v[0]], 4)
    with pytest.raises(ValueError, match="resize mode 'cubic'"):
        resize_volumes([v], 2, mode="cubic")  # type: ignore[arg-type]


def test_random_resized_crop_box_size_position_and_flip() -> None:
    v = _coords(8, 12, 16)
    size = 4
    out = random_resized_crops(
        [v] * 48, size, scale=(0.125, 0.125), p_flip=0.0, mode="trilinear", generator=_gen(1)
    )
    starts = []
    for i in range(48):
        lo, side = _sampled_box(out[i], size)
        assert side.tolist() == pytest.approx([4.0, 6.0, 8.0], abs=1e-4)  # each side * 0.5
        assert (lo >= -1e-4).all() and (lo + side <= torch.tensor([8.0, 12.0, 16.0]) + 1e-4).all()
        assert torch.allclose(lo, lo.round(), atol=1e-4)  # whole voxels
        starts.append(lo.round())
    st = torch.stack(starts)
    assert st.min(0).values.tolist() == [0, 0, 0] and st.max(0).values.tolist() == [4, 6, 8]
    flipped = random_resized_crops(
        [v], size, scale=(0.125, 0.125), p_flip=1.0, mode="trilinear", generator=_gen(1)
    )
    assert torch.equal(flipped[0], out[0].flip(1))  # the same box, left-right flipped
    both = random_resized_crops([v] * 40, 2, scale=(1.0, 1.0), generator=_gen(2))  # default p 0.5, area
    lr = both[:, 0, 1, 0, 0] > both[:, 0, 0, 0, 0]
    assert 0.2 < lr.float().mean().item() < 0.8
    assert torch.allclose(both[~lr][0, 0], v[0].flip(0).reshape(2, 4, 6, 2, 8, 2).mean((1, 3, 5))[:, :1, :1])
    fr = []
    for s in random_resized_crops(
        [v] * 30, 4, scale=(0.3, 0.9), p_flip=0.0, mode="trilinear", generator=_gen(3)
    ):
        _, side = _sampled_box(s, 4)
        fr.append(side.prod().item() / (8 * 12 * 16))
    assert min(fr) >= 0.2 and max(fr) <= 1.0 and min(fr) < 0.45 and max(fr) > 0.7
    d = random_resized_crops([v] * 30, 2, generator=_gen(4))  # default scale 0.67-1
    assert d.shape == (30, 3, 2, 2, 2)
    for kw in (dict(scale=(0.0, 0.5)), dict(scale=(0.6, 0.5)), dict(scale=(0.5, 1.1))):
        with pytest.raises(ValueError, match="crop scale"):
            random_resized_crops([v], 4, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected a \(C, X, Y, Z\) volume"):
        random_resized_crops([v[0]], 4)
    tiny = random_resized_crops([_coords(1, 4, 4)], 2, scale=(0.01, 0.01), generator=_gen())
    assert tiny.shape == (1, 3, 2, 2, 2)  # 0.22 of 1 or 4 voxels rounds to 0: one voxel per axis
    assert (tiny.flatten(2).std(2) == 0).all()


def test_related_crops_offsets_cover_every_cell_and_masks_match() -> None:
    v = _coords(12, 12, 12)[None].repeat(60, 1, 1, 1, 1)
    pair = related_crops(v, 8, 2, 2, generator=_gen(5))
    assert set(pair.offset1.flatten().tolist()) == {0, 1, 2} == set(pair.offset2.flatten().tolist())
    assert pair.offset1.dtype == torch.long and pair.crop1.shape == (60, 3, 8, 8, 8)
    for i in range(60):
        assert torch.equal(pair.crop1[i, :, 0, 0, 0], (pair.offset1[i] * 2).float())
        assert torch.equal(pair.crop2[i, :, 0, 0, 0], (pair.offset2[i] * 2).float())
    m1, m2 = overlap_masks(pair.offset1, pair.offset2, 4)
    assert torch.equal(m1, pair.mask1) and torch.equal(m2, pair.mask2)
    zero = related_crops(v[:2], 8, 2, 0, generator=_gen())
    assert zero.mask1.all() and zero.mask2.all() and not zero.offset1.any()
    with pytest.raises(ValueError, match=r"expected \(B, C, X, Y, Z\)"):
        related_crops(v[0], 8, 2, 1)
    with pytest.raises(ValueError, match="crop size 9 is not divisible by the sub-volume size 2"):
        related_crops(v, 9, 2, 1)
    with pytest.raises(ValueError, match=r"max_offset_cells=-1 must lie in \[0, G-1\] = \[0, 3\]"):
        related_crops(v, 8, 2, -1)
    with pytest.raises(ValueError, match=r"max_offset_cells=2 must lie in \[0, G-1\] = \[0, 1\]"):
        related_crops(v, 4, 2, 2)  # M = G: the volume would be large enough, the crops may not overlap
    with pytest.raises(ValueError, match="smaller than size \\+ M\\*p = 14"):
        related_crops(v, 8, 2, 3)
    assert related_crops(v[:1, :, :10], 8, 2, 1, generator=_gen()).crop1.shape == (1, 3, 8, 8, 8)


def test_overlap_masks_by_hand() -> None:
    a, b = torch.tensor([[0, 1, 2]]), torch.tensor([[1, 1, 0]])
    m1, m2 = overlap_masks(a, b, 3)
    # shared global cells: x in [1, 3), y in [1, 4), z in [2, 3)
    c = block_coords(3)
    want1 = (c[:, 0] >= 1) & (c[:, 2] == 0)  # crop 1 local = global - a
    want2 = (c[:, 0] <= 1) & (c[:, 2] == 2)  # crop 2 local = global - b
    assert torch.equal(m1[0], want1) and torch.equal(m2[0], want2)


def test_anatomy_views_default_contrast_and_device_placement() -> None:
    torch.manual_seed(14)
    x = torch.full((1, 8, 8), 0.4)
    x[:, :, 4:] = 0.6  # mean 0.5: contrast moves the halves symmetrically
    boxes = torch.tensor([[[0, 8], [0, 8]]] * 64)
    v = anatomy_views(
        [x] * 64, boxes, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0.0, p_blur=0.0, rotation_deg=0.0
    )
    c = (v[:, 0, 0, 7] - v[:, 0, 0, 0]) / 0.2  # default contrast 0.4 with p 0.8
    assert c.min() >= 0.6 - 1e-4 and c.max() <= 1.4 + 1e-4 and c.min() < 0.8 and c.max() > 1.2
    # boxes may live on the CPU while the images live elsewhere (meta: shapes and devices only)
    out = resized_crops([torch.zeros(2, 6, 6, device="meta")], torch.tensor([[[0, 6], [1, 5]]]), 3)
    assert out.device.type == "meta" and out.shape == (1, 2, 3, 3)


# ---- Adam's decomposer -----------------------------------------------------------------------------


def test_part_boxes_exact_raster_order_spread_and_drop() -> None:
    spread = part_boxes((5, 7), 2)
    assert spread.dtype == torch.long
    rows, cols = [[0, 2], [2, 5]], [[0, 3], [3, 7]]
    assert spread.tolist() == [[r, c] for r in rows for c in cols]  # last axis fastest
    drop = part_boxes((5, 7), 2, remainder="drop")
    assert drop.tolist() == [[r, c] for r in ([0, 2], [2, 4]) for c in ([0, 3], [3, 6])]
    three = part_boxes((4, 6, 3), 2, "xy")
    assert three.tolist() == [[r, c, [0, 3]] for r in ([0, 2], [2, 4]) for c in ([0, 3], [3, 6])]
    assert part_boxes((4, 6, 3), 1, (2,)).tolist() == [[[0, 4], [0, 6], [0, 1]], [[0, 4], [0, 6], [1, 3]]]
    assert part_boxes((4, 4), 0).tolist() == [[[0, 4], [0, 4]]]
    assert part_boxes((3, 3), 2).tolist() == [
        [[0, 1], [0, 1]],
        [[0, 1], [1, 3]],
        [[1, 3], [0, 1]],
        [[1, 3], [1, 3]],
    ]
    assert len(part_boxes((2, 2), 2)) == 4  # parts == length is allowed


def test_grid_shape_axis_cycles_and_errors() -> None:
    assert grid_shape(3, 2) == (2, 4) and grid_shape(3, 2, "wh") == (2, 4)
    assert grid_shape(5, 3) == (4, 4, 2)  # 3D default: x, y, z
    assert grid_shape(3, 3, (2, 0)) == (2, 1, 4)
    assert grid_shape(3, 3, [1]) == (1, 8, 1)
    assert grid_shape(0, 2) == (1, 1)
    with pytest.raises(ValueError, match="granularity level -1 must be >= 0"):
        grid_shape(-1, 2)
    with pytest.raises(ValueError, match="spatial_dims=4: the decomposer handles 2D and 3D"):
        grid_shape(1, 4)
    with pytest.raises(ValueError, match=r"split_axes 'xq': use one of \['wh', 'xy', 'xyz'\]"):
        grid_shape(1, 3, "xq")
    for bad in [(0, 0), (3,), (-1,), ()]:
        with pytest.raises(ValueError, match="must name distinct axes of a 3D image"):
            grid_shape(1, 3, bad)
    grid_shape(1, 3, (0, 1, 2))  # the last axis index is valid


def test_bounds_errors() -> None:
    with pytest.raises(ValueError, match="cannot split an axis of 3 pixels into 4 parts"):
        part_boxes((3, 8), 4)
    with pytest.raises(ValueError, match="remainder 'pad': use 'spread' or 'drop'"):
        part_boxes((8, 8), 2, remainder="pad")  # type: ignore[arg-type]


def test_decomposition_crops_stack_and_record_the_draw() -> None:
    x = _coords(5, 6)[None].repeat(40, 1, 1, 1)
    x += torch.arange(40.0).view(40, 1, 1, 1) * 100
    d = decompose(x.shape, 2, generator=_gen(1))
    assert d.level == 2 and d.grid == (2, 2) and d.cell.dtype == torch.long and d.boxes.shape == (40, 2, 2)
    assert set(d.cell.tolist()) == {0, 1, 2, 3}
    allb = part_boxes((5, 6), 2)
    for i, crop in enumerate(d.crops(x)):
        (r0, r1), (c0, c1) = allb[d.cell[i]].tolist()
        assert torch.equal(crop, x[i, :, r0:r1, c0:c1])
        assert crop[0, 0, 0].item() == 100 * i + r0 and crop[1, 0, 0].item() == 100 * i + c0
    with pytest.raises(ValueError, match="parts differ in size"):
        d.stacked(x)  # 5 rows split 2 + 3
    dd = decompose(x.shape, 2, remainder="drop", generator=_gen(1))
    assert torch.equal(dd.cell, d.cell) and dd.stacked(x).shape == (40, 2, 2, 3)
    same = decompose(x[:2, :, :4].shape, 2, generator=_gen())
    assert same.stacked(x[:2, :, :4]).shape == (2, 2, 2, 3)
    v = decompose((2, 1, 4, 4, 4), 1, "xy", generator=_gen())
    assert v.grid == (2, 1, 1) and v.boxes[:, 1:].tolist() == [[[0, 4], [0, 4]]] * 2
    torch.manual_seed(2)
    a = decompose((30, 1, 8, 8), 4)
    torch.manual_seed(2)
    assert torch.equal(a.cell, decompose((30, 1, 8, 8), 4).cell)  # no generator: the global stream
    assert a.cell.max() <= 15 and len(set(a.cell.tolist())) > 8
    with pytest.raises(
        ValueError, match=r"expected \(B, C, H, W\) or \(B, C, X, Y, Z\), got shape \(1, 1, 2, 2, 2, 2\)"
    ):
        decompose((1, 1, 2, 2, 2, 2), 1)


def test_views_follow_the_device_of_their_input() -> None:
    # meta tensors carry shapes and devices but no data: every output must land on the input's
    # device, whether the draws use a (CPU) generator or the input's own device
    meta = "meta"
    x = torch.zeros(2, 1, 8, 8, 8, device=meta)
    for kw in (
        dict(generator=_gen()),
        {},
        dict(perm_ratio=0.5, generator=_gen()),
        dict(perm_ratio=0.1),
        dict(perm_ratio=0.1, generator=_gen()),  # fewer than 2 chosen: the identity, moved too
    ):
        sh = shuffle_blocks(x, 4, **kw)  # type: ignore[arg-type]
        assert {t.device.type for t in (sh.x_perm, sh.perm, sh.target3d, sh.target1d)} == {meta}
    assert random_cell_mask(2, (2, 2, 2), 0.5, _gen(), meta).device.type == meta
    assert random_cell_mask(2, (2, 2, 2), 0.5, None, meta).device.type == meta
    v = simmim_view(torch.zeros(1, 1, 16, 16, 16, device=meta), 8, generator=_gen())
    assert {t.device.type for t in (v.x_masked, v.cell_mask, v.token_mask, v.voxel_mask)} == {meta}
    assert random_corners(2, 3, 2, 4, _gen(), meta).device.type == meta
    assert random_corners(2, 3, 1, 4, _gen(), meta).device.type == meta
    assert random_corners(2, 3, 2, 4, None, meta).device.type == meta
    res = cutout(x, generator=_gen())
    assert res.x.device.type == meta and res.mask.device.type == meta
    assert intensity_jitter(torch.zeros(2, 1, 4, 4, device=meta), 0.4, 0.4, 0.8).device.type == meta
    assert random_rotate(torch.zeros(2, 1, 4, 4, device=meta), 30.0).device.type == meta
    assert decompose((2, 1, 8, 8), 2, generator=_gen()).cell.device.type == "cpu"


def test_anatomy_views_default_blur_and_rotation() -> None:
    torch.manual_seed(15)
    n = 300
    delta = torch.zeros(1, 9, 9)
    delta[0, 4, 4] = 1.0
    boxes = torch.tensor([[[0, 9], [0, 9]]] * n)
    crop = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_jitter=0.0)
    v = anatomy_views([delta] * n, boxes, 9, **crop, rotation_deg=0.0)  # default blur: p 0.5
    blurred = (v[:, 0, 4, 4] < 1.0).float().mean().item()
    assert 0.4 < blurred < 0.6
    sig = (-0.5 / torch.log(v[:, 0, 4, 5] / v[:, 0, 4, 4]))[v[:, 0, 4, 4] < 1.0].sqrt()
    assert sig.min() >= 0.1 - 1e-3 and sig.max() <= 2.0 + 1e-3 and sig.max() > 1.5  # sigma ~ U(0.1, 2)
    # default rotation: U(-30, 30) degrees, read off a coordinate image in [0, 1]
    img = _coords(9, 9) / 16 + 0.2
    v = anatomy_views([img] * n, boxes, 9, **crop, p_blur=0.0)
    m = torch.stack([(v[:, :, 5, 4] - v[:, :, 3, 4]) * 8, (v[:, :, 4, 5] - v[:, :, 4, 3]) * 8], -1)
    ang = torch.rad2deg(torch.atan2(m[:, 1, 0], m[:, 0, 0]))
    assert ang.abs().max() <= 30.0 + 1e-2 and ang.abs().max() > 29.0


def _pair(p: CropPair) -> tuple[torch.Tensor, torch.Tensor]:
    return p.crop1, p.crop2


def _views_on_cpu_inputs() -> dict[str, Callable[[], torch.Tensor]]:
    x2, x3 = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8, 8)
    boxes = torch.tensor([[[0, 8], [1, 7]]] * 2)
    perm = torch.tensor([[1, 0, 3, 2, 5, 4, 7, 6], [7, 6, 5, 4, 3, 2, 1, 0]])
    t3 = torch.rand(2, 8, 3) * 6 - 3
    return {
        "resized_crops": lambda: resized_crops([x2[0], x2[1]], boxes, 4),
        "intensity_jitter": lambda: intensity_jitter(x2, 0.4, 0.4, 0.8),
        "gaussian_blur": lambda: gaussian_blur(x2, (0.1, 2.0), 1.0),
        "random_rotate": lambda: random_rotate(x2, 30.0),
        "anatomy_views": lambda: anatomy_views(x2, boxes, 4, p_blur=1.0),
        "shuffle": lambda: shuffle_blocks(x3, 4, generator=_gen()).target3d,
        "shuffle_global": lambda: shuffle_blocks(x3, 4).x_perm,
        "shuffle_partial": lambda: shuffle_blocks(x3, 4, 0.5).perm,
        "unshuffle": lambda: unshuffle(x3, perm, 4),
        "perm_from_target3d": lambda: perm_from_target3d(t3, 2),
        "block_coords": lambda: block_coords(3, "cpu"),
        "simmim": lambda: simmim_view(x3, 4, 0.5, 2, generator=_gen()).token_mask,
        "simmim_global": lambda: simmim_view(x3, 4, 0.5, 2, "mean").x_masked,
        "rotations": lambda: random_rotations(x3, generator=_gen())[1],
        "rotations_global": lambda: random_rotations(x3)[0],
        "voco": lambda: voco_views(x3, 2, 2, 4, generator=_gen()).crops,
        "voco_global": lambda: voco_views(x3, 2, 2, 4).labels,
        "augment": lambda: augment_crops(x3, 0.5, 0.5, 0.5, generator=_gen()),
        "augment_global": lambda: augment_crops(x3, 0.5, 0.5, 0.5),
        "cutout": lambda: cutout(x3, generator=_gen()).x,
        "cutout_global": lambda: cutout(x3).mask,
        "related": lambda: torch.cat(_pair(related_crops(x3, 4, 2, 1, generator=_gen()))),
        "related_global": lambda: related_crops(x3, 4, 2, 1).mask1,
        "decompose": lambda: decompose((2, 1, 8, 8), 2, generator=_gen()).cell,
        "decompose_global": lambda: decompose((2, 1, 8, 8), 2).cell,
        "corners": lambda: random_corners(2, 3, 2, 4),
        "corners_one_position": lambda: random_corners(2, 3, 2, 1),  # (n-1)*b = 1: only corner 0
        "cell_mask": lambda: random_cell_mask(2, (2, 2, 2), 0.5),
        "resize": lambda: resize_volumes([x3[0]], 4, "trilinear"),
        "resized_crop": lambda: random_resized_crops([x3[0], x3[1]], 4, generator=_gen()),
    }


def test_views_place_what_they_create_on_the_input_device_not_the_default_one() -> None:
    # a user may set torch's default device (e.g. to CUDA): every tensor a view creates must still
    # follow its input (here: CPU inputs under a meta default device, where CPU/meta mixing fails)
    for name, view in _views_on_cpu_inputs().items():
        torch.manual_seed(0)
        want = view()
        torch.manual_seed(0)
        with torch.device("meta"):
            got = view()
        assert got.device.type == "cpu" and torch.equal(got, want), name


def test_a_seeded_generator_alone_fixes_every_view() -> None:
    # the draws of a view given a generator come from it only, never from torch's global stream
    x3 = torch.rand(3, 2, 8, 8, 8)
    views = {
        "shuffle": lambda: shuffle_blocks(x3, 4, generator=_gen(1)).x_perm,
        "shuffle_partial": lambda: shuffle_blocks(x3, 2, 0.3, generator=_gen(1)).perm,
        "simmim": lambda: simmim_view(x3, 4, 0.5, 2, generator=_gen(1)).x_masked,
        "rotations": lambda: random_rotations(x3, generator=_gen(1))[0],
        "voco": lambda: voco_views(x3, 2, 3, 4, generator=_gen(1)).crops,
        "augment": lambda: augment_crops(x3, 0.5, 0.5, 0.5, generator=_gen(1)),
        "cutout": lambda: cutout(x3, generator=_gen(1)).x,
        "cutout_in_place": lambda: cutout(x3, partner_source="in_place", generator=_gen(1)).x,
        "related": lambda: torch.cat(_pair(related_crops(x3, 4, 2, 1, generator=_gen(1)))),
        "decompose": lambda: decompose(x3.shape, 3, generator=_gen(1)).boxes,
        "resized_crop": lambda: random_resized_crops(list(x3), 4, (0.3, 0.9), generator=_gen(1)),
    }
    for name, view in views.items():
        torch.manual_seed(0)
        a = view()
        torch.manual_seed(1)
        assert torch.equal(view(), a), name


def test_voco_labels_and_augmented_crops_keep_their_dtypes() -> None:
    # labels are float32 whatever torch's default dtype; augmented crops keep the crops' dtype (AMP)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert overlap_labels(torch.tensor([[[1, 2]]]), 2, 4).dtype == torch.float32
    finally:
        torch.set_default_dtype(old)
    t = _coords(4, 4, 4)[None].repeat(8, 1, 1, 1, 1).half()
    out = augment_crops(t, 0.5, 0.5, 1.0, generator=_gen())
    assert out.dtype == torch.float16


def test_fill_masked_keeps_integer_volumes_and_averages_a_single_visible_voxel() -> None:
    x = torch.arange(8).view(1, 1, 2, 2, 2)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 1, 1] = False  # one visible voxel (value 7): the mean over it is 7
    zero = fill_masked(x, mask, "zero")
    assert zero.dtype == torch.int64 and zero.flatten().tolist() == [0] * 7 + [7]
    mean = fill_masked(x.float(), mask, "mean")
    assert mean.flatten().tolist() == [7.0] * 8


def test_cutout_single_voxel_boxes_and_a_one_voxel_target() -> None:
    # sides in [floor(0.1 * 10), max(1 + 1, floor(0.2 * 10))) = [1, 2): every noise box is one voxel,
    # its two channel values min-max scaled to exactly 0 and 1
    x = torch.full((6, 2, 10, 10, 10), 5.0)
    res = cutout(x, max_fraction=0.02, min_side=0.1, max_side=0.2, partner=False, generator=_gen(6))
    for i in range(6):
        vals = res.x[i][:, res.mask[i]]  # (2, voxels)
        assert vals.shape[1] > 0
        assert torch.equal(vals.sort(0).values, torch.tensor([[0.0], [1.0]]).expand_as(vals))
    # a target of one voxel: exactly one box
    assert len(_boxes((10, 10, 10), 0.001, 0.05, 0.25, _gen())) == 1


def test_cutout_clean_partners_paste_the_clean_input() -> None:
    x = torch.full((2, 1, 16, 16, 16), 5.0)
    x[1] = 7.0
    differs = False
    for seed in range(12):
        clean = cutout(x, partner_source="clean", generator=_gen(seed)).x
        inplace = cutout(x, partner_source="in_place", generator=_gen(seed)).x
        diff = clean != inplace  # where the code's order pastes what a partner already carries
        assert (clean[diff] >= 5.0).all()  # clean: the partner's input, never noise
        differs |= bool(diff.any())
    assert differs


def test_cutout_partner_is_drawn_over_the_whole_batch_itself_included() -> None:
    b = 6
    x = torch.arange(1.0, b + 1).view(b, 1, 1, 1, 1).expand(b, 1, 12, 12, 12).contiguous()
    sources, no_paste = set(), 0
    for seed in range(8):
        res = cutout(x, noise=False, generator=_gen(seed))
        for i in range(b):
            vals = set(res.x[i, 0][res.mask[i]].tolist())
            assert float(i + 1) not in vals and len(vals) <= 1  # one partner j != i per sample
            sources |= vals
            no_paste += not res.mask[i].any()
    assert sources == {float(v) for v in range(1, b + 1)}  # every sample, the first included
    assert no_paste > 0  # j == i: nothing pasted


def test_resized_crop_pads_by_the_border_and_ignores_the_default_dtype() -> None:
    # upsampling a part at the image edge reads half a pixel past it: border padding keeps a
    # constant image constant (zero padding would darken the edges)
    ones = torch.ones(1, 2, 2)
    out = resized_crops([ones], torch.tensor([[[0, 2], [0, 2]]]), 4, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(out, torch.ones(1, 1, 4, 4))
    old = torch.get_default_dtype()
    try:  # the sampling grid is float32 like the image, whatever torch's default dtype
        torch.set_default_dtype(torch.float64)
        img = _coords(6, 6)
        out = resized_crops([img], torch.tensor([[[0, 6], [0, 6]]]), 6, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    finally:
        torch.set_default_dtype(old)
    assert out.dtype == torch.float32 and torch.allclose(out[0], img.float(), atol=1e-5)


@pytest.mark.parametrize(("shape", "s"), [((40, 40), 0.25), ((24, 24, 24), 0.125)])
def test_resized_crop_aspect_jitter_keeps_the_area_or_volume_fraction(
    shape: tuple[int, ...], s: float
) -> None:
    # a fixed s with a random aspect: the side fractions multiply to s exactly (no side is clipped)
    torch.manual_seed(16)
    n, size, d = 24, 4, len(shape)
    img = _coords(*shape)
    box = torch.tensor([[0, shape[0]]] * d)
    out = resized_crops([img] * n, torch.stack([box] * n), size, scale=(s, s), ratio=(3 / 4, 4 / 3))
    aspects = []
    for i in range(n):
        _, side = _sampled_box(out[i], size)
        f = side / shape[0]
        assert f.prod().item() == pytest.approx(s, rel=1e-3)
        aspects.append((f[-1] / f[0]).item())
    assert min(aspects) < 0.9 and max(aspects) > 1.1

"""SimMIM's loss and method pieces on tiny hand-built inputs: exact loss values, the mask checks,
config refusals, which view and which network path each setting selects (no training run)."""

from __future__ import annotations

import re

import pytest
import torch

import asa3d.methods.simmim as simmim_mod
from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.methods.base import build_method
from asa3d.methods.simmim import SimMIM, SimMIMConfig
from asa3d.methods.simmim_losses import EPS, masked_l1, visible_l1
from asa3d.views.masking import MaskedView
from asa3d.views.resize import resize_volumes
from asa3d.views.resized_crop import random_resized_crops

MODEL = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1), drop_path_rate=0.0)


# ---- losses -------------------------------------------------------------------------------------
def _pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B=2, C=2, 2, 1, 1) prediction and target, mask on voxel 0 of sample 0 and voxel 1 of sample 1."""
    pred = torch.tensor([[[1.0, 10.0], [3.0, 20.0]], [[100.0, 5.0], [200.0, -7.0]]]).view(2, 2, 2, 1, 1)
    target = torch.zeros(2, 2, 2, 1, 1)
    mask = torch.tensor([[True, False], [False, True]]).view(2, 2, 1, 1)
    return pred, target, mask


def test_masked_l1_exact_over_channels_and_batch() -> None:
    pred, target, mask = _pair()
    # masked errors: sample 0 voxel 0: |1| + |3|; sample 1 voxel 1: |5| + |-7| -> 16 over 2 voxels, C = 2
    want = 16.0 / (2 + EPS) / 2
    assert masked_l1(pred, target, mask).item() == pytest.approx(want, rel=1e-7)
    # visible: 10 + 20 + 100 + 200 = 330 over 2 voxels
    assert visible_l1(pred, target, mask).item() == pytest.approx(330.0 / (2 + EPS) / 2, rel=1e-7)
    # a (B, 1, X, Y, Z) mask is taken as it is
    assert masked_l1(pred, target, mask[:, None]).item() == pytest.approx(want, rel=1e-7)
    # the target's sign matters (a difference, not a sum)
    assert masked_l1(pred, pred, mask).item() == 0.0
    assert masked_l1(pred, -pred, mask).item() == pytest.approx(2 * want, rel=1e-7)
    assert EPS == 1e-5


def test_masked_l1_of_an_empty_mask_is_zero_and_fp32() -> None:
    pred, target, mask = _pair()
    out = masked_l1(pred.half(), target.half(), torch.zeros_like(mask))
    assert out.dtype == torch.float32 and out.item() == 0.0
    # half inputs are compared in fp32: 2049 - 0 is not rounded to 2048
    p = torch.full((1, 1, 1, 1, 1), 2049.0)
    got = masked_l1(p.half().float(), torch.zeros_like(p), torch.ones(1, 1, 1, 1, dtype=torch.bool))
    assert got.item() == pytest.approx(2048.0 / (1 + EPS))  # fp16 holds 2048 only: the input rounds
    exact = masked_l1(p.double(), torch.zeros_like(p).double(), torch.ones(1, 1, 1, 1, dtype=torch.bool))
    assert exact.dtype == torch.float32 and exact.item() == pytest.approx(2049.0 / (1 + EPS))


def test_masked_l1_counts_a_half_precision_mask_in_fp32() -> None:
    # 4097 masked voxels: fp16 cannot hold the count (it rounds to 4096); the loss counts in fp32
    n = 4097
    pred = torch.full((1, 1, n, 1, 1), 3.0)
    mask = torch.ones(1, n, 1, 1, dtype=torch.float16)
    assert masked_l1(pred, torch.zeros_like(pred), mask).item() == pytest.approx(
        3.0 * n / (n + EPS), rel=1e-7
    )


def test_masked_l1_gradient_only_on_masked_voxels() -> None:
    pred, target, mask = _pair()
    pred.requires_grad_(True)
    masked_l1(pred, target, mask).backward()
    g = pred.grad
    assert (g[:, :, 0, 0, 0][0] != 0).all() and (g[:, :, 1, 0, 0][1] != 0).all()
    assert (g[0, :, 1] == 0).all() and (g[1, :, 0] == 0).all()
    assert visible_l1(pred, target, mask).requires_grad is False  # a diagnostic only


@pytest.mark.parametrize(
    ("mask_shape", "what"),
    [
        ((3, 2, 1, 1), "batch"),
        ((2, 2, 2, 1, 1), "channels"),
        ((2, 2, 1, 2), "spatial"),
        ((2, 1, 1, 1, 1), "spatial, with a channel axis"),
    ],
)
def test_mask_must_match_the_prediction(mask_shape: tuple[int, ...], what: str) -> None:
    pred, target, _ = _pair()
    msg = re.escape(f"mask {tuple(mask_shape)} does not match prediction (2, 2, 2, 1, 1)")
    with pytest.raises(ValueError, match=msg):
        masked_l1(pred, target, torch.ones(mask_shape, dtype=torch.bool))


def test_prediction_and_target_shapes_must_agree() -> None:
    pred, _, mask = _pair()
    with pytest.raises(ValueError, match=r"prediction \(2, 2, 2, 1, 1\) and target \(2, 1, 2, 1, 1\) differ"):
        masked_l1(pred, torch.zeros(2, 1, 2, 1, 1), mask)


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("over", "match"),
    [
        (
            {"input_size": 80},
            r"method.input_size=80: SwinUNETR needs a multiple of 32, and its decoder at least 64",
        ),
        ({"input_size": 32, "mask_cell_size": 8}, r"method.input_size=32: .*at least 64"),
        ({"mask_cell_size": 1}, r"method.mask_cell_size=1 must divide method.input_size=64\."),
        ({"mask_cell_size": 24}, r"method.mask_cell_size=24 must divide method.input_size=64\."),
        ({"mask_ratio": 0.0}, r"method.mask_ratio=0.0: must lie in \(0, 1\)\."),
        ({"mask_ratio": 1.0}, r"method.mask_ratio=1.0: must lie in \(0, 1\)\."),
        ({"crop_scale": (0.0, 1.0)}, r"method.crop_scale=\(0.0, 1.0\): need 0 < lo <= hi <= 1\."),
        ({"crop_scale": (0.6, 0.5)}, r"crop_scale"),
        ({"crop_scale": (0.5, 1.01)}, r"crop_scale"),
    ],
)
def test_config_refusals(over: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SimMIMConfig(**{"input_size": 64, **over}).validate()


@pytest.mark.parametrize(
    "over",
    [
        {"input_size": 64, "mask_cell_size": 2},
        {"input_size": 96, "mask_cell_size": 32},
        {"input_size": 64, "mask_ratio": 0.01, "crop_scale": (0.5, 0.5)},
        {"input_size": 64, "mask_ratio": 0.99, "crop_scale": (1.0, 1.0)},
    ],
)
def test_config_edges_accepted(over: dict) -> None:
    SimMIMConfig(**over).validate()


def test_network_refusals() -> None:
    with pytest.raises(ConfigError, match=r"model.in_channels=2: SimMIM pretrains on 1-channel CT\."):
        SimMIM(SimMIMConfig(input_size=64), ModelConfig(feature_size=12, in_channels=2))
    with pytest.raises(
        ConfigError, match=r"method.mask_cell_size=2 must be a multiple of model.patch_size=4 "
    ):
        SimMIM(SimMIMConfig(input_size=64, mask_cell_size=2), ModelConfig(feature_size=12, patch_size=4))


# ---- the method's pieces ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def light() -> SimMIM:
    torch.manual_seed(0)
    return build_method({"name": "simmim", "input_size": 64, "head": "light"}, MODEL)


def test_layout_and_contract(light: SimMIM) -> None:
    assert light.phases() == ["mim"] and light.sample_spec("mim").mode == "whole"
    assert light.mask_token.token.shape == (1, 12, 1, 1, 1)  # channels of h0 = feature_size
    assert light.light_head.conv.in_channels == 16 * 12  # h4
    assert light.light_head.conv.out_channels == 32**3  # scale = patch 2 x 16 = 32, one channel
    assert set(light.transfer_state_dict()) == set(light.backbone.net.state_dict())
    assert light.transfer_parts() == {
        "patch_embed": True,
        "layers1": True,
        "layers2": True,
        "layers3": True,
        "layers4": True,
        "encoders": False,
        "decoder": False,
    }
    dec = build_method({"name": "simmim", "input_size": 64}, MODEL)
    assert not hasattr(dec, "light_head") and all(dec.transfer_parts().values())


def test_views_resize_or_crop_and_mask(light: SimMIM) -> None:
    g = torch.Generator().manual_seed(0)
    vols = [torch.rand(1, 40, 50, 60, generator=g), torch.rand(1, 70, 64, 66, generator=g)]
    light.eval()  # no augmentation outside training: the plain resize
    torch.manual_seed(0)
    x, view = light.make_views(vols)
    torch.testing.assert_close(x, resize_volumes(vols, 64, "area"), rtol=0, atol=0)
    assert view.cell_mask.shape == (2, 4, 4, 4) and view.token_mask.shape == (2, 32, 32, 32)
    assert view.voxel_mask.shape == (2, 64, 64, 64)
    assert view.cell_mask.float().mean(dim=(1, 2, 3)).tolist() == [0.5, 0.5]
    assert (view.x_masked[:, 0][view.voxel_mask] == 0).all()  # zero fill
    torch.testing.assert_close(view.x_masked[:, 0][~view.voxel_mask], x[:, 0][~view.voxel_mask])
    light.train()  # training: a random resized crop (and flip) of each volume, not the plain resize
    x2, _ = light.make_views(torch.stack([resize_volumes(vols[:1], 64)[0]] * 2))
    assert x2.shape == (2, 1, 64, 64, 64)
    assert not torch.equal(x2[0], x2[1])
    cfg, model_cfg = light.cfg, light.model_cfg
    try:
        # the configured crop scale and resize mode, on a list of volumes of different shapes
        light.cfg = SimMIMConfig(input_size=64, resize_mode="trilinear", crop_scale=(0.3, 0.4), head="light")
        light.model_cfg = ModelConfig(feature_size=12, patch_size=4)  # the token mask follows the patch
        torch.manual_seed(3)
        x4, v4 = light.make_views(vols)
        torch.manual_seed(3)
        want = random_resized_crops(vols, 64, (0.3, 0.4), mode="trilinear")
        torch.testing.assert_close(x4, want, rtol=0, atol=0)
        assert v4.token_mask.shape == (2, 16, 16, 16) and v4.cell_mask.shape == (2, 4, 4, 4)
        light.model_cfg = model_cfg
        light.cfg = SimMIMConfig(
            input_size=64,
            resize_mode="trilinear",
            mask_cell_size=32,
            mask_ratio=0.25,
            mask_fill="mean",
            augment="none",
            head="light",
        )
        x3, v3 = light.make_views(vols)  # training, but augment none: the plain resize
        torch.testing.assert_close(x3, resize_volumes(vols, 64, "trilinear"), rtol=0, atol=0)
        assert not torch.equal(x3, resize_volumes(vols, 64, "area"))
        assert v3.cell_mask.shape == (2, 2, 2, 2) and v3.cell_mask.float().mean().item() == 0.25
        assert v3.token_mask.shape == (2, 32, 32, 32)
        m = v3.voxel_mask[0]
        filled = v3.x_masked[0, 0][m]  # mean fill: one value near the volume's mean, not zero
        assert torch.all(filled == filled[0]) and abs(filled[0].item() - x3[0, 0].mean().item()) < 0.01
    finally:
        light.cfg, light.model_cfg = cfg, model_cfg


def test_reconstruct_routes_through_the_configured_head(light: SimMIM, monkeypatch) -> None:  # noqa: ANN001
    calls = []
    hidden = [torch.full((1, 1), float(i)) for i in range(5)]

    def fake_encode(backbone, x, token_mask, token):  # noqa: ANN001, ANN202
        calls.append(("encode", backbone, x, token_mask, token))
        return hidden

    def fake_forward(backbone, x, token_mask, token):  # noqa: ANN001, ANN202
        calls.append(("forward", backbone, x, token_mask, token))
        return torch.tensor(7.0), hidden

    monkeypatch.setattr(simmim_mod, "masked_encode", fake_encode)
    monkeypatch.setattr(simmim_mod, "masked_forward", fake_forward)

    class Times10(torch.nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h * 10

    monkeypatch.setattr(light, "light_head", Times10())
    xm, tm = torch.ones(1), torch.zeros(1, dtype=torch.bool)
    view = MaskedView(x_masked=xm, cell_mask=tm, token_mask=tm, voxel_mask=tm)
    assert light.reconstruct(view).item() == 40.0  # light head on h4
    cfg = light.cfg
    try:
        light.cfg = SimMIMConfig(input_size=64, head="decoder")
        assert light.reconstruct(view).item() == 7.0  # the decoder output, not the hidden states
    finally:
        light.cfg = cfg
    assert [c[0] for c in calls] == ["encode", "forward"]
    for _, backbone, x, token_mask, token in calls:
        assert backbone is light.backbone and x is xm and token_mask is tm and token is light.mask_token


def test_masked_step_terms(light: SimMIM, monkeypatch) -> None:  # noqa: ANN001
    pred, target, mask = _pair()
    pred1, target1 = pred[:, :1], target[:, :1]  # one channel, as the network
    monkeypatch.setattr(light, "reconstruct", lambda view: pred1.clone().requires_grad_(True))
    view = MaskedView(x_masked=target1, cell_mask=mask, token_mask=mask, voxel_mask=mask)
    out = light.masked_step(target1, view)
    assert set(out.terms) == {"masked_l1", "visible_l1", "mask_fraction"}
    assert out.loss.item() == pytest.approx((1 + 5) / (2 + EPS), rel=1e-7) and out.loss.requires_grad
    assert out.terms["masked_l1"] is out.loss
    assert out.terms["visible_l1"].item() == pytest.approx((10 + 100) / (2 + EPS), rel=1e-7)
    assert out.terms["mask_fraction"].item() == 0.5 and not out.terms["mask_fraction"].requires_grad
    captured = {}

    def fake_step(x, view):  # noqa: ANN001, ANN202
        captured["x"], captured["view"] = x, view
        return "step"

    monkeypatch.setattr(light, "masked_step", fake_step)
    light.eval()
    vols = [torch.rand(1, 64, 64, 64)]
    assert light.training_step({"image": vols}, "mim") == "step"
    torch.testing.assert_close(captured["x"], resize_volumes(vols, 64), rtol=0, atol=0)
    assert captured["view"].voxel_mask.shape == (1, 64, 64, 64)


def test_simmim_recipe_without_a_no_decay_group_adds_one_for_the_token(light: SimMIM, monkeypatch) -> None:  # noqa: ANN001
    from asa3d.engine.param_groups import ParamGroup

    seen = {}

    def only_decay(module, wd, only):  # noqa: ANN001, ANN202
        seen["only"] = only
        return [ParamGroup("decay", list(only), wd, 1.0)]

    monkeypatch.setattr(simmim_mod, "decay_groups", only_decay)
    cfg = light.cfg
    try:
        light.cfg = SimMIMConfig(input_size=64, head="light", optim_recipe="simmim")
        groups = light.param_groups(0.05)
    finally:
        light.cfg = cfg
    token = light.mask_token.token
    assert all(p is not token for p in seen["only"])
    assert len(seen["only"]) == len(list(light.trainable_parameters())) - 1
    assert [(g.name, g.weight_decay, g.lr_scale) for g in groups] == [
        ("decay", 0.05, 1.0),
        ("no_decay", 0.0, 1.0),
    ]
    assert groups[1].params == [token]
    asa = light.param_groups(0.03)
    assert [(g.name, g.weight_decay, g.lr_scale) for g in asa] == [("all", 0.03, 1.0)]
    assert len(asa[0].params) == len(list(light.trainable_parameters()))

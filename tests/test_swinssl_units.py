"""Swin UNETR SSL's method piece by piece: every config check by its message and boundary, the
random crops (padding, offsets, order), the body box, the views handed to the heads (rotations,
cut-outs, targets, labels) and the weighted sum of the three losses."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import asa3d.methods.swinssl as swinssl_mod
from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.methods.base import build_method
from asa3d.methods.swinssl import SwinSSLConfig, foreground_boxes, random_crops
from asa3d.methods.swinssl_losses import inpainting_loss, nt_xent, rotation_loss
from asa3d.views.rotation import random_rotations

MODEL = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1), drop_path_rate=0.0)
SWINSSL = {"name": "swinssl", "crop_size": 64, "contrastive_dim": 16}


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (
            {"crop_size": 48},
            "method.crop_size=48: a multiple of 32 and at least 64 (the heads read tokens 0 and 1 of "
            "the last stage, and the inpainting head's InstanceNorm needs 2 voxels there).",
        ),
        (
            {"crop_size": 80},
            "method.crop_size=80: a multiple of 32 and at least 64 (the heads read tokens 0 and 1 of "
            "the last stage, and the inpainting head's InstanceNorm needs 2 voxels there).",
        ),
        (
            {"crop_size": 32},
            "method.crop_size=32: a multiple of 32 and at least 64 (the heads read tokens 0 and 1 of "
            "the last stage, and the inpainting head's InstanceNorm needs 2 voxels there).",
        ),
        ({"crops_per_volume": 0}, "method.crops_per_volume=0: must be at least 1."),
        ({"cutout_max_fraction": -0.1}, "method.cutout_max_fraction=-0.1: must lie in [0, 1]."),
        ({"cutout_max_fraction": 1.1}, "method.cutout_max_fraction=1.1: must lie in [0, 1]."),
        ({"cutout_min_side": 0.0}, "method.cutout_min_side/cutout_max_side: need 0 < min < max <= 1."),
        ({"cutout_min_side": 0.25}, "method.cutout_min_side/cutout_max_side: need 0 < min < max <= 1."),
        ({"cutout_max_side": 1.01}, "method.cutout_min_side/cutout_max_side: need 0 < min < max <= 1."),
        ({"temperature": 0.0}, "method.temperature=0.0: must be > 0."),
        (
            {"inpainting_region": "cutout", "cutout": False},
            "method.inpainting_region=cutout needs method.cutout=true.",
        ),
        ({"lambda_rot": -0.5}, "method.lambda_rot=-0.5: loss weights must be >= 0."),
        ({"lambda_con": -0.5}, "method.lambda_con=-0.5: loss weights must be >= 0."),
        ({"lambda_rec": -0.5}, "method.lambda_rec=-0.5: loss weights must be >= 0."),
    ],
)
def test_config_refuses_with_a_message(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError) as err:
        SwinSSLConfig(**kw).validate()
    assert str(err.value) == msg  # the whole message: which key, and how to fix it


@pytest.mark.parametrize(
    "kw",
    [
        {"crop_size": 64},
        {"crops_per_volume": 1},
        {"cutout_max_fraction": 0.0},
        {"cutout_max_fraction": 1.0},
        {"cutout_min_side": 0.01, "cutout_max_side": 1.0},
        {"temperature": 1e-3},
        {"inpainting_region": "cutout", "cutout": True},
        {"inpainting_region": "all", "cutout": False},
        {"lambda_rot": 0.0, "lambda_con": 0.0, "lambda_rec": 0.0},
    ],
)
def test_config_accepts_the_boundaries(kw: dict[str, Any]) -> None:
    SwinSSLConfig(**kw).validate()


def _offset(crop: torch.Tensor, v: torch.Tensor, size: int) -> tuple[int, int, int]:
    """Where ``crop`` sits in ``v`` (every voxel distinct, so at most one place fits)."""
    x, y, z = v.shape[1:]
    for a in range(x - size + 1):
        for b in range(y - size + 1):
            for c in range(z - size + 1):
                if torch.equal(v[:, a : a + size, b : b + size, c : c + size], crop):
                    return a, b, c
    raise AssertionError("the crop is not a block of the volume")


def test_random_crops_are_blocks_of_each_volume_in_volume_order() -> None:
    v0 = torch.arange(1.0, 1 + 5 * 6 * 4).view(1, 5, 6, 4)
    v1 = -torch.arange(1.0, 1 + 4 * 4 * 4).view(1, 4, 4, 4)
    torch.manual_seed(0)
    out = random_crops([v0, v1], 4, 3)
    assert out.shape == (6, 1, 4, 4, 4)
    assert (out[:3] > 0).all() and (out[3:] < 0).all()  # volume-major
    seen = {_offset(out[i], v0, 4) for i in range(3)}
    assert all(c == 0 for _, _, c in seen)  # z fits exactly: offset 0
    assert torch.equal(out[3], v1) and torch.equal(out[5], v1)  # the size exactly: the volume itself
    # every offset is reachable, none beyond: x in {0, 1}, y in {0, 1, 2}
    torch.manual_seed(1)
    many = random_crops([v0], 4, 60)
    offs = {_offset(c, v0, 4)[:2] for c in many}
    assert offs == {(a, b) for a in range(2) for b in range(3)}


def test_random_crops_pad_smaller_volumes_at_the_end_of_each_axis() -> None:
    v = torch.arange(1.0, 1 + 3 * 5 * 2).view(1, 3, 5, 2)
    torch.manual_seed(0)
    out = random_crops([v], 4, 8)
    assert out.shape == (8, 1, 4, 4, 4)
    padded = torch.zeros(1, 4, 5, 4)
    padded[:, :3, :, :2] = v
    offs = {_offset(c, padded, 4) for c in out}
    assert {o[1] for o in offs} == {0, 1} and all(o[0] == 0 and o[2] == 0 for o in offs)


def test_foreground_boxes_are_plain_tensors_and_crop_strictly_positive_voxels() -> None:
    v = torch.zeros(1, 160, 64, 64)
    v[0, 10:20, 5:9, 3:7] = 2.0
    v[0, 100:110] = 1e-3  # small but positive: still body
    (box,) = foreground_boxes([v], 64)
    assert type(box) is torch.Tensor
    # x: 10..110 grown to a multiple of 64 (128), y and z: 64 already
    assert box.shape == (1, 128, 64, 64) and box.sum().item() == pytest.approx(v.sum().item())


def test_training_step_crops_whole_volumes_and_feeds_ssl_step(monkeypatch: pytest.MonkeyPatch) -> None:
    m = build_method({**SWINSSL, "crops_per_volume": 3}, MODEL)
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(m, "ssl_step", lambda x: seen.append(x) or "out")
    v = torch.zeros(2, 1, 160, 64, 64)
    v[0, 0, 96:160] = 1.0  # a 64-voxel body: its 64^3 box gives every crop
    v[1, 0, 10:74] = 2.0
    assert m.training_step({"image": v}, "ssl") == "out"
    (x,) = seen
    assert x.shape == (6, 1, 64, 64, 64) and x.dtype == torch.float32
    assert (x[:3] == 1.0).all() and (x[3:] == 2.0).all()  # all of the body in each crop
    m.cfg.crop_foreground = False
    torch.manual_seed(0)
    m.training_step({"image": [v[0], v[1]]}, "ssl")
    assert (seen[1][:3] == 0.0).any()  # anywhere in the volume: off the body too


def test_contract_and_one_channel_only() -> None:
    m = build_method(SWINSSL, MODEL)
    assert m.phases() == ["ssl"] and m.sample_spec("ssl").mode == "whole"
    assert m.heads.mode == "code" and m.heads.contrastive_head.in_features == 16 * 12
    assert m.heads.contrastive_head.out_features == 16
    assert m.transfer_state_dict()["out.conv.conv.weight"].shape[0] == 1  # a plain 1-output SwinUNETR
    mlp = build_method({**SWINSSL, "ssl_heads": "pooled_mlp"}, MODEL)
    assert mlp.heads.mode == "pooled_mlp" and mlp.heads.contrastive_head[2].out_features == 16
    with pytest.raises(ConfigError, match="model.in_channels=2: Swin SSL pretrains on 1-channel CT."):
        build_method(SWINSSL, ModelConfig(**{**MODEL.__dict__, "in_channels": 2}))


@pytest.mark.parametrize("plane", ["sagittal", "axial"])
def test_views_rotate_twice_then_cut_out_with_the_configured_settings(
    monkeypatch: pytest.MonkeyPatch, plane: str
) -> None:
    kw = {
        "rotation_plane": plane,
        "cutout_max_fraction": 0.5,
        "cutout_min_side": 0.1,
        "cutout_max_side": 0.4,
        "cutout_partner": False,
        "cutout_partner_source": "in_place",
    }
    m = build_method({**SWINSSL, **kw}, MODEL)
    calls: list[tuple[Any, ...]] = []
    real = swinssl_mod.cutout

    def spy(r: torch.Tensor, *a: Any, **k: Any) -> Any:
        calls.append((a, k))
        return real(r, *a, **k)

    monkeypatch.setattr(swinssl_mod, "cutout", spy)
    x = torch.rand(2, 1, 8, 8, 8)
    torch.manual_seed(3)
    v = m.make_views(x)
    assert calls == [((0.5, 0.1, 0.4), {"partner": False, "partner_source": "in_place"})] * 2
    torch.manual_seed(3)
    r1, k1 = random_rotations(x, plane)
    r2, k2 = random_rotations(x, plane)
    c1 = real(r1, 0.5, 0.1, 0.4, partner=False, partner_source="in_place")
    c2 = real(r2, 0.5, 0.1, 0.4, partner=False, partner_source="in_place")
    assert torch.equal(v["target"], torch.cat([r1, r2])) and torch.equal(v["labels"], torch.cat([k1, k2]))
    assert torch.equal(v["input"], torch.cat([c1.x, c2.x])) and torch.equal(
        v["mask"], torch.cat([c1.mask, c2.mask])
    )
    assert v["mask"].any() and not torch.equal(v["input"], v["target"])


def test_views_without_cutout_are_the_rotated_crops() -> None:
    m = build_method({**SWINSSL, "cutout": False}, MODEL)
    x = torch.rand(3, 1, 8, 8, 8)
    torch.manual_seed(4)
    v = m.make_views(x)
    torch.manual_seed(4)
    r1, k1 = random_rotations(x, "sagittal")
    r2, k2 = random_rotations(x, "sagittal")
    assert torch.equal(v["input"], torch.cat([r1, r2])) and torch.equal(v["target"], v["input"])
    assert torch.equal(v["labels"], torch.cat([k1, k2]))
    assert v["mask"].dtype == torch.bool and v["mask"].shape == (6, 8, 8, 8) and not v["mask"].any()


def test_ssl_step_is_the_weighted_sum_of_the_three_terms() -> None:
    region = "cutout"
    kw = {
        "lambda_rot": 0.5,
        "lambda_con": 2.0,
        "lambda_rec": 3.0,
        "temperature": 0.3,
        "inpainting_region": region,
    }
    torch.manual_seed(0)
    m = build_method({**SWINSSL, **kw}, MODEL)
    m.eval()
    x = torch.rand(2, 1, 64, 64, 64)
    torch.manual_seed(5)
    out = m.ssl_step(x)
    torch.manual_seed(5)
    v = m.make_views(x)
    with torch.no_grad():
        rot, con, rec = m.heads(m.backbone.encode(v["input"], 4)[4])
    want = {
        "rot": rotation_loss(rot, v["labels"]),
        "con": nt_xent(con[:2], con[2:], 0.3),
        "rec": inpainting_loss(rec, v["target"], v["mask"], region),  # type: ignore[arg-type]
    }
    assert set(out.terms) == set(want)
    for k, w in want.items():
        assert out.terms[k].item() == pytest.approx(w.item(), rel=1e-5), k
    total = 0.5 * want["rot"] + 2.0 * want["con"] + 3.0 * want["rec"]
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-5)
    # only the cut-out voxels count
    assert out.terms["rec"].item() != pytest.approx(inpainting_loss(rec, v["target"]).item(), rel=1e-4)

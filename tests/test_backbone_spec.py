"""The declared backbone: parts cover the network, the spec round-trips through a checkpoint
record, transfer checks refuse what would be lost, and parts are reported at the spec's granularity."""

from __future__ import annotations

import pytest
import torch

from asa3d.config_sections import ModelConfig
from asa3d.methods.base import build_method
from asa3d.models.backbones import BackboneError, BackboneSpec
from asa3d.models.backbones.resnet import resnet_spec
from asa3d.models.backbones.swinunetr import swinunetr_spec

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), window_size=4)


def _every_key_in_one_place(spec: BackboneSpec) -> None:
    for k in spec.build().state_dict():
        owners = [p for p, pre in spec.parts.items() if k.startswith(pre)]
        assert len(owners) + spec.is_head_key(k) == 1, (k, owners)


@pytest.mark.parametrize("dims", [2, 3])
def test_resnet_spec_parts_head_and_transfer(dims: int) -> None:
    spec = resnet_spec(depth=10, spatial_dims=dims, num_classes=3, widths=(8, 16, 32, 64))
    assert spec.spatial_dims == dims and spec.network == "monai.networks.nets.ResNet"
    _every_key_in_one_place(spec)
    net = spec.build()
    x = torch.zeros((2, 1) + (32,) * dims)
    assert net(x).shape == (2, 3)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    report = spec.check_transfer(state)
    assert report["missing"] == ["fc.bias", "fc.weight"]  # only the head
    # a running statistic of a BatchNorm is a backbone key like any other
    del state["layer2.0.bn1.running_mean"]
    with pytest.raises(BackboneError, match="layer2.0.bn1.running_mean"):
        spec.check_transfer(state)


def test_spec_record_round_trips_and_old_records_are_completed() -> None:
    spec = swinunetr_spec(TINY, 1)
    _every_key_in_one_place(spec)
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    old = {"class": "monai.networks.nets.SwinUNETR", "kwargs": dict(spec.kwargs)}  # before specs
    assert BackboneSpec.from_dict(old) == spec
    assert spec.with_outputs(5).kwargs["out_channels"] == 5
    with pytest.raises(BackboneError, match="not a known backbone"):
        BackboneSpec.from_dict({"class": "my.Net", "kwargs": {}})
    with pytest.raises(BackboneError, match="does not accept"):
        BackboneSpec.create("swinunetr", {**spec.kwargs, "use_v3": True})


@pytest.mark.parametrize(
    ("tasks", "untrained"),
    [
        (["sop", "gc"], {"layers3", "layers4", "encoders", "decoder"}),  # tap at stage 2 (p = 8)
        (["sop", "var", "gc"], set()),
    ],
)
def test_asa_reports_parts_at_the_spec_granularity(tasks: list[str], untrained: set[str]) -> None:
    cfg = {
        "name": "asa",
        "input_size": 64,
        "subvolume_size": 8,
        "p2_max_offset_cells": 1,
        "global_proj_dim": 16,
        "local_proj_dim": 8,
        "phases": [{"name": "P1", "view": "shuffle", "tasks": tasks}],
    }
    method = build_method(cfg, TINY)
    parts = method.transfer_parts()
    assert set(parts) == set(method.backbone_spec().parts)
    assert {p for p, t in parts.items() if not t} == untrained
    if untrained:  # and gradient really does not reach an untrained part
        out = method.training_step({"image": [torch.rand(1, 64, 64, 64)]}, "P1")
        out.loss.backward()
        spec = method.backbone_spec()
        reached: set[str] = set()
        for name, p in method.student.backbone.net.named_parameters():
            if p.grad is not None and bool(p.grad.abs().sum() > 0):
                reached.add(str(spec.part_of(name)))
        assert reached == set(parts) - untrained


def test_transfer_report_names_untrained_parts() -> None:
    from asa3d.eval.transfer import load_into

    net = swinunetr_spec(TINY, 2).build()
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("out.")}
    meta = {"transfer_parts": {"layers4": False, "layers3": True, "decoder": False}}
    report = load_into(net, state, kind="asa3d-export", metadata=meta)
    assert report.untrained_parts == ["decoder", "layers4"]
    assert report.summary()["untrained_parts"] == ["decoder", "layers4"]


def test_coarse_group_names_expand_to_their_parts() -> None:
    spec = swinunetr_spec(TINY, 1)
    got = spec.check_parts({"swinViT": True, "layers4": False, "encoders": False, "decoder": True}, "m")
    assert got == {
        "patch_embed": True, "layers1": True, "layers2": True, "layers3": True, "layers4": False,
        "encoders": False, "decoder": True,
    }  # fmt: skip
    with pytest.raises(BackboneError, match=r"missing \['decoder'\]"):
        spec.check_parts({"swinViT": True, "encoders": True}, "m")

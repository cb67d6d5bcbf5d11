"""The engine and the evaluation side never name a network: they ask the backbone spec
(``asa3d.models.backbones``), whose family modules hold all network knowledge. So fine-tuning,
probing, transfer and prediction work for any registered backbone, e.g. a MONAI ResNet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "asa3d"
NETWORK_NAMES = re.compile(r"SwinUNETR|Swin UNETR|swinViT|ResNet|FlexibleUNet")


def network_mentions(root: Path) -> list[str]:
    return [
        f"{p.relative_to(root.parent)}:{i}: {line.strip()}"
        for p in sorted(root.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if NETWORK_NAMES.search(line)
    ]


def test_engine_and_eval_name_no_network() -> None:
    found = network_mentions(SRC / "engine") + network_mentions(SRC / "eval")
    assert not found, "network knowledge belongs behind the backbone spec (models/backbones):\n" + "\n".join(
        found
    )


def test_the_grep_sees_a_mention(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("x = 1\nfrom monai.networks.nets import SwinUNETR\n# the swinViT stages\n")
    assert len(network_mentions(tmp_path)) == 2


def test_predict_rebuilds_the_recorded_backbone_not_an_assumed_one(tmp_path: Path) -> None:
    """A run whose model.json records a ResNet spec loads as that ResNet."""
    from monai.networks.nets import ResNet

    from asa3d.eval.inference import load_finetuned
    from asa3d.models.backbones.resnet import resnet_spec

    spec = resnet_spec(depth=10, spatial_dims=2, in_channels=1, num_classes=3, widths=(8, 16, 32, 64))
    torch.manual_seed(0)
    net = spec.build()
    run = tmp_path / "run"
    run.mkdir()
    torch.save(net.state_dict(), run / "model_final.pt")
    info = {"backbone": spec.to_dict(), "mode": "finetune", "n_classes": 3, "weights": "model_final.pt"}
    (run / "model.json").write_text(json.dumps(info))
    model, _ = load_finetuned(run)
    assert isinstance(model, ResNet) and not model.training
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(model(x), net.eval()(x))


def test_probe_freezes_the_specs_encoder_and_refuses_a_strict_probe_it_cannot_read() -> None:
    from asa3d.eval.probe import frozen_parts, prepare_model, trainable_parameters
    from asa3d.models.backbones import BackboneError
    from asa3d.models.backbones.resnet import resnet_spec

    spec = resnet_spec(depth=10, spatial_dims=2, num_classes=3, widths=(8, 16, 32, 64))
    net = prepare_model(spec.build(), spec, "probe")
    assert set(trainable_parameters(net)) == {"model.fc.weight", "model.fc.bias"}  # encoder parts frozen
    assert frozen_parts(spec, "probe", freeze_encoders=True) == list(spec.encoder)  # no skip parts
    net.train()
    assert not net.model.layer1.training and net.model.fc.training  # frozen parts stay in eval mode
    with pytest.raises(BackboneError, match="strict linear probe"):
        prepare_model(spec.build(), spec, "strict_linear")


def test_input_sizes_are_checked_by_the_spec_before_any_data_is_read(tmp_path: Path) -> None:
    from asa3d.config import ConfigError
    from asa3d.config_sections import DataConfig, ModelConfig
    from asa3d.eval.finetune import FinetuneConfig, FinetuneTrainConfig, run_finetune

    cfg = FinetuneConfig(
        model=ModelConfig(feature_size=12),
        data=DataConfig(root=str(tmp_path / "no_such_dataset.json")),
        train=FinetuneTrainConfig(crop_size=(48, 64, 64)),
    )
    with pytest.raises(
        ConfigError, match=r"train.crop_size=\[48, 64, 64\]: every side must be a multiple of 32"
    ):
        run_finetune(cfg, tmp_path / "run")

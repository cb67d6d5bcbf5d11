"""2D downstream (Adam's protocol): the ResNet classifier and ResNet U-Net specs, the transfer of an
Adam export into both, linear probing, AUC, and the tiny 2D grids end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from asa3d.eval.config_sections import InitConfig
from asa3d.models.backbones import BackboneError, network_spec

TINY = {"depth": 10, "widths": [8, 16, 32, 32], "in_channels": 1, "stem_stride": 1}  # as adam2d_tiny


@pytest.fixture(scope="module")
def adam_export(adam2d_tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from asa3d.export import export_checkpoint

    out = tmp_path_factory.mktemp("adam_export") / "adam2d.safetensors"
    export_checkpoint(adam2d_tiny_run / "last.pt", out)
    return out


@pytest.mark.parametrize(
    ("name", "prefix", "options"),
    [("resnet", "", TINY), ("resnet_unet", "encoder.", {**TINY, "decoder_channels": [32, 16, 16, 8]})],
)
def test_adam_export_loads_exactly_into_the_downstream_networks(adam_export, tmp_path, name, prefix, options):
    from asa3d.eval.transfer import init_model
    from asa3d.export import read_export

    exported, _ = read_export(adam_export)
    spec = network_spec(name, options, 3)
    torch.manual_seed(0)
    net = spec.build()
    report = init_model(net, InitConfig(source=str(adam_export)), run_dir=tmp_path, spec=spec)
    state = net.state_dict()
    encoder = [k for k in state if k.startswith(spec.encoder_prefixes())]
    assert report.expected == report.expected_matched == len(encoder) == len(exported)
    assert report.spec_differences == [] and report.untrained_parts == []
    for k, v in exported.items():  # every exported tensor, bit for bit, at its place in the network
        torch.testing.assert_close(state[prefix + k], v, rtol=0, atol=0)
    assert not any(k.startswith(spec.head) for k in report.matched)  # the head is new
    assert json.loads((tmp_path / "transfer.json").read_text())["expected_matched"] == len(encoder)


def test_unet_refuses_an_export_of_another_width_and_sizes_it_cannot_take(adam_export):
    from asa3d.eval.transfer import TransferError, init_model

    spec = network_spec("resnet_unet", {**TINY, "widths": [16, 16, 32, 32]}, 3)
    with pytest.raises(TransferError, match="block_inplanes"):
        init_model(spec.build(), InitConfig(source=str(adam_export)), spec=spec)
    with pytest.raises(BackboneError, match="multiple of 16"):
        spec.check_input_size([64, 72], "image2d.size")
    assert spec.build()(torch.rand(1, 1, 64, 48)).shape == (1, 3, 64, 48)  # full resolution out


def test_strided_stem_unet_reaches_full_resolution_and_a_stem_mismatch_is_named(adam_export, caplog):
    """The paper's ResNet-50 layout (a stem that halves the input): the U-Net's head up-samples by
    the stem stride, sides must divide by 32, and an export pretrained with stem stride 1 (the tiny
    Adam run) loads into a stride-2 network (same shapes) with the difference warned about by name
    and recorded in transfer.json."""
    from asa3d.eval.transfer import init_model

    spec = network_spec("resnet_unet", {**TINY, "stem_stride": 2, "decoder_channels": [32, 16, 16, 8]}, 3)
    net = spec.build()
    assert net.encoder.conv1.stride == (2, 2)
    assert net(torch.rand(1, 1, 64, 96)).shape == (1, 3, 64, 96)
    with pytest.raises(BackboneError, match="multiple of 32"):
        spec.check_input_size([48, 64], "image2d.size")
    classifier = network_spec("resnet", {**TINY, "stem_stride": 2}, 3)
    for target, target_spec in ((net, spec), (classifier.build(), classifier)):
        with caplog.at_level("WARNING", logger="asa3d.eval.transfer"):
            caplog.clear()
            report = init_model(target, InitConfig(source=str(adam_export)), spec=target_spec)
        assert report.spec_differences == ["conv1_t_stride 1 vs 2"]
        assert "differs from this one (source vs target): conv1_t_stride 1 vs 2" in caplog.text
    same = network_spec("resnet", TINY, 3)
    assert init_model(same.build(), InitConfig(source=str(adam_export)), spec=same).spec_differences == []
    with pytest.raises(BackboneError, match="network.name=resnet: network.options.stem_stride=3: 1 or 2"):
        network_spec("resnet", {**TINY, "stem_stride": 3}, 3)


def test_linear_probe_gradients_reach_only_the_new_head() -> None:
    from asa3d.eval.probe import prepare_model

    spec = network_spec("resnet", TINY, 3)
    net = prepare_model(spec.build(), spec, "probe")
    net.train()
    x, y = torch.rand(4, 1, 64, 64), (torch.rand(4, 3) > 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert {n for n, g in grads.items() if g is not None} == {"model.fc.weight", "model.fc.bias"}
    assert all(g.abs().sum() > 0 for g in (grads["model.fc.weight"], grads["model.fc.bias"]))
    assert not net.model.bn1.training  # frozen BatchNorm keeps its pretrained statistics


def test_auc_per_class_equals_sklearn_including_ties_and_a_batch_axis() -> None:
    from asa3d.eval.tasks2d import auc_per_class

    rng = np.random.default_rng(0)
    t = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 1], [1, 0, 1], [0, 1, 1]], float)
    p = np.round(rng.random((6, 3)), 1)  # rounded: ties
    p[:, 0] = [0.9, 0.2, 0.9, 0.2, 0.5, 0.5]
    auc = auc_per_class(p, t)
    for k in range(2):
        assert auc[k] == pytest.approx(roc_auc_score(t[:, k], p[:, k]))
    assert np.isnan(auc[2])  # one class only: undefined, never 0.5
    batch = auc_per_class(np.stack([p, 1 - p]), np.stack([t, t]))
    np.testing.assert_allclose(batch[1, :2], 1 - auc[:2])


def test_auc_bootstrap_pairs_the_images_of_both_inits() -> None:
    from asa3d.eval.stats import auc_bootstrap_test

    rng = np.random.default_rng(1)
    t = (rng.random((40, 2)) < 0.5).astype(float)
    good = np.stack([t * 0.6 + rng.random((40, 2)) * 0.5 for _ in range(2)])  # (seeds, images, findings)
    noise = rng.random((2, 40, 2))
    res = auc_bootstrap_test(good, noise, t, n_boot=500)
    assert res["n"] == 40 and res["n_seeds"] == 2 and res["mean_diff"] > 0.2
    assert res["ci95"][0] > 0 and res["p_value"] < 0.01
    same = auc_bootstrap_test(noise, noise, t, n_boot=200)
    assert same["mean_diff"] == 0 and same["p_value"] == 1.0


def test_phantom_segmentation_maps_and_findings() -> None:
    from asa3d.data.labelled2d import SEG_CLASSES, flatten_masks

    masks = np.zeros((3, 4, 4), np.uint8)
    masks[0, :2] = 1  # a
    masks[1, 1:3] = 1  # b over a
    lab = flatten_masks(masks, ["a", "b", "c"], ["a", "b"])
    assert lab[0].tolist() == [1] * 4 and lab[1].tolist() == [2] * 4 and lab[3].tolist() == [0] * 4
    assert SEG_CLASSES[-1] == "vertebrae"  # the spine is painted over the organs it crosses


def _grid(tmp_path: Path, config: str) -> tuple[dict, dict, str]:
    from asa3d.cli import main as cli

    out = tmp_path / "grid"
    assert cli(["evaluate", "--config", config, "--out", str(out), "train.progress=false"]) == 0
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/result.json"))]
    return (
        json.loads((out / "summary.json").read_text()),
        {"cells": cells, **json.loads((out / "stats.json").read_text())},
        (out / "table.md").read_text(),
    )


@pytest.mark.slow
def test_tiny_2d_classification_grid_end_to_end(tmp_path: Path) -> None:
    summary, stats, table = _grid(tmp_path, "evaluate/adam2d_tiny.yaml")
    groups = {(g["init"], g["mode"]): g for g in summary["groups"]}
    assert set(groups) == {(i, m) for i in ("scratch", "adam") for m in ("finetune", "probe")}
    for g in groups.values():
        assert set(g["auc"]["per_class"]) == {"mass", "effusion", "consolidation"} and g["n_seeds"] == 2
        assert 0 <= g["auc"]["avg"]["mean"] <= 1
    comps = {c["mode"]: c for c in stats["comparisons"]}
    assert set(comps) == {"finetune", "probe"} and all(c["n"] == 16 for c in comps.values())
    assert all(0 < c["p_value"] <= 1 and c["p_holm"] >= c["p_value"] for c in comps.values())
    assert summary["transfer"]["adam"]["expected_matched"] == summary["transfer"]["adam"]["expected"] > 0
    # fine-tuning learns: every full fine-tuning cell ends below where it started
    assert all(c["loss_last"] < c["loss_first"] for c in stats["cells"] if c["mode"] == "finetune")
    assert "| adam | probe | 100% |" in table


@pytest.mark.slow
def test_tiny_2d_segmentation_grid_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary, stats, table = _grid(tmp_path, "evaluate/adam2d_seg_tiny.yaml")
    for g in summary["groups"]:
        assert set(g["dice"]["per_class"]) == {"lungs", "liver", "spleen", "vertebrae"}
    lungs = [g["dice"]["per_class"]["lungs"]["mean"] for g in summary["groups"]]
    assert min(lungs) > 0.7  # the largest organ is found by every init and mode in 40 steps
    assert {c["mode"] for c in stats["comparisons"]} == {"finetune", "probe"}
    assert all(c["n"] == 16 and c["p_value"] is not None for c in stats["comparisons"])
    assert all(c["loss_last"] < c["loss_first"] for c in stats["cells"])
    assert summary["transfer"]["adam"]["expected_matched"] == summary["transfer"]["adam"]["expected"] > 0
    # the 2D run's model is refused by `asa3d predict` (3D label maps only), naming it and the fix
    from asa3d.cli import main as cli

    run = next((tmp_path / "grid" / "cells").glob("adam__finetune__*")) / "run"
    assert json.loads((run / "model.json").read_text())["inference"]["image2d"]
    out = tmp_path / "preds"
    assert cli(["predict", "--model", str(run), "--input", str(tmp_path), "--out", str(out)]) == 2
    assert not out.exists()  # refused before anything was written
    err = capsys.readouterr().err
    assert f"{run}: a 2D segmentation model" in err and "score 2D models with asa3d finetune" in err

"""The shipped evaluation grid over {scratch, ASA, SimMIM-3D, Swin UNETR SSL, VoCo, Adam-3D},
``configs/evaluate/peers_tiny.yaml``: it resolves (every init's pretraining config loads with its
overrides, names its method and builds the fine-tune's network), and it runs end to end: each
method pretrains from its tiny config in process (as ``asa3d evaluate`` runs it), its checkpoint
becomes a grid init, every init fine-tunes, scores and reports what it loaded (transfer.json); the
exports of those checkpoints load the same parts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from asa3d.config import load_config
from asa3d.config_sections import PretrainConfig
from asa3d.eval.config_sections import EvaluateConfig
from asa3d.eval.evaluate import run_grid
from asa3d.eval.transfer import expected_keys

GRID = "evaluate/peers_tiny.yaml"
INITS = ["scratch", "asa", "simmim", "swinssl", "voco", "adam"]
# CI scale on top of the shipped overrides: one step per phase of one volume on a coarse grid, and
# VoCo on 2x2 bases with one random crop (the backbone is untouched: the fine-tune must load it)
SHRINK = [
    "train.batch_size=1",
    "train.max_iters_per_phase=1",
    "train.progress=false",
    "train.log_every=0",
    "train.monitor_every=0",
    "train.image_every=0",
    "data.preprocess.spacing=[12.0,12.0,6.0]",
    "model.drop_path_rate=0.0",
]
SHRINK_METHOD = {
    "voco": ["method.grid=2", "method.volume_size=[128,128,64]", "method.num_random_crops=1"],
    "swinssl": ["method.crops_per_volume=1"],
}


def test_shipped_peers_grid_resolves(phantom_dataset: Path) -> None:
    """Every init of the shipped file: its pretraining config loads with the file's overrides (a
    config mixing rounds and steps would be refused here), names the method, and runs 2 steps a phase."""
    cfg = load_config(EvaluateConfig, GRID)
    assert [i.name for i in cfg.grid.inits] == INITS
    assert cfg.grid.reference == "scratch" and cfg.grid.modes == ["finetune"]
    assert cfg.data.root is None and cfg.grid.phantom  # runs from a fresh clone: it writes a phantom
    for spec in cfg.grid.inits[1:]:
        pre = load_config(
            PretrainConfig, spec.pretrain_config, [f"data.root={phantom_dataset}", *spec.pretrain_overrides]
        )
        assert pre.method["name"] == spec.name
        t = pre.train
        assert t.max_iters_per_phase == 2 and t.lr_schedule == "constant"
        stages = len(pre.method.get("levels", [0]))  # Adam: one round per coarse-to-fine stage
        assert (
            (t.epochs == stages and t.warmup_epochs == 0)
            if not t.step_based
            else (t.total_steps == 2 and t.warmup_steps == 0)
        )
        for key in ("feature_size", "depths", "num_heads", "window_size"):  # the fine-tune's network
            assert getattr(pre.model, key) == getattr(cfg.model, key), (spec.name, key)


@pytest.mark.slow
def test_shipped_peers_grid_end_to_end(phantom_dataset: Path, tmp_path: Path) -> None:
    from monai.networks.nets import SwinUNETR

    from asa3d.eval.transfer import load_into, read_source
    from asa3d.export import export_checkpoint, transfer_state_from_checkpoint

    shipped = load_config(
        EvaluateConfig, GRID, [f"data.root={phantom_dataset}", "train.iterations=2", "train.log_every=0"]
    )
    inits = [
        dataclasses.replace(
            i, pretrain_overrides=[*i.pretrain_overrides, *SHRINK, *SHRINK_METHOD.get(i.name, [])]
        )
        if i.pretrain_config
        else i
        for i in shipped.grid.inits
    ]
    cfg = dataclasses.replace(
        shipped,
        data=dataclasses.replace(
            shipped.data, preprocess=dataclasses.replace(shipped.data.preprocess, spacing=(12.0, 12.0, 6.0))
        ),
        grid=dataclasses.replace(shipped.grid, inits=inits, plots=False, report=False),
    )
    out = tmp_path / "grid"
    summary = run_grid(cfg, out)
    assert [g["init"] for g in summary["groups"]] == INITS
    table = (out / "table.md").read_text()
    for name in INITS:
        cell = out / "cells" / f"{name}__finetune__f100__s0"
        assert f"| {name} | finetune | 100% |" in table, name
        res = json.loads((cell / "result.json").read_text())
        assert res["per_case"] and all(row["dice"] for row in res["per_case"]), name
        assert res["loss_last"] < res["loss_first"], name  # the fine-tuning trained
        tr = json.loads((cell / "run" / "transfer.json").read_text())
        if name == "scratch":
            assert tr["kind"] == "scratch" and not tr["matched"]
            continue
        ckpt = out / "pretrain" / name / "last.pt"
        state, meta = transfer_state_from_checkpoint(ckpt)
        assert meta["method"] == name
        want = sorted(expected_keys(list(state), "asa3d-checkpoint"))  # every part but the head
        assert tr["kind"] == "asa3d-checkpoint", name
        assert set(want) <= set(tr["matched"]), f"{name}: pretrained keys not loaded"
        assert tr["expected_matched"] == tr["expected"] == len(want), name
        assert all(k.startswith("out.") for k in tr["shape_mismatch"] + tr["missing"]), name
        # the export of the same checkpoint is accepted as an init and loads the same tensors
        path, _ = export_checkpoint(ckpt, tmp_path / f"{name}.safetensors")
        exp_state, kind, _ = read_source(str(path))
        assert kind == "asa3d-export"
        net = SwinUNETR(**dict(meta["architecture"]["kwargs"], out_channels=5))
        rep = load_into(net, exp_state, kind=kind, source=str(path))
        assert rep.expected_matched == rep.expected == len(want), name
        got = net.state_dict()
        assert all(torch.equal(got[k], state[k]) for k in want), name

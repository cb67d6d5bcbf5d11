"""Tiny Adam runs through ``asa3d pretrain --config ...``: in 2D the trained query encoder tells the
training images apart better than the initial one (two-view InfoNCE over the training images at
the last stage's level, eval mode, fixed views) and the last stage's logged InfoNCE sits below
log(K + 1), where an untrained network's alike keys put it; in 3D the logged InfoNCE of the last
stage is below that of the first; n = 0 prunes nothing; the 2D export loads strictly into the
plain MONAI ResNet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from asa3d.cli import main as cli
from asa3d.config import from_dict
from asa3d.config_sections import PretrainConfig
from asa3d.engine.checkpoint import load_checkpoint
from asa3d.engine.precision import seed_all
from asa3d.engine.trainer import default_dataset_factory
from asa3d.export import rebuild_method
from asa3d.methods.base import build_method


def _discrimination(method, images, stage: int) -> float:
    """InfoNCE of query-encoder embeddings of two fixed views of every image (the other images'
    views are the negatives): lower = the encoder tells the images apart."""
    method.eval()
    method.stage = stage
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        vq, vk, _ = method.make_views(images)
        q = F.normalize(method.student(vq), dim=1)
        k = F.normalize(method.student(vk), dim=1)
    return float(F.cross_entropy(q @ k.T / 0.2, torch.arange(len(images))))


def _stage_means(rows: list[dict]) -> tuple[float, float]:
    """Mean InfoNCE of the first stage (without step 0, whose queue is still random) and of the last."""
    steps = [r for r in rows if "loss/infonce" in r]
    first = [r["loss/infonce"] for r in steps[1:] if r["method/stage"] == 0]
    last_stage = max(r["method/stage"] for r in steps)
    last = [r["loss/infonce"] for r in steps if r["method/stage"] == last_stage]
    return sum(first) / len(first), sum(last) / len(last)


def _run_and_score(out: Path, config: str | None, *overrides: str) -> tuple[float, float, list[dict]]:
    if config is not None:  # None: ``out`` holds a finished run
        assert (
            cli(["pretrain", "--config", config, "--out", str(out), "train.progress=false", *overrides]) == 0
        )
    ck = load_checkpoint(out / "last.pt")
    cfg = from_dict(PretrainConfig, ck["config"])
    seed_all(cfg.train.seed)  # the initial weights of the run
    init = build_method(cfg.method, cfg.model)
    final = rebuild_method(ck)
    ds = default_dataset_factory(cfg)("adam", init.sample_spec("adam"))
    images = [ds[i]["image"] for i in range(len(ds))]
    last = len(cfg.method["levels"]) - 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return _discrimination(init, images, last), _discrimination(final, images, last), rows


@pytest.mark.slow
def test_tiny_2d_run_learns_and_exports_into_monai_resnet(tmp_path: Path, adam2d_tiny_run: Path) -> None:
    run = adam2d_tiny_run  # asa3d pretrain --config pretrain/adam2d_tiny.yaml (shared with the Eve tests)
    before, after, rows = _run_and_score(run, None)
    assert after < before - 0.3, (before, after)  # measured 2.67 -> 1.96
    steps = [r for r in rows if "loss/infonce" in r]
    assert [r["method/level"] for r in steps] == [0.0] * 2 + [2.0] * 14 + [4.0] * 14
    # n = 0 prunes nothing (plain MoCo-v2): only each image's own keys (4 of 64) are left out
    assert all(r["loss/pruned_fraction"] <= 4 / 64 for r in steps[:2])
    assert all(0.0 < r["loss/pruned_fraction"] < 1.0 for r in steps[2:])  # the pruner acts, no collapse
    assert all(0.0 < r["loss/infonce"] < 10.0 for r in steps)
    # the last stage beats an untrained network, whose keys are all alike (loss near log(K + 1) = 4.17)
    last = [r["loss/infonce"] for r in steps if r["method/stage"] == 2.0]
    assert sum(last) / len(last) < math.log(64 + 1) - 0.5, last

    from monai.networks.nets import ResNet
    from safetensors.torch import load_file

    exp = tmp_path / "adam2d.safetensors"
    assert cli(["export", str(run / "last.pt"), "--out", str(exp)]) == 0
    meta = json.loads(exp.with_name(exp.name + ".json").read_text())
    state = load_file(str(exp))
    net = ResNet(**meta["architecture"]["kwargs"])
    net.load_state_dict(state, strict=True)  # nothing missing, nothing unexpected
    assert meta["architecture"]["kwargs"]["spatial_dims"] == 2
    trained = rebuild_method(load_checkpoint(run / "last.pt")).transfer_state_dict()
    assert trained.keys() == {k for k in state if not k.startswith("fc.")}
    for k, v in trained.items():
        assert torch.equal(state[k], v), k


@pytest.mark.slow
def test_tiny_3d_run_learns(tmp_path: Path) -> None:
    from asa3d.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", n=8, seed=0, shape=(48, 48, 40), spacing=(8.0, 8.0, 8.0))
    _, _, rows = _run_and_score(tmp_path / "run", "pretrain/adam3d_tiny.yaml", f"data.root={data}")
    first, last = _stage_means(rows)
    assert last < first - 0.2, (first, last)
    steps = [r for r in rows if "loss/infonce" in r]
    assert sorted({r["method/level"] for r in steps}) == [0.0, 3.0, 6.0]
    assert all(0.0 < r["loss/infonce"] < 10.0 for r in steps)

"""Adam's coarse-to-fine stages through the engine: stage n+1 starts from stage n's full state
(query and key encoders, queue) with a fresh optimiser and a restarted LR schedule, and a run
resumed from a checkpoint in the middle of stage 2 ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from adam_tiny import ADAM_TINY_2D
from asa3d.config import from_dict
from asa3d.config_sections import PretrainConfig
from asa3d.engine.checkpoint import load_checkpoint
from asa3d.engine.distributed import init_distributed
from asa3d.engine.trainer import Trainer

METHOD = {**ADAM_TINY_2D, "levels": [0, 2]}


class Images(Dataset):
    """Eight fixed 48x48 images (a pure function of the index)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, idx: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(idx)
        return {"image": torch.rand(1, 48, 48, generator=g), "id": f"im{idx}"}


def _cfg(**train: Any) -> PretrainConfig:
    base = {
        "method": dict(METHOD),
        "data": {"num_workers": 0},
        "train": {
            "epochs": 4,  # 2 stages x 2 rounds x 2 iterations
            "batch_size": 4,
            "optimizer": "sgd",
            "lr": 0.05,
            "weight_decay": 1e-4,
            "warmup_epochs": 0,
            "lr_schedule": "iter_cosine",
            "seed": 0,
            "deterministic": True,
            "progress": False,
            "log_every": 1,
            "monitor_every": 0,
            "image_every": 0,
            "precision": "fp32",
            "device": "cpu",
            "ckpt_every_iters": 1,
            "keep_last": 20,
            **train,
        },
    }
    return from_dict(PretrainConfig, base)


def _trainer(out: Path) -> Trainer:
    return Trainer(_cfg(), out, init_distributed("cpu"), dataset_factory=lambda phase, spec: Images())


def test_stage_two_starts_from_stage_one_state_with_a_fresh_optimiser(tmp_path: Path) -> None:
    tr = _trainer(tmp_path / "run")
    seen: dict[int, dict[str, Any]] = {}
    orig = tr.method.on_round_start

    def spy(r: int, total: int) -> None:
        orig(r, total)
        seen[r] = {
            "state": {k: v.clone() for k, v in tr.method.state_dict().items()},
            "opt_state": len(tr.optimizer.state),
            "level": tr.method.level,
        }

    tr.method.on_round_start = spy  # type: ignore[method-assign]
    tr.fit(False)
    end_of_stage1 = load_checkpoint(tmp_path / "run" / "ckpt_r0002_i00000004.pt")
    assert end_of_stage1["progress"]["round"] == 2 and end_of_stage1["state"]["optimizer"]["state"]
    start2 = seen[2]
    assert start2["level"] == 2 and seen[1]["level"] == 0
    assert start2["opt_state"] == 0 and seen[1]["opt_state"] > 0  # cleared at the stage start only
    ref = end_of_stage1["state"]["method"]
    assert ref.keys() == start2["state"].keys()
    for k, v in ref.items():  # student, teacher (key encoder) and the queue carry over
        assert torch.equal(v, start2["state"][k]), k
    assert int(ref["queue.ptr"]) == 4 * 4 % 12 and (ref["queue.ids"] >= 0).sum() == 12
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs) == 8 and lrs[:4] == lrs[4:]  # the schedule restarts with the stage
    assert lrs[0] > lrs[3]
    pruned = [r["loss/pruned_fraction"] for r in rows if "loss/pruned_fraction" in r]
    assert all(p == 0.0 for p in pruned[:4])  # n = 0: plain MoCo-v2


@pytest.mark.parametrize("iteration", [5, 4])
def test_resume_in_stage_two_is_exact(tmp_path: Path, iteration: int) -> None:
    """5: round 3 (stage 2) after its first step; 4: the stage boundary (stage 1's last checkpoint,
    so the resumed run must itself start the new stage: fresh optimiser, level 2)."""
    _trainer(tmp_path / "ref").fit(False)
    mid = tmp_path / "ref" / f"ckpt_r0002_i{iteration:08d}.pt"
    ck = load_checkpoint(mid)
    assert (ck["progress"]["round"], ck["progress"]["step_in_round"]) == (2, iteration - 4)
    (tmp_path / "resumed").mkdir()
    shutil.copy(mid, tmp_path / "resumed" / mid.name)
    tr = _trainer(tmp_path / "resumed")
    tr.fit(True)
    assert tr.method.level == 2
    a = load_checkpoint(tmp_path / "ref" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["progress"] == b["progress"]
    for k, v in a["state"]["method"].items():
        assert torch.equal(v, b["state"]["method"][k]), k
    for k, v in a["state"]["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["state"]["optimizer"]["state"][k]["momentum_buffer"])

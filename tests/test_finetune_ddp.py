"""Fine-tuning under torchrun with 2 gloo processes on CPU equals 1 process over the same global batch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import skip_or_fail
from test_engine_ddp import TORCHRUN, _free_port
from test_finetune_resume import _env, command, tiny_overrides

TOL = 1e-5  # the global batch's mean is two partial means instead of one: float32 round-off only
# batch 2 = one case per rank. AdamW's eps raised from 1e-8: Adam's first steps are ~ lr * g / (|g| +
# eps), which for a gradient near 1e-8 turns float32 round-off into a step of ~lr (measured: 1.5e-4
# after one step at lr 5e-4 with eps 1e-8; 2.9e-6 after three at lr 3e-3 with eps 1e-3)
ARGS = ["train.batch_size=2", "train.iterations=3", "train.adam_eps=0.001", "train.ckpt_every=0"]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(phantom_dataset: Path, tmp_path: Path) -> None:
    if not TORCHRUN.exists():
        skip_or_fail("TORCHRUN", f"torchrun not found beside the interpreter ({TORCHRUN})")
    one = subprocess.run(
        command(tmp_path / "one", phantom_dataset, *ARGS),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    script, *rest = command(tmp_path / "two", phantom_dataset, *ARGS)[1:]
    two = subprocess.run(
        [
            str(TORCHRUN),
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            script,
            *rest,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr and two.stdout.count("run dir:") == 1  # rank 0 alone reports
    a = torch.load(tmp_path / "one" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model_final.pt", weights_only=True)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max |w_1proc - w_2proc| = {worst:.3g}")
    assert worst < TOL, f"max |w_1proc - w_2proc| = {worst:.3g}"
    la, lb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert la["loss_first"] == pytest.approx(lb["loss_first"], abs=1e-6)  # the logged loss: the global mean
    assert la["train_ids"] == lb["train_ids"]
    # and training did move the weights far beyond that tolerance (the same seed builds the init)
    from asa3d.config import load_config
    from asa3d.eval.finetune import FinetuneConfig, make_model

    cfg = load_config(FinetuneConfig, "finetune/phantom_tiny.yaml", tiny_overrides(phantom_dataset, *ARGS))
    torch.manual_seed(cfg.train.seed)
    init = make_model(cfg, 14)[0].state_dict()
    moved = max((a[k].float() - init[k].float()).abs().max().item() for k in a)
    assert moved > 100 * TOL, moved

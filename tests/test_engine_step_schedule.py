"""Step-based schedules (``train.total_steps`` / ``train.warmup_steps``), the per-rank batch
(``train.batch_scope``) and AMSGrad (``train.amsgrad``): the config keys, the LR values and a toy
run through the engine that stops after exactly ``total_steps`` optimiser steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asa3d.config import ConfigError, load_config
from asa3d.config_sections import PretrainConfig
from asa3d.engine.checkpoint import load_checkpoint
from asa3d.engine.distributed import DistEnv
from asa3d.engine.schedules import LRSchedule, warmup_cosine
from asa3d.engine.trainer import Trainer
from engine_toy_method import toy_config, toy_factory

STEPS = ["train.epochs=null", "train.warmup_epochs=null", "train.lr_schedule=iter_cosine"]


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_step_schedule_warms_up_and_decays_over_steps_whatever_the_round_length() -> None:
    """Swin UNETR SSL's code: 500 warm-up steps of 100k, whatever a round holds."""
    for per_round in (1, 7, 1000):
        s = LRSchedule(_opt(), "iter_cosine", 4e-4, 500, 100_000, per_round, unit="step")
        assert s.value(0, 0) == pytest.approx(4e-4 / 500)  # step 0 at base / W
        assert s.value(3, 499) == pytest.approx(4e-4)  # the peak at the end of warm-up
        assert s.value(0, 250) == pytest.approx(4e-4 * 251 / 500)  # linear in the step, not the round
        mid = (500 + 100_000) // 2 - 1  # e = 50250: halfway through the cosine
        assert s.value(0, mid) == pytest.approx(2e-4)
        assert s.value(99, 99_999) == pytest.approx(0.0, abs=1e-15)
        assert [s.value(0, i) for i in range(0, 100_000, 997)] == [
            warmup_cosine(4e-4, i + 1, 500, 100_000) for i in range(0, 100_000, 997)
        ]
    c = LRSchedule(_opt(), "constant", 1.0, 4, 10, 3, unit="step")
    assert [c.value(0, i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    floor = LRSchedule(_opt(), "iter_cosine", 1.0, 2, 10, 3, start=0.1, floor=0.01, unit="step")
    assert floor.value(0, 9) == pytest.approx(0.01) and floor.value(0, 1) == pytest.approx(1.0)
    assert floor.state_dict()["unit"] == "step"
    assert "unit" not in LRSchedule(_opt(), "epoch_cosine", 1.0, 1, 2, 1).state_dict()  # ASA's unchanged
    with pytest.raises(ValueError, match="epoch_cosine"):
        LRSchedule(_opt(), "epoch_cosine", 1.0, 1, 10, 1, unit="step")
    with pytest.raises(ValueError, match="train.epochs"):
        LRSchedule(_opt(), "iter_cosine", 1.0, 1, 10, 1, stage_starts=(0, 2), unit="step")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.total_steps=100"], "train.epochs, train.warmup_epochs measure"),  # the defaults of a file
        (["train.total_steps=100", "train.epochs=null"], "train.warmup_epochs=null"),
        (["train.warmup_steps=10"], "needs train.total_steps"),
        ([*STEPS[:2], "train.total_steps=100", "train.lr_schedule=epoch_cosine"], "iter_cosine"),
        ([*STEPS, "train.total_steps=10", "train.warmup_steps=11"], "warmup_steps <= total_steps"),
        (["train.amsgrad=true"], "needs train.optimizer=adamw"),
    ],
)
def test_step_keys_refuse_mixed_units_with_the_fix(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(PretrainConfig, "pretrain/asa_tiny.yaml", overrides)


def test_epoch_defaults_resolve_when_no_step_key_is_given() -> None:
    cfg = load_config(PretrainConfig)
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.total_steps) == (400, 5, None)
    assert not cfg.train.step_based
    steps = load_config(PretrainConfig, None, ["train.total_steps=100", "train.lr_schedule=constant"])
    assert steps.train.step_based and steps.train.warmup_steps == 0 and steps.train.epochs is None


def test_paper_configs_use_the_steps_their_papers_give() -> None:
    swin = load_config(PretrainConfig, "pretrain/swinssl.yaml").train
    assert (swin.total_steps, swin.warmup_steps, swin.epochs) == (100_000, 500, None)
    voco = load_config(PretrainConfig, "pretrain/voco.yaml").train
    assert (voco.total_steps, voco.warmup_steps, voco.lr) == (100_000, 100, 1e-3)
    ten_k = load_config(PretrainConfig, "pretrain/voco_10k.yaml")
    t = ten_k.train
    assert (t.total_steps, t.warmup_steps, t.lr, t.amsgrad, t.weight_decay) == (
        250_000,
        5_000,
        1e-4,
        True,
        1e-2,
    )
    assert (t.batch_size, t.batch_scope, ten_k.method["num_random_crops"]) == (2, "per_rank", 2)
    assert ten_k.method["voco_teacher"] == "ema" and ten_k.model.use_v2
    assert ten_k.method["volume_size"] == [384, 384, 96]


def test_per_rank_batch_scales_with_the_world_size() -> None:
    swin = load_config(PretrainConfig, "pretrain/swinssl.yaml").train
    assert swin.batch_scope == "per_rank" and swin.batch_size == 2
    assert [swin.global_batch(w) for w in (1, 8, 32)] == [2, 16, 64]  # 2 volumes per GPU, as the code
    asa = load_config(PretrainConfig, "pretrain/asa.yaml").train
    assert asa.batch_scope == "global" and [asa.global_batch(w) for w in (1, 4)] == [12, 12]


def test_toy_run_stops_after_total_steps_with_the_step_lr(tmp_path: Path) -> None:
    """4 steps per round (2 phases x 2 iterations): 7 steps = a full round and 3 of the next;
    the LR follows the step curve; the EMA runs once per step; resuming the finished run does nothing."""
    cfg = toy_config(
        [*STEPS, "train.total_steps=7", "train.warmup_steps=2", "train.optimizer=adamw", "train.amsgrad=true"]
    )
    t = Trainer(cfg, tmp_path, DistEnv(), dataset_factory=toy_factory(4))
    assert (t.iters_per_round, t.rounds, t.total_iters) == (4, 2, 7)
    assert all(g["amsgrad"] for g in t.optimizer.param_groups)
    t.fit()
    assert t.pos.global_iter == 7
    assert [c[1] for c in t.method.ema_calls] == list(range(7))  # type: ignore[attr-defined]
    assert {c[2] for c in t.method.ema_calls} == {7}  # type: ignore[attr-defined]
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in steps if "lr" in r]
    assert lrs == pytest.approx([warmup_cosine(0.05, i + 1, 2, 7) for i in range(7)])
    assert lrs[1] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    ck = load_checkpoint(tmp_path / "last.pt")
    assert (ck["progress"]["global_iter"], ck["progress"]["round"], ck["progress"]["step_in_round"]) == (
        7,
        2,
        0,
    )
    again = Trainer(cfg, tmp_path, DistEnv(), dataset_factory=toy_factory(4))
    again.fit()
    assert again.pos.global_iter == 7 and again.method.ema_calls == []  # type: ignore[attr-defined]


def test_plan_advice_counts_a_per_rank_batch_per_process() -> None:
    from asa3d.engine.memory_plan import PhasePlan, format_plan

    rows = [PhasePlan("ssl", mem1=2e9, mem2=3e9, budget=40e9)]
    per_rank = format_plan(rows, torch.device("cpu"), 40, 2, per_rank=True)
    assert "train.batch_size=2 per process" in per_rank and "grad_accum so that 2 / grad_accum" in per_rank
    assert "world_size x grad_accum" in format_plan(rows, torch.device("cpu"), 40, 12)


def test_step_run_resumed_in_its_last_partial_round_equals_uninterrupted(tmp_path: Path) -> None:
    """Stopped after step 5 (round 2, which the 7-step run leaves after 3 of its 4 steps), a new
    Trainer resumes and ends with the uninterrupted run's weights, bit for bit."""
    over = [*STEPS, "train.total_steps=7", "train.warmup_steps=2", "train.ckpt_every_iters=5"]
    whole = Trainer(toy_config(over), tmp_path / "whole", DistEnv(), dataset_factory=toy_factory(4))
    whole.fit()
    t = Trainer(toy_config(over), tmp_path / "cut", DistEnv(), dataset_factory=toy_factory(4))

    class Stop(Exception):
        pass

    orig = t.save_checkpoint

    def save_then_stop() -> Path | None:
        p = orig()
        if t.pos.global_iter == 5:
            raise Stop
        return p

    t.save_checkpoint = save_then_stop  # type: ignore[method-assign]
    with pytest.raises(Stop):
        t.fit()
    again = Trainer(toy_config(over), tmp_path / "cut", DistEnv(), dataset_factory=toy_factory(4))
    again.fit()
    assert [c[1] for c in again.method.ema_calls] == [5, 6]  # type: ignore[attr-defined]
    a, b = whole.method.state_dict(), again.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

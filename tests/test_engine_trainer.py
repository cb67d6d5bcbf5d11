"""The engine on the toy method, in process: EMA integration, run dir, resume, NaN handling, bf16,
monitors, CLI behaviour."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from asa3d.cli import main as cli_main
from asa3d.config import ConfigError
from asa3d.engine.checkpoint import CheckpointError, load_checkpoint
from asa3d.engine.distributed import DistEnv
from asa3d.engine.trainer import Trainer, TrainingDiverged, TrainingInterrupted
from engine_toy_method import toy_config, toy_factory


def make(out: Path, *overrides: str) -> Trainer:
    return Trainer(toy_config(overrides), out, DistEnv(), dataset_factory=toy_factory(4))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """2 rounds x 2 phases x 2 iterations, checkpoint every 3 iterations."""
    t = make(tmp_path_factory.mktemp("run"), "train.ckpt_every_iters=3")
    t.fit()
    return t


def test_ema_schedule_integration(finished: Trainer) -> None:
    calls = finished.method.ema_calls  # type: ignore[attr-defined]
    assert finished.total_iters == 8
    assert [c[1] for c in calls] == list(range(8))  # 0-based global iteration, every step
    assert {c[2] for c in calls} == {8}  # the correct total, known up front
    assert [c[0] for c in calls[:4]] == ["recon", "recon", "consist", "consist"]  # epoch alternation


def test_run_dir_contents(finished: Trainer) -> None:
    d = finished.run_dir
    assert (d / "config.yaml").is_file() and "engine_toy" in (d / "config.yaml").read_text()
    assert (d / "last.pt").is_file() and list((d / "tb").iterdir())
    records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/loss" in r]
    assert len(steps) == 8 and {"lr", "method/ema_momentum", "throughput/volumes_per_s", "loss/rec"} <= set(
        steps[0]
    )
    assert any("monitor/teacher_erank" in r for r in records)
    # each phase's loss on its own curve, written only in that phase's steps
    for phase in ("recon", "consist"):
        mine = [r for r in steps if r["phase"] == phase]
        assert len(mine) == 4 and all(r[f"{phase}/loss/loss"] == r["loss/loss"] for r in mine)
        assert not any(f"{phase}/loss/loss" in r for r in steps if r["phase"] != phase)
    ck = load_checkpoint(d / "last.pt")
    assert ck["progress"]["global_iter"] == 8 and ck["progress"]["round"] == 2
    assert ck["backbone"]["kwargs"]["feature_size"] == 12 and ck["method"] == "engine_toy"
    assert ck["preprocessing"]["orientation"] == "RAS" and "transfer_parts" in ck
    # the epoch LR curve: round 1 at base*1/W (W=1 -> base), round 2 = last round -> 0
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_auto_resume_of_finished_run_and_no_resume_refusal(finished: Trainer, capsys) -> None:  # noqa: ANN001
    t = make(finished.run_dir, "train.ckpt_every_iters=3")
    t.fit()  # auto-resume: nothing left to do
    assert "resuming from" in capsys.readouterr().out
    assert t.pos.global_iter == 8 and t.method.ema_calls == []  # type: ignore[attr-defined]
    for a, b in zip(t.method.state_dict().values(), finished.method.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        make(finished.run_dir).fit(resume=False)


def test_resume_mid_round_equals_uninterrupted(finished: Trainer, tmp_path: Path) -> None:
    """Stop after 3 steps (mid-round), resume in a new Trainer, compare bitwise."""
    t = make(tmp_path, "train.ckpt_every_iters=3")
    plan_len = len(t.plan)
    t.plan_backup = t.plan  # type: ignore[attr-defined]

    class Stop(Exception):
        pass

    orig = t.save_checkpoint

    def save_then_stop() -> Path | None:
        p = orig()
        if t.pos.global_iter == 3:
            raise Stop
        return p

    t.save_checkpoint = save_then_stop  # type: ignore[method-assign]
    with pytest.raises(Stop):
        t.fit()
    assert plan_len == 4
    t2 = make(tmp_path, "train.ckpt_every_iters=3")
    t2.fit()
    assert t2.method.ema_calls[0][1] == 3  # type: ignore[attr-defined]
    # the per-round hook sees the round it resumes into, then the next, as an uninterrupted run
    assert finished.method.round_starts == [(0, 2), (1, 2)]  # type: ignore[attr-defined]
    assert t2.method.round_starts == [(0, 2), (1, 2)]  # type: ignore[attr-defined]
    for k, v in finished.method.state_dict().items():
        assert torch.equal(v, t2.method.state_dict()[k]), k


def test_nan_is_skipped_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = make(tmp_path, "train.epochs=1", "method.nan_term=rec", "method.nan_calls=[1]")
    with caplog.at_level(logging.WARNING):
        t.fit()
    assert "non-finite loss, rec at iteration 1" in caplog.text
    assert [c[1] for c in t.method.ema_calls] == [0, 2, 3]  # type: ignore[attr-defined]  # no EMA
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "bad_step" and "rec" in e["terms"] for e in events)


def test_consecutive_bad_steps_stop_with_good_checkpoint(tmp_path: Path) -> None:
    t = make(
        tmp_path, "train.epochs=2", "train.max_bad_steps=2", "method.nan_term=cos", "method.nan_calls=[6, 7]"
    )
    with pytest.raises(TrainingDiverged, match="2 consecutive non-finite steps"):
        t.fit()
    ck = load_checkpoint(tmp_path / "last.pt")  # round 1's checkpoint, intact
    assert ck["progress"]["global_iter"] == 4
    assert all(torch.isfinite(v).all() for v in ck["state"]["method"].values() if v.is_floating_point())


def test_bf16_iteration_alternation_runs(tmp_path: Path) -> None:
    # The toy method has no convolutions, so forcing CPU bf16 is safe here (see the next test).
    t = make(
        tmp_path,
        "train.epochs=1",
        "train.precision=bf16",
        "train.cpu_bf16=true",
        "train.phase_alternation=iteration",
        "train.optimizer=adamw",
        "train.lr_schedule=iter_cosine",
        "train.grad_clip=1.0",
        "train.grad_accum=2",
    )
    assert t.precision == "bf16"
    t.fit()
    assert [c[0] for c in t.method.ema_calls] == ["recon", "consist", "recon", "consist"]  # type: ignore[attr-defined]
    assert all(torch.isfinite(p).all() for p in t.method.parameters())


def test_cpu_bf16_training_falls_back_to_fp32_with_a_warning(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """oneDNN's bf16 conv3d weight gradients are unreliable on CPUs (benchmarks/cpu_bf16_conv.py),
    so bf16 on a CPU trains in fp32 unless train.cpu_bf16 forces it; the run says so."""
    with caplog.at_level("WARNING", logger="asa3d.engine.precision"):
        t = make(tmp_path, "train.epochs=1", "train.precision=bf16")
    assert t.precision == "fp32"
    assert any("train.cpu_bf16=true" in r.getMessage() for r in caplog.records)


def test_cli_refuses_unknown_key_listing_valid(capsys) -> None:  # noqa: ANN001
    assert cli_main(["pretrain", "train.epoch=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['epoch']" in err and "epochs" in err and "batch_size" in err


def test_cli_help_lists_defaults(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "train.epochs = 400" in out and "--resume" in out and "data.root" in out


def test_sigterm_checkpoints_at_step_boundary_and_resumes(finished: Trainer, tmp_path: Path) -> None:
    t = make(tmp_path)
    orig = t.method.training_step

    def step_then_term(batch, phase):  # noqa: ANN001, ANN202
        if t.method.calls == 1:  # type: ignore[attr-defined]  # during iteration 1
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(batch, phase)

    t.method.training_step = step_then_term  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted, match="SIGTERM after iteration 2/8"):
        t.fit()
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["global_iter"] == 2
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored
    t2 = make(tmp_path)
    t2.fit()
    for k, v in finished.method.state_dict().items():
        assert torch.equal(v, t2.method.state_dict()[k]), k


@pytest.mark.parametrize(("drop_last", "iters"), [(False, 3), (True, 2)])
def test_drop_last_decides_the_incomplete_batch(tmp_path: Path, drop_last: bool, iters: int) -> None:
    cfg = toy_config([f"train.drop_last={str(drop_last).lower()}"])
    t = Trainer(cfg, tmp_path, DistEnv(), dataset_factory=toy_factory(5))  # 5 volumes, batch 2
    assert t.iters == [iters, iters]
    loader = t._loader(0, 0, 0)
    ids = [i for b in loader for i in b["id"]]
    assert len(ids) == 2 * iters and (len(set(ids)) == 5) == (not drop_last)  # wrap: all 5 seen
    with pytest.raises(ConfigError, match="drop_last"):
        Trainer(
            toy_config(["train.drop_last=true", "train.batch_size=8"]),
            tmp_path / "b",
            DistEnv(),
            dataset_factory=toy_factory(5),
        )


def test_linear_lr_scaling_uses_the_global_batch(tmp_path: Path) -> None:
    """train.lr_reference_batch: lr, min_lr and warmup_start_lr are per reference batch and scale
    by batch_size / lr_reference_batch (SimMIM's 2e-4 per 512)."""
    t = make(
        tmp_path,
        "train.lr=0.4",
        "train.min_lr=0.04",
        "train.warmup_start_lr=0.004",
        "train.lr_reference_batch=8",
    )
    k = t.cfg.train.batch_size / 8
    assert k != 1.0
    got = (t.schedule.base, t.schedule.floor, t.schedule.start)
    assert got == pytest.approx((0.4 * k, 0.04 * k, 0.004 * k))
    plain = make(tmp_path / "plain", "train.lr=0.4")
    assert plain.schedule.base == pytest.approx(0.4) and plain.schedule.floor == 0.0

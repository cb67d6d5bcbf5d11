"""Fine-tuning resumes exactly: a run killed (SIGKILL) or stopped (SIGTERM) mid-run and resumed ends
bitwise equal to an uninterrupted one; non-finite steps follow pretraining's policy.

Also a script (``python tests/test_finetune_resume.py OUT DATASET_JSON [key=value ...]``) that runs
``asa3d finetune`` on the tiny recipe below; tests/test_finetune_ddp.py starts it under torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
ITERS = 6  # 4 training cases at batch 1: the run crosses an epoch boundary after the kill


def tiny_overrides(dataset: Path, *extra: str) -> list[str]:
    """SwinUNETR-12 with one block per stage on 32x32x64 crops; one thread, deterministic."""
    return [
        f"data.root={dataset}",
        "data.preprocess.spacing=[12.0,12.0,6.0]",
        "model.depths=[1,1,1,1]",
        "model.num_heads=[3,3,3,3]",
        "model.window_size=4",
        "model.drop_path_rate=0.0",
        f"train.iterations={ITERS}",
        "train.batch_size=1",
        "train.crop_size=[32,32,64]",
        "train.lr=0.003",
        "train.lr_schedule=warmup_cosine",
        "train.warmup_iters=2",
        "train.flip_prob=0.5",
        "train.rot90_prob=0.5",
        "train.ckpt_every=1",
        "train.deterministic=true",
        "train.num_threads=1",
        "train.progress=false",
        "train.device=cpu",
        "eval.split=null",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def command(out: Path, dataset: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), str(out), str(dataset), *tiny_overrides(dataset, *extra)]


def _run(out: Path, dataset: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(out, dataset, *extra), env=_env(), capture_output=True, text=True, timeout=300
    )


def _ckpt_iters(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.stem.split("_i")[1]) for p in d.glob("ckpt_r*_i*.pt")) if d.is_dir() else []


def _interrupt(out: Path, dataset: Path, sig: int, after: int) -> subprocess.Popen:
    """Start a slowed-down run and send ``sig`` once a checkpoint of iteration >= ``after`` exists."""
    proc = subprocess.Popen(
        command(out, dataset),
        env=_env(ASA3D_TEST_STEP_SLEEP="0.4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not [i for i in _ckpt_iters(out) if i >= after] and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    return proc


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model_final.pt", map_location="cpu", weights_only=True)


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "train_log.csv").read_text() == (b / "train_log.csv").read_text()
    da, db = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert (da["loss_first"], da["loss_last"]) == (db["loss_first"], db["loss_last"])


@pytest.fixture(scope="module")
def reference(phantom_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ft_ref") / "run"
    ref = _run(out, phantom_dataset)
    assert ref.returncode == 0, ref.stderr[-3000:]
    rows = (out / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, ITERS + 1))
    assert not (out / "checkpoints").exists()  # removed once metrics.json is written
    return out


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bitwise_identical(
    reference: Path, phantom_dataset: Path, tmp_path: Path
) -> None:
    killed = tmp_path / "killed"
    proc = _interrupt(killed, phantom_dataset, signal.SIGKILL, after=2)
    assert proc.returncode == -signal.SIGKILL
    done = _ckpt_iters(killed)
    assert done and max(done) < ITERS and not (killed / "metrics.json").exists()  # really mid-run
    resumed = _run(killed, phantom_dataset)  # automatic: the run dir holds a checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoints'}" in resumed.stdout
    _assert_same_run(reference, killed)
    assert not [p for p in killed.rglob(".*.tmp")]  # atomic writes left nothing behind


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_exits_and_resumes(
    reference: Path, phantom_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "term"
    proc = _interrupt(run, phantom_dataset, signal.SIGTERM, after=2)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 4, err[-3000:]  # as `asa3d pretrain`: 4 = interrupted, checkpoint written
    assert "stopped by SIGTERM after iteration" in err and "Run the same command again" in err
    stopped_at = int(err.split("after iteration ")[1].split("/")[0])
    assert 2 <= stopped_at < ITERS and max(_ckpt_iters(run)) == stopped_at  # saved at the step boundary
    ck = torch.load(
        run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True
    )  # weights_only: plain values
    assert ck["format"] == "asa3d-finetune-checkpoint/1" and ck["progress"]["iteration"] == stopped_at
    assert {"model", "optimizer", "scheduler", "scaler"} <= ck["state"].keys()
    assert {"order", "augment"} <= ck["generators"].keys() and "torch" in ck["rng"]
    refused = _run(run, phantom_dataset, "--no-resume")  # fresh over a checkpoint: refused
    assert refused.returncode != 0 and "refusing to overwrite" in refused.stderr
    resumed = _run(run, phantom_dataset, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(reference, run)


def test_non_finite_steps_follow_pretrainings_policy(
    phantom_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN loss skips the step (logged, no optimiser step); max_bad_steps in a row stop the run
    with TrainingDiverged naming the last good checkpoint."""
    import asa3d.eval.tasks2d as tasks2d
    from asa3d.config import load_config
    from asa3d.eval.finetune import FinetuneConfig, TrainingDiverged, run_finetune

    real = tasks2d.loss_function  # the loss fine-tuning trains with (2D and 3D)
    calls = {"n": 0}

    class NanOnSome(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            loss = self.inner(x, y)
            return loss * float("nan") if calls["n"] in (2, 4, 5) else loss

    monkeypatch.setattr(tasks2d, "loss_function", lambda cfg: NanOnSome(real(cfg)))
    overrides = [
        o for o in tiny_overrides(phantom_dataset, "train.max_bad_steps=2") if "deterministic" not in o
    ]
    cfg = load_config(FinetuneConfig, "finetune/phantom_tiny.yaml", overrides)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"2 consecutive non-finite steps .*ckpt_r0000_i00000003\.pt"):
        run_finetune(cfg, out)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/train" in r] == [1, 3]
    assert [(r["step"], r["streak"]) for r in records if r.get("event") == "bad_step"] == [
        (2, 1),
        (4, 1),
        (5, 2),
    ]
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["progress"]["iteration"] == 3  # no checkpoint of a bad state
    assert not (out / "metrics.json").exists()


def _main(argv: list[str]) -> int:
    """The script: ``asa3d finetune`` on ``phantom_tiny`` with the given overrides; with
    ASA3D_TEST_STEP_SLEEP each step is slowed down so a test can interrupt the run mid-way."""
    out, _dataset, *rest = argv
    flags = [a for a in rest if a.startswith("--")]
    overrides = [a for a in rest if not a.startswith("--")]
    delay = float(os.environ.get("ASA3D_TEST_STEP_SLEEP", "0"))
    if delay:
        import asa3d.eval.finetune as ft

        real = ft.draw_augment

        def slow(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            time.sleep(delay)
            return real(*args, **kwargs)

        ft.draw_augment = slow
    from asa3d.cli import main

    return main(["finetune", "--config", "finetune/phantom_tiny.yaml", "--out", out, *flags, *overrides])


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

"""A run killed with SIGKILL mid-round and resumed ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asa3d.engine.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "engine_toy_method.py"
ARGS = ["train.epochs=2", "train.ckpt_every_iters=1", "train.deterministic=true", "train.keep_last=2"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, ASA3D_TEST_THREADS="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _run(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *ARGS],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    ref = _run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(killed), *ARGS],
        env=_env(ASA3D_TOY_STEP_SLEEP="0.5"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = killed / "ckpt_r0000_i00000001.pt"  # after step 1 of 4 in round 1: mid-phase, mid-round
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert target.exists(), "the mid-round checkpoint never appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "ckpt_r0001_i00000004.pt").exists()  # really interrupted in round 1

    resumed = _run(killed)  # auto-resume from the run dir
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a = load_checkpoint(tmp_path / "ref" / "last.pt")
    b = load_checkpoint(killed / "last.pt")
    assert a["progress"] == b["progress"]
    for k, v in a["state"]["method"].items():
        assert torch.equal(v, b["state"]["method"][k]), k
    for k, v in a["state"]["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["state"]["optimizer"]["state"][k]["momentum_buffer"])
    assert not [p for p in killed.iterdir() if p.name.endswith(".pt") and p.name.startswith(".")]

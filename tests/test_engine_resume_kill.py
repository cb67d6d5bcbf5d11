"""A run killed with SIGKILL mid-round and resumed ends bitwise equal to an uninterrupted run: the
Swin toy (two phases, EMA teacher) and the 2D ResNet toy (BatchNorm statistics, a key queue)."""

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
COMMON = ["train.epochs=2", "train.ckpt_every_iters=1", "train.deterministic=true", "train.keep_last=2"]
# script, its arguments, the mid-round checkpoint to kill after, the end-of-round-1 checkpoint
# that must not exist then (so the kill really landed inside round 1)
TOYS = {
    "swin": ("engine_toy_method.py", COMMON, "ckpt_r0000_i00000001.pt", "ckpt_r0001_i00000004.pt"),
    "resnet": ("engine_toy_resnet.py", COMMON, "ckpt_r0000_i00000001.pt", "ckpt_r0001_i00000002.pt"),
}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, ASA3D_TEST_THREADS="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _cmd(script: str, out: Path, args: list[str]) -> list[str]:
    return [sys.executable, str(HERE / script), "--out", str(out), *args]


def run_toy(script: str, out: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run a toy pretraining script to the end (auto-resuming from ``out`` when it holds a run)."""
    cmd = _cmd(script, out, args)
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300)


def kill_after(script: str, out: Path, args: list[str], checkpoint: str) -> None:
    """Start the script with slow steps, SIGKILL it as soon as ``checkpoint`` appears in ``out``."""
    proc = subprocess.Popen(
        _cmd(script, out, args),
        env=_env(ASA3D_TOY_STEP_SLEEP="0.5"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = out / checkpoint
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert target.exists(), f"the checkpoint {checkpoint} never appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def assert_same_final_state(ref: Path, other: Path) -> None:
    """``last.pt`` of both runs: same progress, method state (parameters AND buffers) and optimiser
    state, bit for bit."""
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(other / "last.pt")
    assert a["progress"] == b["progress"]
    assert a["state"]["method"].keys() == b["state"]["method"].keys()
    for k, v in a["state"]["method"].items():
        assert torch.equal(v, b["state"]["method"][k]), k
    sa, sb = a["state"]["optimizer"]["state"], b["state"]["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for k, entry in sa.items():
        for name, v in entry.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k][name])), (k, name)


# slow: three subprocesses each (reference, killed, resumed), each importing torch and MONAI
@pytest.mark.slow
@pytest.mark.parametrize("toy", sorted(TOYS))
def test_sigkill_mid_round_then_resume_is_bitwise_identical(tmp_path: Path, toy: str) -> None:
    script, args, mid_round, end_of_round = TOYS[toy]
    ref = run_toy(script, tmp_path / "ref", args)
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = tmp_path / "killed"
    kill_after(script, killed, args, mid_round)
    assert not (killed / end_of_round).exists()  # really interrupted inside round 1

    resumed = run_toy(script, killed, args)  # auto-resume from the run dir
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_final_state(tmp_path / "ref", killed)
    assert not [p for p in killed.iterdir() if p.name.endswith(".pt") and p.name.startswith(".")]
    if toy == "resnet":  # the state that differs from the Swin toy's is really there and trained
        st = load_checkpoint(killed / "last.pt")["state"]["method"]
        assert int(st["queue_ptr"]) == 0 and "student.bn1.running_mean" in st  # 2 rounds x 8 keys
        assert not torch.equal(st["student.bn1.running_var"], torch.ones_like(st["student.bn1.running_var"]))

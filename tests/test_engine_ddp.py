"""torchrun with 2 gloo processes on CPU equals 1 process over the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asa3d.engine.checkpoint import load_checkpoint
from conftest import skip_or_fail

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "engine_toy_method.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
TOL = 1e-5  # summation order differs (two partial means vs one): float32 round-off only
COMMON = [
    "--volumes",
    "8",
    "train.epochs=1",
    "train.batch_size=4",
    "method.noise=0.0",
    "train.monitor_every=0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, ASA3D_TEST_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    if not TORCHRUN.exists():
        skip_or_fail("TORCHRUN", f"torchrun not found beside the interpreter ({TORCHRUN})")
    one = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "one"), *COMMON],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            str(TORCHRUN),
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(SCRIPT),
            "--out",
            str(tmp_path / "two"),
            "--dump",
            str(tmp_path / "state"),
            *COMMON,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "last.pt")["state"]["method"]
    b = load_checkpoint(tmp_path / "two" / "last.pt")["state"]["method"]
    assert load_checkpoint(tmp_path / "two" / "last.pt")["world_size"] == 2
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max |w_1proc - w_2proc| = {worst:.3g}")
    assert worst < TOL, f"max |w_1proc - w_2proc| = {worst:.3g}"
    r0 = torch.load(f"{tmp_path / 'state'}.rank0", weights_only=True)
    r1 = torch.load(f"{tmp_path / 'state'}.rank1", weights_only=True)
    for k in r0:  # every rank holds the identical teacher (and student)
        assert torch.equal(r0[k], r1[k]), k

"""Adam under ``torchrun`` with 2 gloo processes on CPU: the key queue (policy ``gathered``) holds
the keys of both ranks, rank 0's then rank 1's for every step, identically on both ranks, and
everything else (weights, key encoder, BatchNorm statistics) agrees as well."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "adam_ddp_script.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_queue_holds_both_ranks_keys_identically(tmp_path: Path) -> None:
    if not TORCHRUN.exists():
        pytest.fail(f"torchrun not found beside {sys.executable}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [
        str(TORCHRUN),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(SCRIPT),
        "--out",
        str(tmp_path / "run"),
        "--dump",
        str(tmp_path / "state"),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    r0 = torch.load(f"{tmp_path / 'state'}.rank0", weights_only=True)
    r1 = torch.load(f"{tmp_path / 'state'}.rank1", weights_only=True)
    a, b = r0["final"], r1["final"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # 4 steps x 2 ranks x 2 keys = 16 keys in a queue of 24: slots 0..15, step by step, rank 0 first
    steps = len(r0["own"])
    assert steps == len(r1["own"]) == 4
    want_k = torch.cat([torch.cat([r0["own"][s]["keys"], r1["own"][s]["keys"]]) for s in range(steps)])
    want_i = torch.cat([torch.cat([r0["own"][s]["ids"], r1["own"][s]["ids"]]) for s in range(steps)])
    assert int(a["queue.ptr"]) == 16
    torch.testing.assert_close(a["queue.keys"][:16], want_k, rtol=0, atol=0)
    assert torch.equal(a["queue.ids"][:16], want_i)
    assert not torch.equal(r0["own"][0]["keys"], r1["own"][0]["keys"])  # the ranks saw other images

"""Every peer method under ``torchrun`` with 2 gloo processes on CPU: after a few steps on
different views per rank, both ranks hold identical parameters and buffers (gradients averaged,
initial state broadcast), and the weights moved away from the initial state."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "peers_ddp_script.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> None:
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
        *args,
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]


# per method: extra overrides of the 2-rank run, and the optimiser steps it must take (4 volumes)
RUNS = {
    "simmim": ([], 2),  # global batch 2: 1 volume per rank, 2 steps
    # batch_scope per_rank: batch_size counts volumes per process, so 2 ranks make a global batch of
    # 4 (the Swin SSL code's per-GPU batch, growing with the GPUs): 1 step
    "swinssl": (["train.batch_scope=per_rank"], 1),
    # the released code's teacher, updated once per optimiser step over 2 accumulated micro-batches
    "voco": (["method.voco_teacher=ema", "train.batch_size=4", "train.grad_accum=2"], 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simmim", "swinssl", "voco"])
def test_two_gloo_ranks_agree(method: str, tmp_path: Path) -> None:
    if method == "voco":  # its own launch: a second process group in one launch can hang
        _torchrun("--check-bn", str(tmp_path / "bn"))
    if method == "swinssl":
        _torchrun("--check-gather", str(tmp_path / "gather"))
        _assert_gathered_contrastive_equals_one_process(tmp_path / "gather")
    overrides, steps = RUNS[method]
    _torchrun(
        "--method", method, "--out", str(tmp_path / "run"), "--dump", str(tmp_path / "state"), *overrides
    )
    r0 = torch.load(f"{tmp_path / 'state'}.rank0", weights_only=True)
    r1 = torch.load(f"{tmp_path / 'state'}.rank1", weights_only=True)
    a, b = r0["final"], r1["final"]
    assert a.keys() == b.keys() and len(a) > 100
    for k in a:  # parameters and buffers alike
        assert torch.equal(a[k], b[k]), k
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], r0["init"][k])]
    assert any(".swinViT." in k for k in moved), "no backbone weight changed: the steps did not train"
    from asa3d.engine.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["world_size"] == 2 and ck["progress"]["global_iter"] == steps
    if method == "voco":
        _assert_batchnorm_spans_ranks(tmp_path / "bn")


def _assert_gathered_contrastive_equals_one_process(prefix: Path) -> None:
    """NT-Xent with negatives gathered over 2 ranks: with the differentiable gather, the rank-mean
    loss and the DDP-averaged gradient equal one process over the global batch; the plain gather
    gets the loss right but not the gradient (other ranks' anchors never pull on this rank's rows)."""
    for rank in (0, 1):
        d = torch.load(f"{prefix}.rank{rank}", weights_only=True)
        ref = d["one_process"]
        torch.testing.assert_close(d["with_grad"]["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d["with_grad"]["grad"], ref["grad"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d["plain"]["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
        assert (d["plain"]["grad"] - ref["grad"]).abs().max() > 1e-3


def _assert_batchnorm_spans_ranks(prefix: Path) -> None:
    """VoCo's projector BatchNorm on 2 ranks x 6 rows equals BatchNorm over the 12 rows, output and
    input gradient (nn.SyncBatchNorm would refuse CPU tensors)."""
    for rank in (0, 1):
        d = torch.load(f"{prefix}.rank{rank}", weights_only=True)
        torch.testing.assert_close(d["out"], d["out_ref"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d["grad"], d["grad_ref"], rtol=1e-4, atol=1e-5)


def test_voco_projector_batchnorms_are_rank_synchronised() -> None:
    from asa3d.config_sections import ModelConfig
    from asa3d.methods.voco import RankBatchNorm1d, VoCoConfig, VoCoNetwork

    model = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), window_size=4)
    kinds = lambda sync: [  # noqa: E731
        type(m).__name__
        for m in VoCoNetwork(model, VoCoConfig(proj_hidden_dim=8, proj_dim=8, sync_batchnorm=sync)).projector
        if "Norm" in type(m).__name__
    ]
    assert kinds(True) == [RankBatchNorm1d.__name__] * 2 and kinds(False) == ["BatchNorm1d"] * 2
    x = torch.randn(7, 8)  # one process: exactly BatchNorm1d(affine=False, no running stats)
    ref = torch.nn.BatchNorm1d(8, affine=False, track_running_stats=False)(x)
    torch.testing.assert_close(RankBatchNorm1d()(x), ref)

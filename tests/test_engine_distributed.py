"""asa3d.engine.distributed's collectives on two real gloo ranks (spawned in-process, no torchrun)
and its single-process no-ops: rank 0's state reaches every rank, gradients and extras are
averaged with a gradient-less parameter left alone, and a rank mismatch is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from asa3d.engine.distributed import (
    DistEnv,
    average_gradients,
    barrier,
    broadcast_module_state,
    broadcast_tensors_,
    cleanup,
    first_mismatch,
    init_distributed,
    resolve_device,
    step_seed,
)

WORLD = 2


def _module(rank: int) -> nn.Module:
    torch.manual_seed(rank)
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    m.register_buffer("d", torch.full((2,), float(rank) + 0.25, dtype=torch.float64))
    m.register_buffer("k", torch.tensor([rank]))
    return m


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    env = DistEnv(rank=rank, world_size=WORLD)
    res: dict = {}
    m = _module(rank)
    broadcast_module_state(m, env)
    res["state"] = {k: v.clone() for k, v in m.state_dict().items()}
    p1, p2, p3 = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))
    p1.grad = torch.full((2, 2), float(rank + 1))
    p2.grad = torch.arange(3.0) * (rank + 1)
    res["extras"] = average_gradients([p1, p3, p2], env, extra=[rank * 2.0, torch.tensor(1.0 + rank)])
    res["grads"] = (p1.grad.clone(), p2.grad.clone(), p3.grad)
    res["extras_only"] = average_gradients([p3], env, extra=[float(rank)])
    a = torch.full((2,), rank + 0.5)
    b = torch.tensor([rank * 10])
    c = torch.full((1, 3), float(rank), dtype=torch.float64)
    broadcast_tensors_([a, b, c], env)
    res["bcast"] = (a, b, c)
    same = torch.arange(4.0)
    perm = torch.arange(4.0) if rank == 0 else torch.tensor([1.0, 0.0, 2.0, 3.0])
    diff = torch.full((2,), float(rank))
    res["mm_none"] = first_mismatch([("same", same)], env)
    res["mm_perm"] = first_mismatch([("same", same), ("perm", perm), ("diff", diff)], env)
    res["mm_diff"] = first_mismatch([("same", same), ("diff", diff)], env)
    barrier(env)
    cleanup(env)
    res["initialized_after_cleanup"] = dist.is_initialized()
    torch.save(res, Path(out) / f"rank{rank}.pt")


def test_two_gloo_ranks_broadcast_average_and_name_mismatches(tmp_path: Path) -> None:
    # single-process calls first: mutation testing's coverage sees this process only, and maps the
    # test to the functions it calls here (the spawned ranks then run the same, mutated, code)
    solo = DistEnv()
    broadcast_module_state(_module(0), solo)
    average_gradients([], solo)
    broadcast_tensors_([torch.zeros(1)], solo)
    first_mismatch([("t", torch.zeros(1))], solo)
    barrier(solo)
    cleanup(solo)
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    want = _module(0).state_dict()
    for k, v in want.items():
        if k == "k":  # integer buffers are each rank's own
            assert r0["state"][k].tolist() == [0] and r1["state"][k].tolist() == [1]
        else:
            assert torch.equal(r0["state"][k], v) and torch.equal(r1["state"][k], v), k
            assert r1["state"][k].dtype == v.dtype, k
    for r in (r0, r1):
        assert r["extras"] == [1.0, 1.5]
        g1, g2, g3 = r["grads"]
        assert g1.tolist() == [[1.5, 1.5], [1.5, 1.5]] and g2.tolist() == [0.0, 1.5, 3.0] and g3 is None
        assert r["extras_only"] == [0.5]
        a, b, c = r["bcast"]
        assert a.tolist() == [0.5, 0.5] and b.tolist() == [0] and c.tolist() == [[0.0, 0.0, 0.0]]
        assert c.dtype == torch.float64 and b.dtype == torch.int64
        assert r["mm_none"] is None
        assert r["mm_perm"] == ("perm", 6.0, 6.0)  # same sum: the position-weighted sum tells them apart
        assert r["mm_diff"] == ("diff", 2.0, 0.0)
        assert r["initialized_after_cleanup"] is False


def test_single_process_collectives_are_no_ops() -> None:
    env = DistEnv()
    assert env.is_main and not env.distributed and env.device == torch.device("cpu")
    assert DistEnv(rank=1, world_size=2).is_main is False and DistEnv(world_size=2).distributed
    m = _module(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    broadcast_module_state(m, env)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 3.0])
    assert average_gradients([p], env, extra=[1, torch.tensor(2.5)]) == [1.0, 2.5]
    assert p.grad.tolist() == [1.0, 3.0]
    assert average_gradients([p], env) == []
    t = torch.tensor([4.0])
    broadcast_tensors_([t], env)
    broadcast_tensors_([], DistEnv(world_size=2))  # nothing to send: returns before any collective
    assert t.tolist() == [4.0]
    assert first_mismatch([("t", t)], env) is None
    assert first_mismatch([], DistEnv(world_size=2)) is None
    assert not dist.is_initialized()
    barrier(env)  # no process group: these must not call into torch.distributed
    cleanup(env)
    cleanup(DistEnv(world_size=2))  # distributed but never initialised: nothing to tear down


def test_resolve_device_and_single_process_init(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError) as e:
            resolve_device("cuda:1")
        assert str(e.value) == "train.device='cuda:1' but CUDA is not available on this machine."
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert init_distributed("cpu") == DistEnv(0, 1, 0, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert init_distributed("cpu") == DistEnv(0, 1, 3, torch.device("cpu"))
    assert not dist.is_initialized()


def test_step_seed_depends_on_every_component() -> None:
    base = step_seed(7, 0, 5, 0)
    assert base == step_seed(7, 0, 5, 0)
    assert base == int(np.random.SeedSequence([7, 0, 5, 0]).generate_state(1)[0])
    assert (
        len(
            {base, step_seed(8, 0, 5, 0), step_seed(7, 1, 5, 0), step_seed(7, 0, 6, 0), step_seed(7, 0, 5, 1)}
        )
        == 5
    )


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, world: int, rank: int, local_rank: int) -> list[dict]:
    """torchrun's variables, and a recorder in place of joining a real process group."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    calls: list[dict] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    return calls


def test_torchrun_ranks_join_a_gloo_group_on_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import datetime
    import logging

    calls = _torchrun_env(monkeypatch, world=2, rank=1, local_rank=1)
    with caplog.at_level(logging.INFO, logger="asa3d.engine.distributed"):
        env = init_distributed("cpu", timeout_min=5)
    assert env == DistEnv(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    assert calls == [
        {
            "backend": "gloo",
            "init_method": "env://",
            "rank": 1,
            "world_size": 2,
            "timeout": datetime.timedelta(minutes=5),
        }
    ]
    ours = [r.getMessage() for r in caplog.records if r.name == "asa3d.engine.distributed"]
    assert ours == ["rank 1/2 joined the gloo process group on cpu"]
    init_distributed("cpu")
    assert calls[-1]["timeout"] == datetime.timedelta(minutes=30)  # the default: 30 minutes
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # a group already joined: not again
    assert init_distributed("cpu").world_size == 2 and len(calls) == 2


def test_cuda_ranks_take_their_local_gpu_and_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert resolve_device("auto", 3) == torch.device("cuda", 1)
    assert resolve_device("cuda", 2) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("auto", 5) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    calls = _torchrun_env(monkeypatch, world=4, rank=2, local_rank=3)
    env = init_distributed("auto")
    assert env.device == torch.device("cuda", 3) and chosen == [torch.device("cuda", 3)]
    assert calls[0]["backend"] == "nccl" and calls[0]["device_id"] == torch.device("cuda", 3)
    assert (calls[0]["rank"], calls[0]["world_size"]) == (2, 4)


def test_cuda_asked_for_where_there_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1) == torch.device("cpu")
    with pytest.raises(RuntimeError) as e:
        resolve_device("cuda")
    assert str(e.value) == "train.device='cuda' but CUDA is not available on this machine."

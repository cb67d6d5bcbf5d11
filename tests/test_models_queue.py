"""MoCo key queue: FIFO order, wrap-around, checkpoint round trip, keys gathered over 2 gloo ranks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asa3d.models.ema import make_teacher
from asa3d.models.moco_projector import MoCoProjector, momentum_update_
from asa3d.models.queue import KeyQueue


def _batch(start: int, n: int, dim: int = 3) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)


def test_fifo_order_and_wrap_around() -> None:
    q = KeyQueue(6, 3)
    q.enqueue(_batch(0, 4), ids=torch.arange(4))
    assert q.ptr.item() == 4
    assert q.keys[:4, 0].tolist() == [0, 1, 2, 3] and q.ids.tolist() == [0, 1, 2, 3, -1, -1]
    q.enqueue(_batch(4, 4), ids=torch.arange(4, 8))  # wraps: 6, 7 overwrite the two oldest (0, 1)
    assert q.ptr.item() == 2
    assert q.keys[:, 0].tolist() == [6, 7, 2, 3, 4, 5]
    keys, ids = q.ordered()
    assert keys[:, 0].tolist() == [2, 3, 4, 5, 6, 7] and ids.tolist() == [2, 3, 4, 5, 6, 7]
    q.enqueue(_batch(100, 9))  # larger than the queue: the last 6 keys, oldest first
    assert q.ordered()[0][:, 0].tolist() == [103, 104, 105, 106, 107, 108]
    assert (q.ordered()[1] == -1).all()


def test_initial_keys_are_unit_vectors_and_gather_is_applied() -> None:
    q = KeyQueue(8, 5)
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(8))
    q.enqueue(_batch(0, 2, 5), gather=lambda t: torch.cat([t, t + 10]))  # a fake 2-rank gather
    assert q.ordered()[0][-4:, 0].tolist() == [0, 1, 10, 11]
    with pytest.raises(ValueError, match="do not fit"):
        q.enqueue(torch.zeros(2, 4))


def test_queue_is_state_dict_buffers_and_resumes_exactly() -> None:
    a = KeyQueue(5, 2)
    a.enqueue(_batch(0, 3, 2))
    state = a.state_dict()
    assert set(state) == {"keys", "ids", "ptr"}
    b = KeyQueue(5, 2)
    b.load_state_dict(state)
    for q in (a, b):
        q.enqueue(_batch(3, 4, 2))
    assert torch.equal(a.keys, b.keys) and torch.equal(a.ptr, b.ptr) and torch.equal(a.ids, b.ids)


def test_projector_and_momentum_update() -> None:
    proj = MoCoProjector(16, 32, 8)
    assert [type(m).__name__ for m in proj] == ["Linear", "ReLU", "Linear"]
    assert proj(torch.randn(3, 16)).shape == (3, 8)
    key = make_teacher(proj)
    with torch.no_grad():
        for p in proj.parameters():
            p.add_(1.0)
    before = [p.clone() for p in key.parameters()]
    momentum_update_(key, proj, 0.9)
    for k, b, s in zip(key.parameters(), before, proj.parameters(), strict=True):
        assert torch.allclose(k, 0.9 * b + 0.1 * s)
        assert not k.requires_grad


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial keys on every rank (the engine seeds them alike)
        q = KeyQueue(8, 2)
        for step in range(3):  # 3 steps x 2 ranks x 2 keys = 12 > 8: the ring wraps
            own = torch.tensor([[100 * step + 10 * rank + j, rank] for j in range(2)], dtype=torch.float32)
            q.enqueue(own, ids=torch.full((2,), rank), gather=_all_gather_cat)
        torch.save({k: v.clone() for k, v in q.state_dict().items()}, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_hold_the_gathered_keys_of_both(tmp_path: Path) -> None:
    out = str(tmp_path / "queue")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0 = torch.load(f"{out}.rank0", weights_only=True)
    r1 = torch.load(f"{out}.rank1", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks hold different {k}"
    q = KeyQueue(8, 2)
    q.load_state_dict(r0)
    keys, ids = q.ordered()
    # newest 8 of: step 0 [0, 1 | 10, 11], step 1 [100, 101 | 110, 111], step 2 [200, 201 | 210, 211]
    assert keys[:, 0].tolist() == [100, 101, 110, 111, 200, 201, 210, 211]
    assert ids.tolist() == [0, 0, 1, 1, 0, 0, 1, 1] and keys[:, 1].tolist() == ids.float().tolist()

"""torchrun-based data parallelism without DDP wrappers.

Why no ``DistributedDataParallel``: phases use different parameter subsets, and DDP would need
``find_unused_parameters=True``. Instead every rank runs the same step on its shard of the
global batch, and the gradients that exist after backward are averaged by ONE coalesced
all-reduce (docs/architecture.md "Distributed gradient averaging"). The result equals DDP's.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda") or pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        if pref != "auto":
            raise RuntimeError(f"train.device={pref!r} but CUDA is not available on this machine.")
        return torch.device("cpu")
    return torch.device(pref)


def init_distributed(device_pref: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and join the
    process group: NCCL on CUDA, gloo on CPU. Without torchrun: a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_min),
            **kwargs,
        )
        log.info("rank %d/%d joined the %s process group on %s", rank, world, backend, device)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_module_state(module: torch.nn.Module, env: DistEnv) -> None:
    """Make every rank start from rank 0's parameters and buffers (one coalesced broadcast)."""
    if not env.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in module.state_dict().values():
        if torch.is_tensor(t) and t.is_floating_point():
            by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for tensors in by_dtype.values():  # one broadcast per dtype, no precision lost
            flat = torch.cat([t.detach().reshape(-1).to(env.device) for t in tensors])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def average_gradients(
    params: Iterable[torch.nn.Parameter], env: DistEnv, extra: Sequence[float | torch.Tensor] = ()
) -> list[float]:
    """Average, across ranks, the gradients that exist (``p.grad is not None``) plus ``extra``
    scalars (loss terms, a bad-step flag) in one flattened all-reduce. Returns the averaged
    extras. The set of gradients must be the same on every rank (it depends only on the phase)."""
    grads = [p.grad for p in params if p.grad is not None]
    extra_t = torch.tensor([float(x) for x in extra], dtype=torch.float32, device=env.device)
    if not env.distributed:
        return extra_t.tolist()
    dtype = grads[0].dtype if grads else torch.float32
    flat = torch.cat([g.reshape(-1) for g in grads] + [extra_t.to(dtype)]) if grads else extra_t
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(env.world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
    return flat[offset:].float().tolist()


def phase_order(n: int, seed: int, round_: int, phase_index: int) -> np.ndarray:
    """The global visiting order of one phase pass: a permutation drawn from (seed, round, phase),
    identical on every rank (the DistributedSampler idea, reseeded per round and phase)."""
    return np.random.default_rng([seed, round_, phase_index]).permutation(n)


def rank_indices(
    order: np.ndarray, global_batch: int, iters: int, rank: int, world: int, start_iter: int = 0
) -> list[int]:
    """This rank's dataset indices for iterations ``start_iter..iters-1``, in loading order.

    Iteration i consumes ``order[i*B:(i+1)*B]`` (wrapping around when the set is not a multiple
    of B); rank r takes the r-th contiguous slice of B/world samples. Skipping consumed
    iterations on resume is just ``start_iter``.
    """
    per_rank = global_batch // world
    n = len(order)
    out: list[int] = []
    for i in range(start_iter, iters):
        base = i * global_batch + rank * per_rank
        out.extend(int(order[(base + j) % n]) for j in range(per_rank))
    return out


def step_seed(seed: int, rank: int, global_iter: int, micro: int) -> int:
    """A seed per (run seed, rank, iteration, micro-batch): view randomness is reproducible on
    resume with any world size without replaying RNG streams."""
    return int(np.random.SeedSequence([seed, rank, global_iter, micro]).generate_state(1)[0])


def broadcast_tensors_(tensors: Sequence[torch.Tensor], env: DistEnv) -> None:
    """Copy rank 0's values of ``tensors`` to every rank (one broadcast per tensor dtype)."""
    if not env.distributed or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def first_mismatch(
    named: Sequence[tuple[str, torch.Tensor]], env: DistEnv
) -> tuple[str, float, float] | None:
    """The first tensor whose values differ between ranks, as (name, max, min) of its checksum;
    None when all agree. Two float64 checksums per tensor (sum, and a position-weighted sum that
    also catches permutations such as a rotated queue), one all-reduce for all of them."""
    if not env.distributed or not named:
        return None
    sums = []
    with torch.no_grad():
        for _, t in named:
            x = t.detach().reshape(-1).double()
            w = (torch.arange(x.numel(), device=x.device, dtype=torch.float64) % 13) + 1.0
            sums += [x.sum(), (x * w).sum()]
        vec = torch.stack(sums).to(env.device)
        both = torch.cat([vec, -vec])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both[: len(vec)], -both[len(vec) :]
    differ = (hi != lo).nonzero()
    if not len(differ):
        return None
    i = int(differ[0]) // 2
    return named[i][0], float(hi[2 * i]), float(lo[2 * i])

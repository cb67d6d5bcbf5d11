"""What a method may ask of the other ranks, and how each of its buffers is kept across ranks.

The engine sets ``method.dist`` to a ``DistContext`` of the run (one process: identity
operations), so a method never imports ``torch.distributed`` itself. ``buffer_policy()`` maps
buffer-name prefixes (as in ``method.named_buffers()``) to one of ``BUFFER_POLICIES``:

- ``broadcast`` (the default for undeclared buffers, like DDP's ``broadcast_buffers``): rank 0's
  values are copied to every rank after each optimiser step (e.g. BatchNorm running statistics);
- ``sync_bn``: the BatchNorm layers under the prefix become ``torch.nn.SyncBatchNorm`` (batch
  statistics over all ranks; needs CUDA/NCCL), so their buffers agree by construction;
- ``gathered``: the method fills the buffer with ``self.dist.all_gather``-ed values (a MoCo key
  queue), so it agrees by construction; the engine only checks it;
- ``local``: legitimately different per rank; not checked (rank 0's is saved).

At the end of every round the engine checks that all ranks hold the same parameters and the
same non-``local`` buffers, and names the first tensor that differs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["BUFFER_POLICIES", "DistContext", "all_reduce_sum_with_grad", "resolve_buffer_policies"]

BUFFER_POLICIES = ("broadcast", "sync_bn", "gathered", "local")


class DistContext:
    """Collectives for methods; with one process every operation is the identity."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank = int(rank)
        self.world_size = int(world_size)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @torch.no_grad()
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0 in rank
        order; no gradient flows through it."""
        if not self.distributed:
            return tensor
        t = tensor.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t)
        return torch.cat(parts)

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order, differentiable: the
        gradient that every rank's loss puts on this rank's rows flows back here (summed over
        ranks), so with DDP's gradient averaging a loss over gathered rows trains as one process
        over the global batch would (e.g. a contrastive loss whose negatives span the ranks).
        Built on ``all_reduce_sum_with_grad`` (this rank's rows in place, zeros elsewhere; the sum
        is exact), because gloo has no reduce-scatter for the backward of a plain all-gather."""
        if not self.distributed:
            return tensor
        n = tensor.shape[0]
        pad = (0, 0) * (tensor.ndim - 1)
        rows = torch.nn.functional.pad(tensor, (*pad, self.rank * n, (self.world_size - 1 - self.rank) * n))
        return all_reduce_sum_with_grad(rows)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients (each rank's
    output depends on every rank's input). Plain synchronous ``dist.all_reduce`` in both
    directions: ``torch.distributed.nn.functional.all_reduce`` is deprecated and, under gloo,
    aborted the process at exit ("terminate called without an active exception")."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.detach().clone().contiguous()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = grad.detach().clone().contiguous()
        torch.distributed.all_reduce(g)
        return g


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank, differentiable (identity without a process group)."""
    if not (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        return tensor
    return _AllReduceSum.apply(tensor)


def resolve_buffer_policies(
    buffer_names: list[str], declared: Mapping[str, str], where: str = "buffer_policy()"
) -> dict[str, str]:
    """The policy of every buffer: the longest declared prefix that matches, else ``broadcast``."""
    for prefix, policy in declared.items():
        if policy not in BUFFER_POLICIES:
            raise ValueError(f"{where}: {prefix!r} -> {policy!r}; choose one of {list(BUFFER_POLICIES)}")
        if not any(n == prefix or n.startswith(prefix) for n in buffer_names):
            raise ValueError(f"{where}: prefix {prefix!r} matches no buffer (buffers: {buffer_names[:8]})")
    out = {}
    for name in buffer_names:
        best = max((p for p in declared if name == p or name.startswith(p)), key=len, default=None)
        out[name] = declared[best] if best is not None else "broadcast"
    return out

"""MoCo's key queue: a FIFO ring of K keys held as buffers, so a checkpoint carries it exactly.

``keys`` (K, D), ``ids`` (K,) (the source volume/image of each key, -1 where unknown) and ``ptr``
(the slot the next key goes to) are registered buffers: ``state_dict`` saves them, a resumed run
continues the ring where it stopped, and a new stage that loads the previous stage's state starts
from its queue. The initial keys are random unit vectors (as in MoCo), drawn from the global RNG.

Under data parallelism every rank must hold the same queue: the caller passes a ``gather``
function that concatenates the keys of all ranks in rank order (the engine's all-gather); the
default is the identity (one process). Every rank then enqueues the same tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KeyQueue"]

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class KeyQueue(nn.Module):
    keys: torch.Tensor
    ids: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size {size} and key dim {dim} must be >= 1")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(
        self, keys: torch.Tensor, ids: torch.Tensor | None = None, gather: Gather | None = None
    ) -> None:
        """Append ``keys`` (N, D) (and their ``ids`` (N,)), overwriting the oldest entries.

        ``gather`` turns this rank's tensor into all ranks' (``torch.cat`` in rank order); it is
        applied to keys and ids alike. A batch larger than the queue keeps its last K keys.
        """
        gather = gather or _identity
        k = gather(keys.detach().to(self.keys.dtype))
        if ids is None:
            ids = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        i = gather(ids.detach().to(torch.long))
        if k.ndim != 2 or k.shape[1] != self.keys.shape[1] or i.shape != k.shape[:1]:
            raise ValueError(
                f"enqueue: keys {tuple(k.shape)} and ids {tuple(i.shape)} do not fit a queue of "
                f"{tuple(self.keys.shape)}"
            )
        n, size = k.shape[0], self.size
        if n > size:
            k, i, n = k[-size:], i[-size:], size
        slots = (self.ptr + torch.arange(n, device=self.keys.device)) % size
        self.keys[slots] = k.to(self.keys.device)
        self.ids[slots] = i.to(self.ids.device)
        self.ptr.copy_((self.ptr + n) % size)

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, ids) from the oldest to the newest entry."""
        order = (self.ptr + torch.arange(self.size, device=self.keys.device)) % self.size
        return self.keys[order], self.ids[order]

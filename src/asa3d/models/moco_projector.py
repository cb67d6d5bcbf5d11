"""MoCo-v2's projector and the momentum key encoder built on the shared EMA helpers.

The projector is MoCo-v2's 2-layer MLP, Linear(C, H) -> ReLU -> Linear(H, out), no BatchNorm
(2048 -> 2048 -> 128 on a ResNet-50); the loss l2-normalises its output. The key encoder is an
exact copy of (encoder, projector) updated by EMA with momentum 0.999 (Adam, MoCo-v2): use
``asa3d.models.ema.make_teacher`` and ``ema_update_`` (nothing is re-written here).
"""

from __future__ import annotations

import torch
from torch import nn

from asa3d.models.ema import ema_update_

__all__ = ["MoCoProjector", "momentum_update_"]


class MoCoProjector(nn.Sequential):
    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


@torch.no_grad()
def momentum_update_(key_model: nn.Module, query_model: nn.Module, m: float) -> None:
    """key <- m * key + (1 - m) * query over every parameter (same architecture); buffers
    (BatchNorm statistics) are not averaged: the key encoder keeps its own, as in MoCo."""
    ema_update_(key_model.parameters(), query_model.parameters(), m)

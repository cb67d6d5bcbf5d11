"""ASA loss terms as pure functions (the ASA paper, Sec. 2; docs/methods/asa.md). All are computed in fp32.

Consistency reduction (global and local terms):
- ``sum``: squared l2 distance summed over the embedding dimension, averaged over vectors. For
  normalised embeddings this is 2 - 2 cos (BYOL form), the asa3d default.
- ``mean``: averaged over every element (the reference code's ``MSELoss``) = sum-form / dim.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "appearance_loss",
    "consistency_loss",
    "order_loss_1d",
    "order_loss_1d_ce",
    "order_loss_3d",
]

Reduction = Literal["sum", "mean"]


def order_loss_3d(pred: torch.Tensor, target3d: torch.Tensor) -> torch.Tensor:
    """L_vop: element-mean squared error over B*N*3 between predicted and source coordinates."""
    return F.mse_loss(pred.float(), target3d.float())


def order_loss_1d(pred: torch.Tensor, target1d: torch.Tensor) -> torch.Tensor:
    """1D L_vop, scalar regression: ``pred`` (B, N, 1) or (B, N) against (B, N) scaled indices."""
    if pred.ndim == target1d.ndim + 1:
        pred = pred.squeeze(-1)
    return F.mse_loss(pred.float(), target1d.float())


def order_loss_1d_ce(logits: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """1D L_vop as N-way classification (POPAR style): logits (B, N, N), perm (B, N) long."""
    return F.cross_entropy(logits.float().flatten(0, 1), perm.flatten())


def appearance_loss(recon: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """L_var: voxel-mean squared error between the reconstruction and the un-permuted volume."""
    return F.mse_loss(recon.float(), original.float())


def consistency_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    normalize: bool = True,
    reduction: Reduction = "sum",
) -> torch.Tensor:
    """Squared l2 distance between (optionally l2-normalised) embeddings, rows paired.

    ``student``/``teacher``: (..., D). With zero rows (no overlap) the result is a zero that still
    depends on ``student`` so the backward pass stays well defined.
    """
    s = student.float()
    t = teacher.float().detach()
    if s.shape != t.shape:
        raise ValueError(f"consistency: shapes differ {tuple(s.shape)} vs {tuple(t.shape)}")
    if s.numel() == 0:
        return s.sum() * 0.0
    if normalize:
        s = F.normalize(s, dim=-1)
        t = F.normalize(t, dim=-1)
    sq = (s - t).pow(2)
    if reduction == "sum":
        return sq.sum(-1).mean()
    if reduction == "mean":
        return sq.mean()
    raise ValueError(f"reduction {reduction!r}: use 'sum' or 'mean'")

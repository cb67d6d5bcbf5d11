"""SimMIM loss terms as pure functions (Xie et al., CVPR 2022; computed in fp32).

The reconstruction loss is the official SimMIM form: an L1 over the masked voxels only,
L = sum_v |x_hat_v - x_v| m_v / (sum_v m_v + 1e-5) / C (C input channels), with the sums over the
whole batch. ``visible_l1`` is the same over the unmasked voxels: a diagnostic, never optimised.
"""

from __future__ import annotations

import torch

__all__ = ["masked_l1", "visible_l1"]

EPS = 1e-5  # SimMIM's guard against an empty mask


def _mask(voxel_mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, Z) or (B, 1, X, Y, Z) -> (B, 1, X, Y, Z) float, checked against ``pred``."""
    m = voxel_mask[:, None] if voxel_mask.ndim == pred.ndim - 1 else voxel_mask
    if m.shape[0] != pred.shape[0] or m.shape[1] != 1 or m.shape[2:] != pred.shape[2:]:
        raise ValueError(f"mask {tuple(voxel_mask.shape)} does not match prediction {tuple(pred.shape)}")
    return m.float()


def masked_l1(pred: torch.Tensor, target: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
    """L1 on the masked voxels of (B, C, X, Y, Z) tensors; ``voxel_mask`` (B, X, Y, Z) bool."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    m = _mask(voxel_mask, pred)
    err = (pred.float() - target.float()).abs()
    return (err * m).sum() / (m.sum() + EPS) / pred.shape[1]


@torch.no_grad()
def visible_l1(pred: torch.Tensor, target: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
    """The same L1 on the visible (unmasked) voxels, for logging."""
    return masked_l1(pred, target, ~voxel_mask.bool())

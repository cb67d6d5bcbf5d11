"""Swin UNETR self-supervised loss terms as pure functions (Tang et al., CVPR 2022; fp32).

As the released pretraining code: rotation cross-entropy over 4 classes, inpainting as the mean
L1 over ALL voxels against the rotated, un-cut-out view (``region="all"``; the paper calls it
masked volume inpainting, ``region="cutout"`` restricts it to the cut-out boxes), and NT-Xent
between the two views' embeddings with temperature 0.5. The total is 1 * each.

Contrastive negatives: the code takes them from the per-GPU batch. ``nt_xent`` also accepts
embeddings already gathered from every rank (``z1_all``, ``z2_all``, rank-major rows) plus the
offset of this rank's rows in them. The local rows of the gathered tensors are replaced by the
local embeddings, so this rank's anchors always reach them directly, and the loss is the mean over
this rank's anchors: the mean over equal ranks of those losses equals the loss of one process over
the global batch. With a differentiable gather (``DistContext.all_gather_with_grad``, what the
method uses) the gradients match too: the other ranks' anchors reach this rank's rows through
the gather's backward (tests/test_peers_ddp.py); with a plain gather only the values do.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["inpainting_loss", "nt_xent", "rotation_loss"]


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, 4) logits against (B,) quarter-turn labels."""
    return F.cross_entropy(logits.float(), labels.long())


def inpainting_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    region_mask: torch.Tensor | None = None,
    region: Literal["all", "cutout"] = "all",
) -> torch.Tensor:
    """Mean |recon - target| over every voxel (``all``), or over the cut-out voxels only
    (``cutout``: ``region_mask`` (B, X, Y, Z) bool; 0 with a gradient when nothing was cut)."""
    if recon.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(recon.shape)} and target {tuple(target.shape)} differ")
    err = (recon.float() - target.float()).abs()
    if region == "all":
        return err.mean()
    if region != "cutout":
        raise ValueError(f"inpainting region {region!r}: use 'all' or 'cutout'")
    if region_mask is None:
        raise ValueError("inpainting region 'cutout' needs the cut-out mask")
    m = region_mask[:, None].expand_as(err).float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


def _with_local(gathered: torch.Tensor, local: torch.Tensor, offset: int) -> torch.Tensor:
    """Normalised gathered rows with this rank's rows [offset, offset + n) replaced by ``local``."""
    rest = F.normalize(gathered.float(), dim=1)
    return torch.cat([rest[:offset], local, rest[offset + local.shape[0] :]])


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    z1_all: torch.Tensor | None = None,
    z2_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """NT-Xent of paired views z1, z2 (n, D): the positive of a row is its other view, negatives
    are every other row of both views except itself (SimCLR; = ``monai.losses.ContrastiveLoss``
    without gathering). With ``z1_all``/``z2_all`` (N, D), the candidates come from those and this
    rank's rows sit at [offset, offset + n)."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"views must be paired (n, D) embeddings, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    a1, a2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    if (z1_all is None) != (z2_all is None):
        raise ValueError("give both z1_all and z2_all, or neither")
    if z1_all is None:
        c1, c2, offset = a1, a2, 0
    else:
        if z1_all.shape != z2_all.shape or z1_all.shape[1:] != z1.shape[1:]:  # type: ignore[union-attr]
            raise ValueError(f"gathered views {tuple(z1_all.shape)} do not match local {tuple(z1.shape)}")
        if not 0 <= offset <= z1_all.shape[0] - n:
            raise ValueError(f"offset {offset} + {n} local rows exceeds the {z1_all.shape[0]} gathered rows")
        c1, c2 = _with_local(z1_all, a1, offset), _with_local(z2_all, a2, offset)  # type: ignore[arg-type]
    big_n = c1.shape[0]
    anchors = torch.cat([a1, a2])  # (2n, D)
    cands = torch.cat([c1, c2])  # (2N, D)
    logits = anchors @ cands.T / temperature
    idx = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([idx, idx + big_n])
    pos_idx = torch.cat([idx + big_n, idx])
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * big_n).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_idx)

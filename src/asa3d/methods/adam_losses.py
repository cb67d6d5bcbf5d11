"""Adam's loss: MoCo InfoNCE over a key queue, with the purposive pruner (Hosseinzadeh Taher et
al., "Towards Foundation Models Learned from Anatomy in Medical Imaging via Self-Supervision",
supplement, Algorithm 1). Pure functions, computed in fp32.

For query q_i, its positive key k_i and queue keys k_j (all l2-normalised):

    L = -(1/B) sum_i log[ exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_{j kept} exp(q_i.k_j/tau)) ]

The pruner drops, per query, every queue key whose *raw* cosine to the query is >= gamma (likely
the same anatomy from another patient); the positive is always kept. ``gamma=None`` is plain
MoCo-v2 (Adam's level n = 0). Optionally keys from the query's own source volume are dropped too
(``query_ids`` / ``key_ids``): with a small CT data set the queue holds many keys of the anchor's
own volume, which would act as false negatives at every level. Vectorised: pruned logits are set
to -inf (the reference code loops per sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PrunedInfoNCE", "pruned_infonce"]


@dataclass
class PrunedInfoNCE:
    loss: torch.Tensor  # scalar
    pruned_fraction: torch.Tensor  # scalar: fraction of (query, queue key) pairs removed
    keep: torch.Tensor  # (B, K) bool: queue keys left in each query's denominator


def pruned_infonce(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    queue: torch.Tensor,
    tau: float = 0.2,
    gamma: float | None = 0.8,
    query_ids: torch.Tensor | None = None,
    key_ids: torch.Tensor | None = None,
) -> PrunedInfoNCE:
    """InfoNCE of queries ``q`` (B, D) with positives ``k_pos`` (B, D) against ``queue`` (K, D).

    Inputs need not be normalised; ``k_pos`` and ``queue`` are treated as constants (detached),
    as MoCo's key encoder has no gradient. ``query_ids`` (B,) / ``key_ids`` (K,) long: keys whose
    id equals the query's are removed as well (ids < 0 never match).
    """
    if tau <= 0:
        raise ValueError(f"temperature tau={tau} must be > 0")
    if q.ndim != 2 or k_pos.shape != q.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"shapes: q {tuple(q.shape)}, k_pos {tuple(k_pos.shape)}, queue {tuple(queue.shape)}; "
            "expected (B, D), (B, D), (K, D)"
        )
    qn = F.normalize(q.float(), dim=1)
    kn = F.normalize(k_pos.detach().float(), dim=1)
    bank = F.normalize(queue.detach().float(), dim=1)
    pos = (qn * kn).sum(1, keepdim=True)  # (B, 1) cosine
    neg = qn @ bank.T  # (B, K) cosine
    keep = torch.ones_like(neg, dtype=torch.bool)
    if gamma is not None:
        keep &= neg.detach() < gamma
    if query_ids is not None or key_ids is not None:
        if query_ids is None or key_ids is None:
            raise ValueError("pass both query_ids and key_ids, or neither")
        same = (query_ids[:, None] == key_ids[None, :]) & (key_ids[None, :] >= 0)
        keep &= ~same.to(keep.device)
    logits = torch.cat([pos, neg.masked_fill(~keep, float("-inf"))], dim=1) / tau
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    loss = F.cross_entropy(logits, target)
    pruned = (~keep).float().mean() if keep.numel() else neg.new_zeros(())
    return PrunedInfoNCE(loss=loss, pruned_fraction=pruned.detach(), keep=keep)

"""VoCo loss terms as pure functions (Wu et al., CVPR 2024; computed in fp32).

Logits p_jk = ReLU(cos(f(random crop j), f(base k))) per volume, in [0, 1]. The prediction loss
follows the released code's form (the CVPR text's formula is not restated here):
L_pos = -sum y_jk log(1 - |y_jk - p_jk| + 1e-6) / sum y_jk over the sw x n^2 matrix of one volume,
L_neg = sum_{y_jk = 0} p_jk^2 / #{y_jk = 0}, L_pred = L_pos + L_neg. The regularisation pushes
the base embeddings of one volume towards orthogonality: L_reg = mean over the n^2 (n^2 - 1) / 2
pairs k < l of ReLU(cos(f(b_k), sg(f(b_l))))^2 (gradient stopped on the second base). Both are
averaged over volumes; the total is L_pred + lambda * L_reg with lambda = 1 (supplement Table 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["base_regularization_loss", "prediction_loss", "symmetric_logits", "voco_logits"]

LOG_EPS = 1e-6


def voco_logits(crops: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """(B, sw, D) crop and (B, K, D) base embeddings -> (B, sw, K) ReLU'd cosine similarities."""
    if crops.ndim != 3 or bases.ndim != 3 or crops.shape[0] != bases.shape[0]:
        raise ValueError(
            f"expected (B, sw, D) and (B, K, D), got {tuple(crops.shape)} and {tuple(bases.shape)}"
        )
    c = F.normalize(crops.float(), dim=-1)
    b = F.normalize(bases.float(), dim=-1)
    return F.relu(c @ b.transpose(1, 2))


def symmetric_logits(
    s_crops: torch.Tensor, t_crops: torch.Tensor, s_bases: torch.Tensor, t_bases: torch.Tensor
) -> torch.Tensor:
    """The EMA-teacher form of the released code: 1/2 [p(student crop, teacher base) +
    p(teacher crop, student base)]; the teacher tensors carry no gradient."""
    return 0.5 * (voco_logits(s_crops, t_bases.detach()) + voco_logits(t_crops.detach(), s_bases))


def prediction_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_pos, L_neg), each the mean over volumes, for (B, sw, K) logits and overlap labels."""
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    p, y = logits.float().flatten(1), labels.float().flatten(1)
    pos = -(y * torch.log(1 - (y - p).abs() + LOG_EPS)).sum(1) / y.sum(1).clamp_min(LOG_EPS)
    zero = (y == 0).float()
    neg = (p.pow(2) * zero).sum(1) / zero.sum(1).clamp_min(1.0)  # 0 when every base is touched
    return pos.mean(), neg.mean()


def base_regularization_loss(bases: torch.Tensor) -> torch.Tensor:
    """Mean over volumes and base pairs k < l of ReLU(cos(b_k, sg(b_l)))^2; (B, K, D) input."""
    if bases.ndim != 3 or bases.shape[1] < 2:
        raise ValueError(f"need (B, K >= 2, D) base embeddings, got {tuple(bases.shape)}")
    k = bases.shape[1]
    b = F.normalize(bases.float(), dim=-1)
    sim = F.relu(b @ b.detach().transpose(1, 2))  # row k: b_k with gradient, column l stopped
    iu = torch.triu_indices(k, k, offset=1, device=bases.device)
    return sim[:, iu[0], iu[1]].pow(2).mean()

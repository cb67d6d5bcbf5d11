"""Health monitors for student-teacher methods: is the teacher's representation collapsing?"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

# A collapsed representation has (near) zero spread across samples and rank ~ 1. The thresholds
# are deliberately loose: they flag a trend worth looking at, they do not stop the run.
STD_RATIO_WARN = 0.05  # per-dim std of L2-normalised embeddings, relative to 1/sqrt(D)
ERANK_WARN = 1.5
MIN_BATCH = 4  # below this the spread and rank of a batch say nothing (2 centred rows have rank 1)


def embedding_health(emb: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Scalars from ``method.monitor_embeddings(batch)``.

    ``teacher_std``: mean over dimensions of the across-sample std of the L2-normalised teacher
    embeddings (uniform on the sphere gives ~1/sqrt(D); collapse gives 0). ``teacher_std_ratio``
    is it times sqrt(D). ``teacher_erank``: effective rank, exp of the entropy of the normalised
    singular values of the centred embeddings (1 = collapsed to a line; max = min(B, D)).
    ``student_teacher_cos``: mean cosine between paired student and teacher embeddings.
    """
    out: dict[str, float] = {}
    t = emb.get("teacher")
    if t is not None and t.ndim == 2 and t.shape[0] >= 2:
        z = F.normalize(t.detach().float(), dim=1)
        d = z.shape[1]
        std = z.std(dim=0).mean().item()
        out["teacher_std"] = std
        out["teacher_std_ratio"] = std * math.sqrt(d)
        s = torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))
        p = s / s.sum().clamp_min(1e-12)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum().item()
        out["teacher_erank"] = math.exp(entropy)
        out["batch"] = float(z.shape[0])
    s_emb = emb.get("student")
    if t is not None and s_emb is not None and s_emb.shape == t.shape:
        out["student_teacher_cos"] = (
            F.cosine_similarity(s_emb.detach().float(), t.detach().float(), dim=1).mean().item()
        )
    return out


def collapse_warning(health: Mapping[str, float]) -> str | None:
    reasons: list[str] = []
    if health.get("batch", 0) < MIN_BATCH:
        return None
    if "teacher_std_ratio" in health and health["teacher_std_ratio"] < STD_RATIO_WARN:
        reasons.append(f"teacher embedding std is {health['teacher_std_ratio']:.3g} x 1/sqrt(D)")
    if "teacher_erank" in health and health["teacher_erank"] < ERANK_WARN:
        reasons.append(f"teacher effective rank is {health['teacher_erank']:.3g}")
    if not reasons:
        return None
    return "possible representation collapse: " + "; ".join(reasons)

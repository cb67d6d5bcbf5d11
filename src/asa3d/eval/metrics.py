"""Per-case, per-class segmentation metrics (Dice, 95 % Hausdorff, normalised surface Dice).

Conventions (docs/evaluation.md):
- foreground classes only: background (class 0) is never scored;
- a class absent from both the ground truth and the prediction is NaN (nothing to score) and is
  left out of every mean; a class absent from the ground truth but predicted scores Dice 0;
- HD95 / NSD with exactly one side empty: HD95 = the diagonal of the volume in mm (the largest
  distance the grid allows, so a missed or hallucinated organ is maximally wrong but finite and
  averages stay finite), NSD = 0.

All numbers come from MONAI's functional metrics; we only fix the empty-class conventions,
which MONAI leaves as 1 (Dice, ``ignore_empty=False``) or NaN/inf (distances).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot

METRICS = ("dice", "hd95", "nsd")


def _onehot(labels: np.ndarray | torch.Tensor, n_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels), dtype=torch.long)[None, None]  # (1, 1, *spatial)
    return one_hot(t, num_classes=n_classes, dim=1)


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    n_classes: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    metrics: Sequence[str] = ("dice",),
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, list[float]]:
    """Metrics of one case: ``{metric: [value of class 1, ..., class n_classes-1]}``.

    ``pred`` and ``gt`` are integer label maps on the same grid; ``spacing`` is that grid's voxel
    size in mm (used by the distance metrics only).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {list(METRICS)}")
    pred_np, gt_np = np.asarray(pred), np.asarray(gt)
    if pred_np.shape != gt_np.shape:
        raise ValueError(f"prediction shape {pred_np.shape} differs from ground truth {gt_np.shape}")
    p1, g1 = _onehot(pred_np, n_classes), _onehot(gt_np, n_classes)
    in_pred = p1.flatten(2).any(-1)[0, 1:].numpy()
    in_gt = g1.flatten(2).any(-1)[0, 1:].numpy()
    both_empty = ~in_pred & ~in_gt
    one_empty = in_pred ^ in_gt
    out: dict[str, list[float]] = {}
    if "dice" in metrics:
        d = compute_dice(p1, g1, include_background=False, ignore_empty=False)[0].double().numpy()
        d[both_empty] = np.nan
        out["dice"] = d.tolist()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI warns per empty class; our conventions handle them
        warnings.simplefilter("ignore")
        if "hd95" in metrics:
            h = compute_hausdorff_distance(p1, g1, include_background=False, percentile=95, spacing=spacing)
            h = h[0].double().numpy()
            diag = math.sqrt(sum((n * s) ** 2 for n, s in zip(gt_np.shape, spacing, strict=True)))
            h[one_empty] = diag
            h[both_empty] = np.nan
            out["hd95"] = h.tolist()
        if "nsd" in metrics:
            tol = [float(nsd_tolerance_mm)] * (n_classes - 1)
            s = (
                compute_surface_dice(p1, g1, tol, include_background=False, spacing=spacing)[0]
                .double()
                .numpy()
            )
            s[one_empty] = 0.0
            s[both_empty] = np.nan
            out["nsd"] = s.tolist()
    return out


def nanmean(values: Sequence[float]) -> float:
    """Mean over the finite entries (NaN = class not scorable); NaN if there are none."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def mean_over_classes(per_class: Mapping[str, float | None], exclude: Collection[str] = ()) -> float:
    """The "mean"/"Avg" of one case or one seed: over label classes, NaN excluded. Merged regions
    (``eval.merged_classes``) are extra columns and never enter it (they would count twice)."""
    return nanmean([np.nan if v is None else v for c, v in per_class.items() if c not in exclude])


def btcv_paper_columns(per_class: Mapping[str, float]) -> dict[str, float]:
    """BTCV's 13 classes folded into the paper's 12 Table-1 columns: AG = mean of the two adrenal
    glands (NaN-aware), Avg = mean of the 12 columns."""
    names = [
        ("Spl", "spleen"),
        ("RKid", "right_kidney"),
        ("LKid", "left_kidney"),
        ("Gall", "gallbladder"),
        ("Eso", "esophagus"),
        ("Liv", "liver"),
        ("Sto", "stomach"),
        ("Aor", "aorta"),
        ("IVC", "ivc"),
        ("Vins", "portal_splenic_veins"),
        ("Pan", "pancreas"),
    ]
    norm = {_norm(k): v for k, v in per_class.items()}
    out: dict[str, float] = {}
    for col, key in names:
        out[col] = norm.get(_norm(key), _lookup_by_position(per_class, col))
    out["AG"] = nanmean([norm.get(_norm("right_adrenal")), norm.get(_norm("left_adrenal"))])  # None: absent
    out["Avg"] = nanmean(list(out.values()))
    return out


_ALIASES = {  # spelling -> canonical key (a canonical key maps to itself via _norm's fallback)
    "kidneyright": "rightkidney",
    "kidneyleft": "leftkidney",
    "inferiorvenacava": "ivc",
    "postcava": "ivc",
    "portalveinandsplenicvein": "portalsplenicveins",
    "portalandsplenicvein": "portalsplenicveins",
    "portalandsplenicveins": "portalsplenicveins",
    "portalvein": "portalsplenicveins",
    "rightadrenalgland": "rightadrenal",
    "adrenalglandright": "rightadrenal",
    "leftadrenalgland": "leftadrenal",
    "adrenalglandleft": "leftadrenal",
    "oesophagus": "esophagus",
}


def _norm(name: str) -> str:
    key = "".join(c for c in name.lower() if c.isalnum())
    return _ALIASES.get(key, key)


_BTCV_ORDER = ["Spl", "RKid", "LKid", "Gall", "Eso", "Liv", "Sto", "Aor", "IVC", "Vins", "Pan"]


def _lookup_by_position(per_class: Mapping[str, float], col: str) -> float:
    """Fallback when names differ: BTCV's label order (1 spleen ... 11 pancreas)."""
    vals = list(per_class.values())
    i = _BTCV_ORDER.index(col)
    return float(vals[i]) if i < len(vals) else float("nan")


def json_safe(obj):  # noqa: ANN001, ANN201 - any JSON-like tree
    """Replace NaN/inf floats by None (strict JSON has no NaN; readers map None back to NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return json_safe(obj.item())
    return obj

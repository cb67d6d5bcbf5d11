"""The 2D downstream tasks: what ``asa3d finetune`` does differently for radiographs.

The training loop, its checkpoints, resume, progress and TensorBoard scalars are
``asa3d.eval.finetune``'s; this module supplies its 2D pieces:

- data: ``Images2D`` serves a ``asa3d.data.labelled2d`` index's images (1, H, W) in [0, 1]
  (resized to ``image2d.size`` when set) with their label map or multi-hot findings;
- augmentation, batched on the training device and drawn from the run's seeded generator (exact
  resume): horizontal flip (``train.flip_prob``), rotation in U(-``train.rotation_deg``, +)
  (bilinear image, nearest label, zero fill) and an intensity shift (``train.shift_prob``,
  ``train.shift_offset``), then the input normalisation the pretraining used (``image2d``);
- the loss: Dice (or Dice + CE) on label maps, binary cross-entropy per finding;
- scoring: whole images (no sliding window): Dice per organ and image, or the predicted
  probability of each finding per image, from which ``auc_per_class`` computes the AUC per
  finding over the test images (scikit-learn's definition, ties counted half).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch.utils.data import Dataset

from asa3d.eval.config_sections import FinetuneConfig, FinetuneTrainConfig, Image2DConfig
from asa3d.eval.metrics import case_metrics, mean_over_classes, nanmean

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_GREY = ((0.449,), (0.226,))

Augment2D = tuple[bool, float, float | None]  # horizontal flip, rotation (degrees), intensity shift


class Images2D(Dataset):
    """``{"image": (1, H, W) float32, "label": (1, H, W) int64 | (K,) float32, "id"}`` per case."""

    def __init__(self, index: Any, size: int | None = None) -> None:
        self.cases, self.size = list(index.cases), size

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:
        case = self.cases[i]
        image = torch.from_numpy(np.ascontiguousarray(case.image(), dtype=np.float32))[None]
        target = torch.from_numpy(np.asarray(case.label()))
        seg = target.ndim == 2
        if self.size is not None and tuple(image.shape[1:]) != (self.size, self.size):
            image = F.interpolate(image[None], size=(self.size,) * 2, mode="area")[0]
            if seg:
                target = F.interpolate(target[None, None].float(), size=(self.size,) * 2, mode="nearest")[
                    0, 0
                ]
        label = target.long()[None] if seg else target.float()
        return {"image": image, "label": label, "id": case.id}


def normalise(x: torch.Tensor, cfg: Image2DConfig) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> the network's input: channels replicated, mean/std applied."""
    if cfg.channels == 3:
        x = x.expand(-1, 3, *x.shape[2:])
    if cfg.normalize == "imagenet":
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.channels == 3 else IMAGENET_GREY
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def draw_augment(n: int, cfg: FinetuneTrainConfig, gen: torch.Generator) -> list[Augment2D]:
    """The random choices for ``n`` images, four draws each from ``gen`` in sample order."""
    out: list[Augment2D] = []
    for _ in range(n):
        r = torch.rand(4, generator=gen)
        angle = (float(r[1]) * 2 - 1) * cfg.rotation_deg
        shift = (float(r[3]) * 2 - 1) * cfg.shift_offset if r[2] < cfg.shift_prob else None
        out.append((bool(r[0] < cfg.flip_prob), angle, shift))
    return out


def apply_augment(
    image: torch.Tensor, label: torch.Tensor, params: Sequence[Augment2D]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``draw_augment``'s choices to a (B, 1, H, W) batch and its label maps (B, 1, H, W)
    or finding vectors (B, K), which no geometric change alters."""
    seg = label.ndim == 4
    flips = torch.tensor([p[0] for p in params], device=image.device)
    image = torch.where(flips.view(-1, 1, 1, 1), image.flip(-1), image)
    if seg:
        label = torch.where(flips.view(-1, 1, 1, 1), label.flip(-1), label)
    angles = torch.tensor([math.radians(p[1]) for p in params], dtype=image.dtype, device=image.device)
    if bool((angles != 0).any()):
        cos, sin = angles.cos(), angles.sin()
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if seg:
            label = F.grid_sample(label.float(), grid, mode="nearest", align_corners=False).long()
    shift = torch.tensor([p[2] or 0.0 for p in params], dtype=image.dtype, device=image.device)
    return image + shift.view(-1, 1, 1, 1), label


def loss_function(cfg: FinetuneConfig) -> torch.nn.Module:
    if cfg.task == "classification":
        return torch.nn.BCEWithLogitsLoss()
    from monai.losses import DiceCELoss, DiceLoss

    if cfg.train.loss == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, include_background=True)
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)


@torch.no_grad()
def predict(
    net: torch.nn.Module, index: Any, cfg: FinetuneConfig, device: torch.device
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(ids, outputs, targets) per image: argmax label maps, or finding probabilities."""
    from asa3d.engine.precision import autocast

    loader = torch.utils.data.DataLoader(
        Images2D(index, cfg.image2d.size), batch_size=cfg.image2d.batch_size, shuffle=False
    )
    was_training = net.training
    net.eval()
    ids: list[str] = []
    outs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    try:
        for batch in loader:
            with autocast(cfg.train.precision, device):
                logits = net(normalise(batch["image"].to(device), cfg.image2d)).float()
            out = logits.sigmoid() if cfg.task == "classification" else logits.argmax(1)
            ids += list(batch["id"])
            outs += list(out.cpu().numpy())
            targets += list(
                batch["label"].numpy() if cfg.task == "classification" else batch["label"][:, 0].numpy()
            )
    finally:
        net.train(was_training)
    return ids, outs, targets


def score_images(
    net: torch.nn.Module, index: Any, cfg: FinetuneConfig, n_classes: int, device: torch.device
) -> list[dict[str, Any]]:
    """Per-image rows: ``{id, dice: {organ: value}}``, or ``{id, prob: {finding: p}, target:
    {finding: 0/1}}`` (an AUC needs every image: ``summarise_auc`` computes it from these)."""
    names = {int(k): str(v) for k, v in index.label_names.items()}
    ids, outs, targets = predict(net, index, cfg, device)
    rows = []
    for i, out, t in zip(ids, outs, targets, strict=True):
        if cfg.task == "classification":
            rows.append(
                {
                    "id": i,
                    "prob": {names[k]: float(p) for k, p in enumerate(out)},
                    "target": {names[k]: int(v) for k, v in enumerate(t)},
                }
            )
            continue
        m = case_metrics(out, t, n_classes, spacing=(1.0, 1.0), metrics=cfg.eval.metrics)
        rows.append(
            {
                "id": i,
                **{
                    k: {names.get(c, f"class{c}"): v for c, v in zip(range(1, n_classes), vals, strict=True)}
                    for k, vals in m.items()
                },
            }
        )
    return rows


def auc_per_class(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """ROC AUC of each column: (N, K) scores and 0/1 targets -> (K,), NaN where a column holds one
    class only. The Mann-Whitney form (mean ranks, ties counted half) equals
    ``sklearn.metrics.roc_auc_score``; vectorised over a leading batch axis too: (B, N, K) -> (B, K)."""
    p, t = np.asarray(probs, dtype=float), np.asarray(targets) > 0.5
    ranks = rankdata(p, axis=-2)
    n_pos = t.sum(axis=-2)
    n_neg = t.shape[-2] - n_pos
    rank_sum = np.where(t, ranks, 0.0).sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def rows_to_arrays(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(finding names, probabilities (N, K), targets (N, K)) of per-image rows."""
    names = list(rows[0]["prob"]) if rows else []
    probs = np.array([[r["prob"][n] for n in names] for r in rows], dtype=float).reshape(
        len(rows), len(names)
    )
    targets = np.array([[r["target"][n] for n in names] for r in rows], dtype=float).reshape(
        len(rows), len(names)
    )
    return names, probs, targets


def summarise_auc(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"auc": {"per_class": {finding: AUC}, "mean": mean over findings (NaN left out)}}``."""
    names, probs, targets = rows_to_arrays(rows)
    auc = auc_per_class(probs, targets) if rows else np.array([])
    per_class = {n: float(a) for n, a in zip(names, auc, strict=True)}
    return {"auc": {"per_class": per_class, "mean": mean_over_classes(per_class)}}


def validation_score(
    net: torch.nn.Module, index: Any, cfg: FinetuneConfig, n_classes: int, device: torch.device
) -> float:
    """Mean AUC or mean Dice over the validation images (model selection, never the test split)."""
    rows = score_images(net, index, cfg, n_classes, device)
    if cfg.task == "classification":
        return float(summarise_auc(rows)["auc"]["mean"])
    return nanmean([mean_over_classes(r["dice"]) for r in rows])

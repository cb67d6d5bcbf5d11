"""VoCo (Wu et al., CVPR 2024) with the supplement's settings; see docs/methods/voco.md.

One phase: each whole volume is cropped to its body box, resized to ``volume_size``, tiled into
n x n base crops, and ``num_random_crops`` random crops are drawn with their overlap-area labels;
every crop is resized to 64^3 and augmented independently; all crops of the batch go through the
backbone in one pass, then the multi-scale pooled features and the BatchNorm projector. Loss:
position prediction (ReLU'd cosines vs the labels) + lambda * base regularisation. The released
code's EMA teacher is ``voco_teacher: ema``. All maths lives in ``views.voco_crops``,
``models.heads_peers`` and ``methods.voco_losses``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.methods.base import SampleSpec, StepOutput, register_method
from asa3d.methods.student_teacher import StudentTeacherMethod
from asa3d.methods.voco_losses import base_regularization_loss, prediction_loss, symmetric_logits, voco_logits
from asa3d.models.backbone import SwinBackbone
from asa3d.models.backbones.swinunetr import trained_parts
from asa3d.models.ema import ema_update_, param_pairs
from asa3d.models.heads_peers import VoCoProjector, voco_feature_dim, voco_features
from asa3d.views.resize import resize_volumes
from asa3d.views.voco_crops import VoCoViews, augment_crops, voco_views

__all__ = ["VoCo", "VoCoConfig", "VoCoNetwork", "body_box_crop"]

log = logging.getLogger(__name__)


@dataclass
class VoCoConfig:
    """Keys under ``method:`` (with ``name: voco``); defaults follow the supplement's Table 2."""

    volume_size: tuple[int, int, int] = (384, 384, 64)
    foreground_threshold: float = 0.3
    resize_mode: Literal["area", "trilinear"] = "trilinear"
    grid: int = 4
    num_random_crops: int = 4
    crop_out_size: int = 64
    aug_flip_p: float = 0.2
    aug_rot_p: float = 0.2
    aug_shift_p: float = 0.1
    aug_shift_offset: float = 0.1
    voco_features: Literal["multi_scale", "last_stage"] = "multi_scale"
    proj_hidden_dim: int = 2048
    proj_dim: int = 2048
    sync_batchnorm: bool = True
    lambda_reg: float = 1.0
    voco_teacher: Literal["none", "ema"] = "none"
    teacher_momentum: float = 0.9
    teacher_init: Literal["copy", "random"] = "copy"
    # every this many iterations (on a step train.log_every also logs), the first volume's first
    # random crop: its position labels next to its logits (voco_labels/*, voco_logits/*); 0: never
    log_labels_every: int = 100
    # the tracking check: a warning when the mean label_error of the last track_window steps is not
    # below track_min_drop x that of the first track_window steps from iteration track_after (the
    # end of warm-up); track_window 0: off
    track_after: int = 100
    track_window: int = 50
    track_min_drop: float = 0.95
    track_patience: int = 3  # failed checks in a row before the warning

    def validate(self) -> None:
        x, y, _ = self.volume_size
        n = self.grid
        if n < 2 or x != y or x % n:
            raise ConfigError(
                f"method.volume_size={list(self.volume_size)} / grid={n}: need grid >= 2 and a square x-y "
                "plane divisible by the grid."
            )
        o = self.crop_out_size
        if o % 32 or o < 64:
            raise ConfigError(
                f"method.crop_out_size={o}: a multiple of 32 and at least 64 (encoder10's InstanceNorm)."
            )
        if self.num_random_crops < 1:
            raise ConfigError(f"method.num_random_crops={self.num_random_crops}: must be at least 1.")
        for key in ("aug_flip_p", "aug_rot_p", "aug_shift_p", "teacher_momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must lie in [0, 1].")
        if self.lambda_reg < 0:
            raise ConfigError(f"method.lambda_reg={self.lambda_reg}: must be >= 0.")
        if self.track_after < 0 or self.track_window < 0 or not 0.0 < self.track_min_drop <= 1.0:
            raise ConfigError(
                "method.track_after/track_window must be >= 0 and method.track_min_drop in (0, 1]."
            )
        if self.track_patience < 1:
            raise ConfigError(f"method.track_patience={self.track_patience}: must be at least 1.")


def body_box_crop(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """(C, X, Y, Z) cropped to the bounding box of voxels above ``threshold`` (MONAI
    CropForeground's rule); the whole volume when none is."""
    fg = (v > threshold).any(0)
    if not fg.any():
        return v
    idx = fg.nonzero()
    lo, hi = idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()
    return v[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]


class RankBatchNorm1d(nn.Module):
    """``BatchNorm1d(affine=False, track_running_stats=False)`` whose batch statistics span every
    rank (one differentiable all-reduce of [sum, sum of squares, count]); on one process it is
    ``F.batch_norm``. Our own because ``nn.SyncBatchNorm`` runs on GPUs only, and the published
    projector's BatchNorm must see all ranks' crops on CPU (gloo) runs too."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return nn.functional.batch_norm(x, None, None, training=True, eps=self.eps)
        from asa3d.methods.dist_context import all_reduce_sum_with_grad as all_reduce

        xf = x.float()
        n = xf.new_full((1, x.shape[1]), float(x.shape[0]))
        stats = all_reduce(torch.cat([xf.sum(0, keepdim=True), (xf * xf).sum(0, keepdim=True), n]))
        mean = stats[0] / stats[2]
        var = (stats[1] / stats[2] - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises
        return ((xf - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)


def _sync_batchnorms(module: nn.Module) -> None:
    """Replace every stateless BatchNorm1d of ``module`` by a ``RankBatchNorm1d`` (no state moves:
    these norms hold no parameters or buffers)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d) and not child.affine and not child.track_running_stats:
            setattr(module, name, RankBatchNorm1d(child.eps))
        else:
            _sync_batchnorms(child)


class VoCoNetwork(nn.Module):
    """Backbone + projector; ``embed`` maps (M, 1, o, o, o) crops to (M, proj_dim)."""

    def __init__(self, model_cfg: ModelConfig, cfg: VoCoConfig) -> None:
        super().__init__()
        self.features = cfg.voco_features
        self.backbone = SwinBackbone(model_cfg, out_channels=1)
        self.projector = VoCoProjector(
            voco_feature_dim(model_cfg.feature_size, cfg.voco_features), cfg.proj_hidden_dim, cfg.proj_dim
        )
        if cfg.sync_batchnorm:  # statistics over every rank's crops (identical on one process)
            _sync_batchnorms(self.projector)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.encode(x, 4)
        return self.projector(voco_features(self.backbone.net, x, hidden, self.features))


@register_method
class VoCo(StudentTeacherMethod):
    """Volume contrast: predict each random crop's overlap with the base crops. On the
    student-teacher base; with ``voco_teacher: none`` (the CVPR paper) there is no teacher and the
    base's EMA is skipped."""

    name = "voco"
    Config = VoCoConfig

    def __init__(self, cfg: VoCoConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        if model_cfg.in_channels != 1:
            raise ConfigError(f"model.in_channels={model_cfg.in_channels}: VoCo pretrains on 1-channel CT.")
        student = VoCoNetwork(model_cfg, cfg)
        if cfg.voco_teacher == "ema":
            self.init_teacher(student)
            if cfg.teacher_init == "random":
                # the code: an independent initialisation, updated (after the student's first
                # forward, before the teacher's) with the initial student; then once per optimiser
                # step in on_step_end, which is the same sequence of updates as the code's
                with torch.no_grad():
                    for t, r in zip(
                        self.teacher.parameters(), VoCoNetwork(model_cfg, cfg).parameters(), strict=True
                    ):
                        t.copy_(r)
                ema_update_(*param_pairs(self.teacher, self.student), cfg.teacher_momentum)
        else:
            self.student = student
        self._label_dump: tuple[torch.Tensor, torch.Tensor] | None = None
        # label_error after warm-up, to flag a run whose logits never track the labels
        self._last_error: float | None = None
        self._first_errors: list[float] = []
        self._recent_errors: deque[float] = deque(maxlen=max(1, cfg.track_window))
        self._failed_checks = 0
        self._tracking_warned = False

    @property
    def has_teacher(self) -> bool:
        return self.cfg.voco_teacher == "ema"

    def phases(self) -> list[str]:
        return ["voco"]

    def momentum(self, global_iter: int, total_iters: int) -> float:
        return float(self.cfg.teacher_momentum)  # the released code: constant, no schedule

    def on_step_end(self, phase: str, global_iter: int, total_iters: int) -> dict[str, float]:
        """Once per optimiser step: the teacher's EMA (``ema``; the student-teacher base), the
        label-vs-logit dump (users report runs whose logits never track the labels,
        docs/methods/voco.md, "Warning"; these curves show it per base crop) and the tracking check."""
        out: dict[str, float] = {}
        if self.has_teacher:
            out.update(super().on_step_end(phase, global_iter, total_iters))
        self._check_tracking(global_iter, total_iters)
        n = self.cfg.log_labels_every
        if not n or global_iter % n or self._label_dump is None:
            return out
        labels, logits = self._label_dump
        for j in range(labels.shape[0]):
            out[f"voco_labels/base{j}"] = float(labels[j])
            out[f"voco_logits/base{j}"] = float(logits[j])
        return out

    def _check_tracking(self, global_iter: int, total_iters: int) -> None:
        """Warn once when ``label_error`` (mean |logit - label|) has not fallen after warm-up: every
        ``track_window`` steps, the mean over the last window must lie below ``track_min_drop`` x the
        mean over the first window from iteration ``track_after``; ``track_patience`` failed checks
        in a row (a passing one resets the count) raise the warning, so a slow, noisy start is not
        flagged at once. Rank 0's values (a diagnostic; the loss itself is averaged over ranks)."""
        cfg, w = self.cfg, self.cfg.track_window
        if not w or self._tracking_warned or self._last_error is None or global_iter < cfg.track_after:
            return
        if len(self._first_errors) < w:
            self._first_errors.append(self._last_error)
            return
        self._recent_errors.append(self._last_error)
        if len(self._recent_errors) < w or (global_iter - cfg.track_after + 1) % w:
            return
        first = sum(self._first_errors) / w
        last = sum(self._recent_errors) / w
        if last < cfg.track_min_drop * first:
            self._failed_checks = 0
            return
        self._failed_checks += 1
        if self._failed_checks < cfg.track_patience:
            return
        self._tracking_warned = True
        if self.dist.rank == 0:
            log.warning(
                "VoCo iteration %d: label_error (mean |logit - label|) has not fallen after warm-up "
                "(%.4f over the %d steps from iteration %d, %.4f over the last %d; %d checks in a row): "
                "the logits are not tracking the position labels; see docs/methods/voco.md ('Warning'). %s",
                global_iter,
                first,
                w,
                cfg.track_after,
                last,
                w,
                self._failed_checks,
                "Check train.lr and the warm-up (train.warmup_steps)."
                if self.has_teacher
                else "Users report this without a momentum teacher: consider method.voco_teacher=ema.",
            )

    def sample_spec(self, phase: str) -> SampleSpec:
        return SampleSpec(mode="whole")

    def train(self, mode: bool = True) -> VoCo:
        if self.has_teacher:
            return super().train(mode)  # the base keeps the teacher in eval mode
        nn.Module.train(self, mode)
        return self

    def make_views(self, images: Sequence[torch.Tensor] | torch.Tensor) -> VoCoViews:
        cfg = self.cfg
        vols = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
        x = torch.cat(
            [
                resize_volumes([body_box_crop(v, cfg.foreground_threshold)], cfg.volume_size, cfg.resize_mode)
                for v in vols
            ]
        )
        v = voco_views(x, cfg.grid, cfg.num_random_crops, cfg.crop_out_size)
        b, k, sw = v.bases.shape[0], v.bases.shape[1], v.crops.shape[1]
        flat = torch.cat([v.bases.flatten(0, 1), v.crops.flatten(0, 1)])
        flat = augment_crops(flat, cfg.aug_flip_p, cfg.aug_rot_p, cfg.aug_shift_p, cfg.aug_shift_offset)
        v.bases = flat[: b * k].reshape(v.bases.shape)
        v.crops = flat[b * k :].reshape(b, sw, *flat.shape[1:])
        return v

    def training_step(self, batch: Mapping[str, Any], phase: str) -> StepOutput:
        v = self.make_views(batch["image"])
        dev = next(self.student.parameters()).device
        v.bases, v.crops, v.labels = v.bases.to(dev), v.crops.to(dev), v.labels.to(dev)
        return self.voco_step(v)

    def _embed(self, net: VoCoNetwork, v: VoCoViews) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over all crops of the batch (the BatchNorm sees bases and random crops together)."""
        b, k, sw = v.bases.shape[0], v.bases.shape[1], v.crops.shape[1]
        z = net.embed(torch.cat([v.bases.flatten(0, 1), v.crops.flatten(0, 1)]))
        return z[: b * k].reshape(b, k, -1), z[b * k :].reshape(b, sw, -1)

    def voco_step(self, v: VoCoViews) -> StepOutput:
        """Loss on fixed views (public so tests can feed their own crops)."""
        cfg = self.cfg
        s_bases, s_crops = self._embed(self.student, v)
        if self.has_teacher:
            # the teacher's EMA runs once per optimiser step (on_step_end), not here: with gradient
            # accumulation this forward runs once per micro-batch
            with torch.no_grad():
                t_bases, t_crops = self._embed(self.teacher, v)
            logits = symmetric_logits(s_crops, t_crops, s_bases, t_bases)
        else:
            logits = voco_logits(s_crops, s_bases)
        pos, neg = prediction_loss(logits, v.labels)
        reg = base_regularization_loss(s_bases)
        loss = pos + neg + cfg.lambda_reg * reg
        with torch.no_grad():
            b = torch.nn.functional.normalize(s_bases.float(), dim=-1)
            iu = torch.triu_indices(b.shape[1], b.shape[1], 1, device=b.device)
            base_cos = (b @ b.transpose(1, 2))[:, iu[0], iu[1]].mean()
            track = (
                (logits.detach() - v.labels).abs().mean()
            )  # |logit - label|: falls when logits track labels
            self._label_dump = (v.labels[0, 0].float().cpu(), logits.detach()[0, 0].float().cpu())
            self._last_error = float(track)
        terms = {"pos": pos, "neg": neg, "reg": reg, "base_cos": base_cos, "label_error": track}
        return StepOutput(loss=loss, terms=terms)

    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's SwinUNETR weights (the paper has no teacher; with ``ema`` the code also
        fine-tunes the student). Projector excluded."""
        return self.student.backbone.swinunetr_state_dict()

    def transfer_parts(self) -> dict[str, bool]:
        multi = self.cfg.voco_features == "multi_scale"
        return trained_parts(self.backbone_spec().parts, 4, encoders=multi)

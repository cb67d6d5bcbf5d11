"""Adam (Hosseinzadeh Taher, Gotway, Liang, "Towards Foundation Models Learned from Anatomy in
Medical Imaging via Self-Supervision", 2023), 2D as published and a 3D variant; docs/methods/adam.md.

MoCo-v2 on anatomy parts, coarse to fine. At granularity level n (a stage) the anatomy decomposer
(``views.decompose``) picks one of the 2^n parts of each image; two draws of the view pipeline
(``views.anatomy_views``) give the query and key views; the query encoder + 2-layer MLP projector
gives q, its momentum copy (the student-teacher base's EMA teacher) gives k; the loss is InfoNCE
against a queue of K keys gathered from every rank, with the purposive pruner dropping queue keys
whose cosine to q is >= gamma (levels n > 0; ``methods.adam_losses``).

Stages are rounds: ``train.epochs`` rounds split into ``len(levels)`` stages (``stage_epochs``);
the engine restarts the LR schedule and the optimiser at each stage start (``stage_starts``), the
weights, key encoder and queue carry on, and the level (and the momentum schedule) is derived from
the round alone, so a run resumed mid-stage continues exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.methods.adam_losses import pruned_infonce
from asa3d.methods.base import SampleSpec, StepOutput, register_method
from asa3d.methods.student_teacher import StudentTeacherMethod
from asa3d.models.backbones.resnet import resnet_spec
from asa3d.models.backbones.spec import BackboneSpec
from asa3d.models.ema import cosine_momentum, ema_update_, param_pairs
from asa3d.models.moco_projector import MoCoProjector
from asa3d.models.queue import KeyQueue
from asa3d.views.anatomy_views import anatomy_views
from asa3d.views.decompose import decompose, grid_shape
from asa3d.views.resize import resize_volumes

__all__ = ["Adam", "AdamConfig", "source_ids"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AdamConfig:
    """Keys under ``method:`` (``name: adam``); defaults are Adam-v1's (2D) as published."""

    spatial_dims: int = 2
    backbone: Literal["resnet", "swinunetr"] = "resnet"  # swinunetr: 3D only, the model: section
    resnet_depth: int = 50  # 10 | 18 | 34 | 50 (MONAI ResNet)
    resnet_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    # the 7x7 stem's stride. 2: the paper's ResNet-50 (torchvision's layout); MONAI's own default
    # is 1 (MedicalNet's), which keeps twice the resolution at four times the stem-onwards compute
    resnet_stem_stride: int = 2
    in_channels: int | None = None  # None: 3 in 2D (grey replicated, ImageNet-normalised), 1 in 3D
    normalize: Literal["imagenet", "none"] | None = None  # None: imagenet in 2D, none in 3D
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    queue_size: int = 65536  # K
    temperature: float = 0.2  # tau
    key_momentum: float = 0.999
    # constant (MoCo-v2, Adam); cosine: m rises from key_momentum to 1 over each stage (restarted)
    key_momentum_schedule: Literal["constant", "cosine"] = "constant"
    gamma: float | None = 0.8  # purposive pruner threshold on the raw cosine; None: no pruning
    prune_level0: bool = False  # paper: no pruning at n = 0 (plain MoCo-v2)
    levels: list[int] = field(default_factory=lambda: [0, 2, 4])  # one stage per level, in order
    stage_epochs: list[int] | None = None  # rounds per stage; None: train.epochs split equally
    split_axes: str | None = None  # None: "wh" in 2D, "xyz" in 3D (views.decompose)
    remainder: Literal["spread", "drop"] = "spread"  # drop: the reference code's integer division
    volume_size: int = 128  # 3D: whole volumes resized to this cube before decomposing (canonical frame)
    view_size: int = 224  # output side of each view (3D: 64)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    brightness: float = 0.4
    contrast: float = 0.4
    p_jitter: float = 0.8
    brightness_mode: Literal["scale", "shift"] | None = None  # None: scale in 2D (ColorJitter), shift in 3D
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    p_blur: float = 0.5
    rotation_deg: float = 30.0  # 3D variant: 15
    # keys of the anchor's own image/volume left out of its denominator (None: off in 2D, on in 3D)
    exclude_same_source: bool | None = None
    key_bn: Literal["shuffle", "batch"] = "shuffle"  # MoCo's shuffled BN across ranks (no-op on one)
    export_encoder: Literal["query", "key"] = "query"  # the paper exports encoder_q

    def validate(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"method.spatial_dims={self.spatial_dims}: 2 or 3.")
        if self.backbone == "swinunetr" and self.spatial_dims != 3:
            raise ConfigError(
                "method.backbone=swinunetr is 3D only; set method.spatial_dims=3 or backbone=resnet."
            )
        if self.resnet_stem_stride not in (1, 2):
            raise ConfigError(f"method.resnet_stem_stride={self.resnet_stem_stride}: 1 or 2.")
        if not self.levels or any(n < 0 for n in self.levels):
            raise ConfigError(f"method.levels={self.levels}: a non-empty list of levels >= 0.")
        if self.stage_epochs is not None and (
            len(self.stage_epochs) != len(self.levels) or min(self.stage_epochs) < 1
        ):
            raise ConfigError(
                f"method.stage_epochs={self.stage_epochs}: one positive count per level {self.levels}."
            )
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature}: must be > 0.")
        if not 0.0 <= self.key_momentum <= 1.0:
            raise ConfigError(f"method.key_momentum={self.key_momentum}: must lie in [0, 1].")
        if self.gamma is not None and not -1.0 <= self.gamma <= 1.0:
            raise ConfigError(f"method.gamma={self.gamma}: a cosine threshold in [-1, 1] (or null).")
        if self.queue_size < 1:
            raise ConfigError(f"method.queue_size={self.queue_size}: must be >= 1.")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"method.crop_scale={self.crop_scale}: need 0 < lo <= hi <= 1.")
        for n in self.levels:
            grid = grid_shape(n, self.spatial_dims, self.split_axes)
            if self.spatial_dims == 3 and max(grid) > self.volume_size:
                raise ConfigError(f"method.levels: level {n} splits a {self.volume_size}^3 cube into {grid}.")

    # resolved dimension-dependent defaults
    def resolved(self, key: str) -> Any:
        three = self.spatial_dims == 3
        auto = {
            "in_channels": 1 if three else 3,
            "normalize": "none" if three else "imagenet",
            "brightness_mode": "shift" if three else "scale",
            "exclude_same_source": three,
        }
        v = getattr(self, key)
        return auto[key] if v is None else v


def source_ids(ids: Any, n: int, device: torch.device) -> torch.Tensor:
    """A stable int64 per sample id (a hash of the string), for the same-source exclusion."""
    if ids is None:
        return torch.full((n,), -1, dtype=torch.long, device=device)
    out = [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big") >> 1 for i in ids]
    return torch.tensor(out, dtype=torch.long, device=device)


class _SwinEncoder(nn.Module):
    """SwinUNETR's ``swinViT`` to the global-average-pooled last stage (16F channels)."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__()
        from asa3d.models.backbones.swinunetr import SwinBackbone

        self.backbone = SwinBackbone(model_cfg, out_channels=1)
        self.out_dim = self.backbone.channels(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(x, 4)[4].flatten(2).mean(2)


class _QueryNet(nn.Module):
    """Encoder -> pooled feature -> projector; the key encoder is an exact copy (EMA)."""

    def __init__(self, encoder: nn.Module, feat_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = MoCoProjector(feat_dim, hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


@register_method
class Adam(StudentTeacherMethod):
    """MoCo-v2 on decomposed anatomy, stages n = levels[0] -> levels[1] -> ...; see the module docstring."""

    name = "adam"
    Config = AdamConfig

    def __init__(self, cfg: AdamConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        self.in_ch = int(cfg.resolved("in_channels"))
        if cfg.backbone == "resnet":
            self.spec: BackboneSpec | None = resnet_spec(
                cfg.resnet_depth,
                cfg.spatial_dims,
                self.in_ch,
                1,
                tuple(cfg.resnet_widths),
                conv1_t_stride=cfg.resnet_stem_stride,
            )
            net = self.spec.build()
            feat = int(net.fc.in_features)
            net.fc = nn.Identity()  # the head (fc.*) is never trained or transferred
            encoder: nn.Module = net
        else:
            if model_cfg.in_channels != 1 or self.in_ch != 1:
                raise ConfigError("method.backbone=swinunetr: 1-channel CT (model.in_channels=1).")
            self.spec = None
            encoder = _SwinEncoder(model_cfg)
            feat = encoder.out_dim
        self.init_teacher(_QueryNet(encoder, feat, cfg.proj_hidden_dim, cfg.proj_dim))
        self.queue = KeyQueue(cfg.queue_size, cfg.proj_dim)
        self.stage = 0
        self._stage_bounds: list[tuple[int, int]] = [(0, 1)]
        self._iters_per_round = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def train(self, mode: bool = True) -> Adam:
        # MoCo's key encoder runs in training mode: its BatchNorm uses batch statistics and keeps
        # its own running statistics (never averaged); it has no dropout or drop-path.
        nn.Module.train(self, mode)
        return self

    # ---- stages ---------------------------------------------------------------------------------
    def _stage_lengths(self, total_rounds: int) -> list[int]:
        cfg = self.cfg
        if cfg.stage_epochs is not None:
            lengths = list(cfg.stage_epochs)
            if sum(lengths) != total_rounds:
                raise ConfigError(
                    f"method.stage_epochs={lengths} sums to {sum(lengths)} rounds but train.epochs="
                    f"{total_rounds}; set train.epochs={sum(lengths)}."
                )
            return lengths
        k = len(cfg.levels)
        if total_rounds % k:
            raise ConfigError(
                f"train.epochs={total_rounds} does not split into {k} equal stages (levels {cfg.levels}); "
                f"set train.epochs to a multiple of {k} or list method.stage_epochs."
            )
        return [total_rounds // k] * k

    def stage_starts(self, total_rounds: int) -> tuple[int, ...]:
        lengths = self._stage_lengths(total_rounds)
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        self._stage_bounds = [(s, n) for s, n in zip(starts, lengths, strict=True)]
        return tuple(starts)

    def stage_of(self, round_index: int) -> int:
        return max(i for i, (s, _) in enumerate(self._stage_bounds) if s <= round_index)

    def on_round_start(self, round_index: int, total_rounds: int) -> None:
        if sum(n for _, n in self._stage_bounds) != total_rounds:
            self.stage_starts(total_rounds)
        self.stage = self.stage_of(round_index)
        self._pending.clear()

    @property
    def level(self) -> int:
        return int(self.cfg.levels[self.stage])

    def gamma_now(self) -> float | None:
        if self.level == 0 and not self.cfg.prune_level0:
            return None
        return self.cfg.gamma

    # ---- contract --------------------------------------------------------------------------------
    def phases(self) -> list[str]:
        return ["adam"]

    def sample_spec(self, phase: str) -> SampleSpec:
        return SampleSpec(mode="whole", spatial_dims=self.cfg.spatial_dims)  # decomposed on the device

    def backbone_spec(self) -> BackboneSpec:
        return self.spec if self.spec is not None else super().backbone_spec()

    def buffer_policy(self) -> dict[str, str]:
        return {"queue.": "gathered"}

    def _net(self) -> _QueryNet:
        return self.student if self.cfg.export_encoder == "query" else self.teacher

    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        enc = self._net().encoder
        if self.spec is not None:
            return dict(enc.state_dict())
        return enc.backbone.swinunetr_state_dict()

    def transfer_parts(self) -> dict[str, bool]:
        if self.spec is not None:
            return {p: True for p in self.backbone_spec().parts}
        from asa3d.models.backbones.swinunetr import trained_parts

        return trained_parts(self.backbone_spec().parts, 4)  # swinViT to its last stage, pooled

    # ---- views ---------------------------------------------------------------------------------
    def _inputs(self, images: Any) -> Any:
        """The images the decomposer splits: 2D as given (a stacked batch or a list), 3D resized
        to the canonical cube."""
        dev = next(self.parameters()).device
        if self.cfg.spatial_dims == 3:
            vols = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
            return resize_volumes([v.to(dev) for v in vols], self.cfg.volume_size)
        if isinstance(images, torch.Tensor):
            return images.to(dev).float()
        return [v.to(dev).float() for v in images]

    def _normalise(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[1] == 1 and self.in_ch == 3:
            v = v.expand(-1, 3, *v.shape[2:])
        if self.cfg.resolved("normalize") == "imagenet":
            shape = (1, -1) + (1,) * (v.ndim - 2)
            if self.in_ch == 3:
                mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            else:  # one channel: ImageNet's grey mean and std
                mean, std = torch.tensor([0.449]), torch.tensor([0.226])
            v = (v - mean.to(v).view(shape)) / std.to(v).view(shape)
        return v

    def make_views(self, images: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(query views, key views, decomposition) of a batch at the current level."""
        cfg = self.cfg
        x = self._inputs(images)
        first = x[0] if isinstance(x, list) else x[0]
        shape = (len(x), first.shape[0], *first.shape[1:])
        if isinstance(x, list) and len({tuple(v.shape) for v in x}) > 1:
            raise ValueError(
                "Adam: images of one batch differ in size; resize them to one size when preparing the data"
            )
        dec = decompose(shape, self.level, cfg.split_axes, cfg.remainder)
        kw = dict(
            size=cfg.view_size,
            scale=tuple(cfg.crop_scale),
            ratio=tuple(cfg.crop_ratio),
            brightness=cfg.brightness,
            contrast=cfg.contrast,
            p_jitter=cfg.p_jitter,
            brightness_mode=cfg.resolved("brightness_mode"),
            blur_sigma=tuple(cfg.blur_sigma),
            p_blur=cfg.p_blur,
            rotation_deg=cfg.rotation_deg,
        )
        vq = anatomy_views(x, dec.boxes, **kw)
        vk = anatomy_views(x, dec.boxes, **kw)
        return self._normalise(vq), self._normalise(vk), dec

    # ---- keys ----------------------------------------------------------------------------------
    @torch.no_grad()
    def keys(self, vk: torch.Tensor) -> torch.Tensor:
        """Key projections; with ``key_bn: shuffle`` under several ranks the key batch is shuffled
        across ranks first so BatchNorm statistics cannot leak the positive (MoCo)."""
        dist = self.dist
        if self.cfg.key_bn != "shuffle" or not dist.distributed:
            return self.teacher(vk)
        allv = dist.all_gather(vk)
        n = vk.shape[0]
        perm = dist.all_gather(torch.randperm(allv.shape[0], device=vk.device))[: allv.shape[0]]  # rank 0's
        mine = perm[dist.rank * n : (dist.rank + 1) * n]
        k_all = dist.all_gather(self.teacher(allv[mine]))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return k_all[inv][dist.rank * n : (dist.rank + 1) * n]

    def training_step(self, batch: Mapping[str, Any], phase: str) -> StepOutput:
        vq, vk, _ = self.make_views(batch["image"])
        q = self.student(vq)
        k = self.keys(vk)
        dev = q.device
        ids = source_ids(batch.get("id"), q.shape[0], dev)
        exclude = bool(self.cfg.resolved("exclude_same_source"))
        res = pruned_infonce(
            q,
            k,
            self.queue.keys,
            self.cfg.temperature,
            self.gamma_now(),
            query_ids=ids if exclude else None,
            key_ids=self.queue.ids if exclude else None,
        )
        self._pending.append((F.normalize(k.float(), dim=1), ids))
        return StepOutput(res.loss, {"infonce": res.loss, "pruned_fraction": res.pruned_fraction})

    def momentum(self, global_iter: int, total_iters: int) -> float:
        m0 = float(self.cfg.key_momentum)
        if self.cfg.key_momentum_schedule == "constant":
            return m0
        start, n = self._stage_bounds[self.stage]
        per_round = total_iters // max(1, sum(b for _, b in self._stage_bounds))
        return cosine_momentum(global_iter - start * per_round, n * per_round, m0)

    @torch.no_grad()
    def on_step_end(self, phase: str, global_iter: int, total_iters: int) -> dict[str, Any]:
        m = self.momentum(global_iter, total_iters)
        t, s = param_pairs(self.teacher, self.student)
        ema_update_(t, s, m)
        for k, ids in self._pending:  # this step's keys, from every rank, become negatives
            self.queue.enqueue(k, ids, gather=self.dist.all_gather)
        self._pending.clear()
        return {"key_momentum": m, "level": float(self.level), "stage": float(self.stage)}

    # ---- monitors and pictures -------------------------------------------------------------------
    def monitor_embeddings(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        # eval mode: BatchNorm running statistics must not move for a picture of health
        was = self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                vq, vk, _ = self.make_views(batch["image"])
                return {"student": self.student(vq).float(), "teacher": self.teacher(vk).float()}
        finally:
            self.train(was)

    def image_summaries(self, batch: Mapping[str, Any], phase: str) -> dict[str, torch.Tensor]:
        vq, vk, _ = self.make_views(batch["image"])

        def pic(v: torch.Tensor) -> torch.Tensor:
            p = v[0, 0] if v.ndim == 4 else v[0, 0, :, :, v.shape[-1] // 2]
            p = p.float()
            return (p - p.min()) / (p.max() - p.min()).clamp(min=1e-6)

        return {"query": pic(vq), "key": pic(vk)}

"""Swin UNETR self-supervised pretraining (Tang et al., CVPR 2022) as its released code trains it;
see docs/methods/swinssl.md.

One phase: from each whole volume, ``crops_per_volume`` random crops (padded when the volume is
smaller); each crop gives two views (independent quarter turns, then cut-outs); ``swinViT`` alone
runs on both, and three heads on its last stage give the rotation, contrastive and inpainting
losses. All maths lives in ``views.rotation``, ``views.cutout``, ``models.heads_peers`` and
``methods.swinssl_losses``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.methods.base import PretrainMethod, SampleSpec, StepOutput, register_method
from asa3d.methods.swinssl_losses import inpainting_loss, nt_xent, rotation_loss
from asa3d.models.backbone import SwinBackbone
from asa3d.models.backbones.swinunetr import trained_parts
from asa3d.models.heads_peers import SwinSSLHeads
from asa3d.views.cutout import cutout
from asa3d.views.rotation import random_rotations

__all__ = ["SwinSSL", "SwinSSLConfig", "foreground_boxes", "random_crops"]


@dataclass
class SwinSSLConfig:
    """Keys under ``method:`` (with ``name: swinssl``); defaults follow the released code."""

    crop_size: int = 96
    crops_per_volume: int = 2
    # code: SpatialPad(S) then MONAI's CropForeground(k_divisible=S, allow_smaller=True) on
    # intensity > 0 before the random crops, so crops fall on the body; false: anywhere in the volume
    crop_foreground: bool = True
    rotation_plane: Literal["sagittal", "axial"] = "sagittal"
    cutout: bool = True
    cutout_max_fraction: float = 0.3
    cutout_min_side: float = 0.05
    cutout_max_side: float = 0.25
    cutout_partner: bool = True
    cutout_partner_source: Literal["clean", "in_place"] = "clean"
    inpainting_region: Literal["all", "cutout"] = "all"
    ssl_heads: Literal["code", "pooled_mlp"] = "code"
    contrastive_dim: int = 512
    temperature: float = 0.5
    contrastive_negatives: Literal["global", "local"] = "global"
    lambda_rot: float = 1.0
    lambda_con: float = 1.0
    lambda_rec: float = 1.0

    def validate(self) -> None:
        s = self.crop_size
        if s % 32 or s < 64:
            raise ConfigError(
                f"method.crop_size={s}: a multiple of 32 and at least 64 (the heads read tokens 0 and 1 "
                "of the last stage, and the inpainting head's InstanceNorm needs 2 voxels there)."
            )
        if self.crops_per_volume < 1:
            raise ConfigError(f"method.crops_per_volume={self.crops_per_volume}: must be at least 1.")
        if not 0.0 <= self.cutout_max_fraction <= 1.0:
            raise ConfigError(f"method.cutout_max_fraction={self.cutout_max_fraction}: must lie in [0, 1].")
        if not 0.0 < self.cutout_min_side < self.cutout_max_side <= 1.0:
            raise ConfigError("method.cutout_min_side/cutout_max_side: need 0 < min < max <= 1.")
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature}: must be > 0.")
        if self.inpainting_region == "cutout" and not self.cutout:
            raise ConfigError("method.inpainting_region=cutout needs method.cutout=true.")
        for key in ("lambda_rot", "lambda_con", "lambda_rec"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: loss weights must be >= 0.")


def random_crops(volumes: Sequence[torch.Tensor], size: int, per_volume: int) -> torch.Tensor:
    """``per_volume`` uniform random size^3 crops of each (C, X, Y, Z) volume, zero-padded (end
    of each axis) where it is smaller (MONAI SpatialPad + RandSpatialCropSamples), stacked volume-major."""
    out = []
    for v in volumes:
        pad = [max(0, size - int(s)) for s in v.shape[1:]]
        if any(pad):
            v = F.pad(v, (0, pad[2], 0, pad[1], 0, pad[0]))
        for _ in range(per_volume):
            o = [int(torch.randint(0, int(s) - size + 1, ())) for s in v.shape[1:]]
            out.append(v[:, o[0] : o[0] + size, o[1] : o[1] + size, o[2] : o[2] + size])
    return torch.stack(out)


def foreground_boxes(volumes: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    """The released code's body crop, with MONAI's own transforms: SpatialPad(size^3), then
    CropForeground on intensity > 0 with the box grown to a multiple of ``size`` (allow_smaller
    passed explicitly: its default changed in MONAI 1.5)."""
    from monai.transforms import CropForeground, SpatialPad

    pad = SpatialPad((size, size, size))
    crop = CropForeground(select_fn=lambda x: x > 0, k_divisible=size, allow_smaller=True)
    out = []
    for v in volumes:
        t = crop(pad(v))
        out.append(t.as_tensor() if hasattr(t, "as_tensor") else t)
    return out


@register_method
class SwinSSL(PretrainMethod):
    """Rotation + contrastive + inpainting on ``swinViT`` only."""

    name = "swinssl"
    Config = SwinSSLConfig

    def __init__(self, cfg: SwinSSLConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        if model_cfg.in_channels != 1:
            raise ConfigError(
                f"model.in_channels={model_cfg.in_channels}: Swin SSL pretrains on 1-channel CT."
            )
        self.backbone = SwinBackbone(model_cfg, out_channels=1)
        self.heads = SwinSSLHeads(self.backbone.channels(4), cfg.contrastive_dim, cfg.ssl_heads)

    def phases(self) -> list[str]:
        return ["ssl"]

    def sample_spec(self, phase: str) -> SampleSpec:
        return SampleSpec(mode="whole")

    def training_step(self, batch: Mapping[str, Any], phase: str) -> StepOutput:
        images = batch["image"]
        vols = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
        if self.cfg.crop_foreground:
            vols = foreground_boxes(vols, self.cfg.crop_size)
        x = random_crops(vols, self.cfg.crop_size, self.cfg.crops_per_volume)
        return self.ssl_step(x.to(next(self.parameters()).device))

    def make_views(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Two rotated, cut-out views of each crop of (n, 1, S, S, S); targets are the rotated crops."""
        cfg = self.cfg
        r1, k1 = random_rotations(x, cfg.rotation_plane)
        r2, k2 = random_rotations(x, cfg.rotation_plane)
        target = torch.cat([r1, r2])
        labels = torch.cat([k1, k2])
        if not cfg.cutout:
            return {
                "input": target,
                "target": target,
                "labels": labels,
                "mask": torch.zeros_like(target[:, 0], dtype=torch.bool),
            }
        cuts = [
            cutout(
                r,
                cfg.cutout_max_fraction,
                cfg.cutout_min_side,
                cfg.cutout_max_side,
                partner=cfg.cutout_partner,
                partner_source=cfg.cutout_partner_source,
            )
            for r in (r1, r2)
        ]
        return {
            "input": torch.cat([c.x for c in cuts]),
            "target": target,
            "labels": labels,
            "mask": torch.cat([c.mask for c in cuts]),
        }

    def ssl_step(self, x: torch.Tensor) -> StepOutput:
        """Loss on a batch of crops (n, 1, S, S, S) (public so tests can feed fixed crops)."""
        cfg = self.cfg
        n = x.shape[0]
        v = self.make_views(x)
        rot, con, rec = self.heads(self.backbone.encode(v["input"], 4)[4])
        terms = {
            "rot": rotation_loss(rot, v["labels"]),
            "rec": inpainting_loss(rec, v["target"], v["mask"], cfg.inpainting_region),
        }
        z1, z2 = con[:n], con[n:]
        if cfg.contrastive_negatives == "global" and self.dist.distributed:
            # every rank's embeddings as negatives (rank-major), gathered with their gradient: the
            # other ranks' anchors pull on this rank's embeddings, as in one process over the global batch
            a1, a2 = self.dist.all_gather_with_grad(z1), self.dist.all_gather_with_grad(z2)
            terms["con"] = nt_xent(z1, z2, cfg.temperature, a1, a2, self.dist.rank * n)
        else:
            terms["con"] = nt_xent(z1, z2, cfg.temperature)
        loss = cfg.lambda_rot * terms["rot"] + cfg.lambda_con * terms["con"] + cfg.lambda_rec * terms["rec"]
        return StepOutput(loss=loss, terms=terms)

    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        """The SwinUNETR weights; only ``swinViT`` is trained (the rest is its random init)."""
        return self.backbone.swinunetr_state_dict()

    def transfer_parts(self) -> dict[str, bool]:
        return trained_parts(self.backbone_spec().parts, 4)

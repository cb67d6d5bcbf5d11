"""SimMIM-3D (Xie et al., CVPR 2022) as the ASA paper's baseline; see docs/methods/simmim.md.

One phase: whole volumes resized to S^3 (optionally a random resized crop and a flip first), 16^3
cells masked at 50 %, the masked voxels filled in the input, a learnable mask token in place of
the masked tokens after the patch embedding, the reconstruction by the SwinUNETR decoder (or
SimMIM's light head), and an L1 on the masked voxels. All maths lives in the pure functions of
``views.masking``, ``models.masked_swin`` and ``methods.simmim_losses``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.engine.param_groups import ParamGroup, decay_groups
from asa3d.methods.base import PretrainMethod, SampleSpec, StepOutput, register_method
from asa3d.methods.simmim_losses import masked_l1, visible_l1
from asa3d.models.backbone import SwinBackbone
from asa3d.models.backbones.swinunetr import trained_parts
from asa3d.models.heads_peers import SimMIMLightHead
from asa3d.models.masked_swin import MaskToken, masked_encode, masked_forward
from asa3d.views.masking import MaskedView, simmim_view
from asa3d.views.resize import resize_volumes
from asa3d.views.resized_crop import random_resized_crops

__all__ = ["SimMIM", "SimMIMConfig"]


@dataclass
class SimMIMConfig:
    """Keys under ``method:`` (with ``name: simmim``); defaults follow the ASA supplement."""

    input_size: int = 128
    resize_mode: Literal["area", "trilinear"] = "area"
    mask_cell_size: int = 16
    mask_ratio: float = 0.5
    mask_fill: Literal["zero", "mean"] = "zero"
    head: Literal["decoder", "light"] = "decoder"
    augment: Literal["resized_crop_flip", "none"] = "resized_crop_flip"
    crop_scale: tuple[float, float] = (0.67, 1.0)
    # asa: one parameter group, train.weight_decay on everything (the ASA recipe has wd 0);
    # simmim: no weight decay on 1-D parameters (norms, biases) or the mask token, as the official
    # code. The optimiser and schedule of that recipe are train keys: configs/pretrain/simmim_official.yaml.
    optim_recipe: Literal["asa", "simmim"] = "asa"

    def validate(self) -> None:
        s, c = self.input_size, self.mask_cell_size
        if s % 32 or s < 64:
            raise ConfigError(
                f"method.input_size={s}: SwinUNETR needs a multiple of 32, and its decoder at least 64."
            )
        if c < 2 or s % c:
            raise ConfigError(f"method.mask_cell_size={c} must divide method.input_size={s}.")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio}: must lie in (0, 1).")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"method.crop_scale={self.crop_scale}: need 0 < lo <= hi <= 1.")


@register_method
class SimMIM(PretrainMethod):
    """Masked image modelling on the SwinUNETR, the mask kept out of the ``encoder1`` skip."""

    name = "simmim"
    Config = SimMIMConfig

    def __init__(self, cfg: SimMIMConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        if model_cfg.in_channels != 1:
            raise ConfigError(f"model.in_channels={model_cfg.in_channels}: SimMIM pretrains on 1-channel CT.")
        if cfg.mask_cell_size % model_cfg.patch_size:
            raise ConfigError(
                f"method.mask_cell_size={cfg.mask_cell_size} must be a multiple of model.patch_size="
                f"{model_cfg.patch_size} (a cell covers whole tokens)."
            )
        self.backbone = SwinBackbone(model_cfg, out_channels=1)
        self.mask_token = MaskToken(self.backbone.channels(0))
        if cfg.head == "light":
            self.light_head = SimMIMLightHead(self.backbone.channels(4), scale=model_cfg.patch_size * 16)

    def phases(self) -> list[str]:
        return ["mim"]

    def param_groups(self, weight_decay: float) -> list[ParamGroup]:
        if self.cfg.optim_recipe == "asa":
            return [ParamGroup("all", list(self.trainable_parameters()), weight_decay, 1.0)]
        token = self.mask_token.token
        rest = [p for p in self.trainable_parameters() if p is not token]
        groups = decay_groups(self, weight_decay, only=rest)
        no_decay = next((g for g in groups if g.name == "no_decay"), None)
        if no_decay is None:
            groups.append(ParamGroup("no_decay", [token], 0.0, 1.0))
        else:
            no_decay.params.append(token)
        return groups

    def sample_spec(self, phase: str) -> SampleSpec:
        return SampleSpec(mode="whole")

    def make_views(self, images: Any) -> tuple[torch.Tensor, MaskedView]:
        cfg = self.cfg
        if cfg.augment == "resized_crop_flip" and self.training:
            vols = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0))
            x = random_resized_crops(vols, cfg.input_size, tuple(cfg.crop_scale), mode=cfg.resize_mode)
        else:
            x = resize_volumes(images, cfg.input_size, cfg.resize_mode)
        x = x.to(self.mask_token.token.device)
        view = simmim_view(x, cfg.mask_cell_size, cfg.mask_ratio, self.model_cfg.patch_size, cfg.mask_fill)
        return x, view

    def reconstruct(self, view: MaskedView) -> torch.Tensor:
        if self.cfg.head == "decoder":
            return masked_forward(self.backbone, view.x_masked, view.token_mask, self.mask_token)[0]
        hidden = masked_encode(self.backbone, view.x_masked, view.token_mask, self.mask_token)
        return self.light_head(hidden[4])

    def training_step(self, batch: Mapping[str, Any], phase: str) -> StepOutput:
        x, view = self.make_views(batch["image"])
        return self.masked_step(x, view)

    def masked_step(self, x: torch.Tensor, view: MaskedView) -> StepOutput:
        """Loss on a fixed view (public so tests and benchmarks can feed their own masks)."""
        recon = self.reconstruct(view)
        loss = masked_l1(recon, x, view.voxel_mask)
        terms = {
            "masked_l1": loss,
            "visible_l1": visible_l1(recon.detach(), x, view.voxel_mask),
            "mask_fraction": view.voxel_mask.float().mean().detach(),
        }
        return StepOutput(loss=loss, terms=terms)

    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        """The SwinUNETR weights (with the 1-channel ``out`` conv); mask token and light head excluded."""
        return self.backbone.swinunetr_state_dict()

    def transfer_parts(self) -> dict[str, bool]:
        full = self.cfg.head == "decoder"
        return trained_parts(self.backbone_spec().parts, 4, encoders=full, decoder=full)

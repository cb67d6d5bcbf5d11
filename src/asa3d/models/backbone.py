"""MONAI SwinUNETR with an encoder-only forward that stops at a chosen stage.

``SwinBackbone`` keeps the MONAI network as ``self.net`` so its ``state_dict`` keys are exactly
``net.<SwinUNETR keys>`` and ``swinunetr_state_dict()`` loads into a plain MONAI SwinUNETR.

Stage k (0..4) of ``swinViT`` has ``feature_size * 2**k`` channels on a grid of
``S / (patch_size * 2**k)`` per axis. Methods whose heads read one stage (ASA reads stage 3, one
token per 16^3 sub-volume) call ``encode(x, stage)``: it runs ``patch_embed`` and ``layers1`` ..
``layers<stage>`` only, so neither ``layers4`` nor the UNETR conv blocks/decoder are computed
(they dominate the cost at feature_size 48) and no gradient can reach them.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from asa3d.config_sections import ModelConfig

__all__ = [
    "SwinBackbone",
    "build_student_teacher",
    "decode_swinunetr",
    "encoder_parameter_names",
    "monai_swinunetr_kwargs",
    "stage_for_subvolume",
    "tap_channels",
]


# SwinUNETR arguments that change only speed (never weights, outputs beyond float rounding, or
# gradients); a MONAI that lacks them still builds the same network.
SPEED_ONLY_KWARGS = ("use_flash_attention",)


def stage_for_subvolume(p: int, patch_size: int = 2) -> int:
    """Stage whose tokens cover ``p``^3 voxels each: p = patch_size * 2**k (p=16 -> k=3)."""
    if p < patch_size or p % patch_size:
        raise ValueError(f"sub-volume size {p} must be a multiple of the patch size {patch_size}")
    ratio = p // patch_size
    k = int(round(math.log2(ratio)))
    if 2**k != ratio or not 0 <= k <= 4:
        raise ValueError(
            f"sub-volume size {p} must be patch_size * 2**k with k in 0..4 "
            f"(patch_size {patch_size}: {[patch_size * 2**j for j in range(5)]})"
        )
    return k


def tap_channels(feature_size: int, stage: int) -> int:
    """Channels of the stage-``stage`` hidden state (C_k = F * 2**k)."""
    if not 0 <= stage <= 4:
        raise ValueError(f"stage must be in 0..4, got {stage}")
    return feature_size * 2**stage


def monai_swinunetr_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Adapt keyword names to the installed MONAI (``drop_path_rate`` is ``dropout_path_rate``
    in MONAI 1.x), and refuse anything it does not know, naming the key."""
    params = inspect.signature(SwinUNETR.__init__).parameters
    out = dict(kwargs)
    if "drop_path_rate" in out and "drop_path_rate" not in params:
        out["dropout_path_rate"] = out.pop("drop_path_rate")
    for key in SPEED_ONLY_KWARGS:  # change no weight and no gradient: safe to drop where unknown
        if key in out and key not in params:
            out.pop(key)
    unknown = sorted(k for k in out if k not in params)
    if unknown:
        raise TypeError(
            f"SwinUNETR does not accept {unknown}; valid: {sorted(p for p in params if p != 'self')}"
        )
    return out


def encoder_parameter_names(stage: int, use_v2: bool = False) -> tuple[str, ...]:
    """Prefixes (relative to ``SwinUNETR``) of the modules ``encode(x, stage)`` runs."""
    names = ["swinViT.patch_embed."]
    for k in range(1, stage + 1):
        if use_v2:
            names.append(f"swinViT.layers{k}c.")
        names.append(f"swinViT.layers{k}.")
    return tuple(names)


def decode_swinunetr(net: SwinUNETR, x: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
    """The UNETR conv blocks and decoder of ``SwinUNETR.forward`` on given hidden states h_0..h_4
    (MONAI's forward does not take precomputed hidden states, hence this copy of its wiring)."""
    enc0 = net.encoder1(x)
    enc1 = net.encoder2(hidden[0])
    enc2 = net.encoder3(hidden[1])
    enc3 = net.encoder4(hidden[2])
    dec4 = net.encoder10(hidden[4])
    dec3 = net.decoder5(dec4, hidden[3])
    dec2 = net.decoder4(dec3, enc3)
    dec1 = net.decoder3(dec2, enc2)
    dec0 = net.decoder2(dec1, enc1)
    return net.out(net.decoder1(dec0, enc0))


class SwinBackbone(nn.Module):
    """A MONAI ``SwinUNETR`` (``self.net``) with stage-limited and full forwards."""

    def __init__(self, model_cfg: ModelConfig, out_channels: int = 1, **overrides: Any) -> None:
        super().__init__()
        kwargs = model_cfg.swinunetr_kwargs(out_channels)
        kwargs.update(overrides)
        self.kwargs = monai_swinunetr_kwargs(kwargs)
        self.net = SwinUNETR(**self.kwargs)
        self.feature_size = int(model_cfg.feature_size)
        self.patch_size = int(model_cfg.patch_size)
        self.use_v2 = bool(model_cfg.use_v2)

    def channels(self, stage: int) -> int:
        return tap_channels(self.feature_size, stage)

    def encode(self, x: torch.Tensor, stage: int = 4) -> list[torch.Tensor]:
        """Hidden states h_0..h_stage, each (B, C_k, ...), normalised as MONAI does
        (parameter-free LayerNorm over channels when ``normalize``)."""
        if not 0 <= stage <= 4:
            raise ValueError(f"stage must be in 0..4, got {stage}")
        unit = self.patch_size * 2**stage
        if any(s % unit for s in x.shape[2:]):
            raise ValueError(
                f"input spatial shape {tuple(x.shape[2:])} must be divisible by {unit} for stage {stage}"
            )
        vit = self.net.swinViT
        normalize = self.net.normalize
        h = vit.pos_drop(vit.patch_embed(x))
        outs = [vit.proj_out(h, normalize)]
        for k in range(1, stage + 1):
            if vit.use_v2:
                h = getattr(vit, f"layers{k}c")[0](h.contiguous())
            h = getattr(vit, f"layers{k}")[0](h.contiguous())
            outs.append(vit.proj_out(h, normalize))
        return outs

    def decode(self, x: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        return decode_swinunetr(self.net, x, hidden)

    def forward_full(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(net(x), [h_0..h_4])`` in one pass (the hidden states are reused, not recomputed)."""
        self.net._check_input_size(x.shape[2:])
        hidden = self.encode(x, 4)
        return self.decode(x, hidden), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_full(x)[0]

    def swinunetr_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights keyed exactly as a plain MONAI ``SwinUNETR``."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}


def build_student_teacher(model_cfg: ModelConfig, out_channels: int = 1) -> tuple[SwinBackbone, SwinBackbone]:
    """A student backbone and its EMA teacher (an exact frozen copy in eval mode)."""
    from asa3d.models.ema import make_teacher

    student = SwinBackbone(model_cfg, out_channels)
    return student, make_teacher(student)

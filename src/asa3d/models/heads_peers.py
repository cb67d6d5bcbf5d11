"""Heads of the peer methods (SimMIM, Swin UNETR SSL, VoCo), sized from the backbone.

Every size follows from the feature size F: the last Swin stage h4 has 16F channels (768 at F=48).
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.nets import SwinUNETR
from monai.networks.utils import pixelshuffle
from torch import nn

__all__ = ["SimMIMLightHead", "SwinSSLHeads", "VoCoProjector", "voco_feature_dim", "voco_features"]


class SimMIMLightHead(nn.Module):
    """SimMIM's official light decoder in 3D: a 1x1x1 conv from the last stage (16F channels at
    S/32) to out * 32^3 channels, then a 3D pixel shuffle x32 (MONAI's ``pixelshuffle``)."""

    def __init__(self, in_dim: int, scale: int = 32, out_channels: int = 1) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv3d(in_dim, out_channels * scale**3, kernel_size=1)

    def forward(self, h4: torch.Tensor) -> torch.Tensor:
        return pixelshuffle(self.conv(h4), spatial_dims=3, scale_factor=self.scale)


def _up_block(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv3d(cin, cout, kernel_size=3, padding=1),
        nn.InstanceNorm3d(cout),
        nn.LeakyReLU(),
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
    ]


class SwinSSLHeads(nn.Module):
    """The three heads of Swin UNETR's self-supervised pretraining, on h4 (B, 16F, g, g, g).

    ``code`` (released pretraining code; default): the 16F-channel tokens flattened in raster
    order; the rotation head is Linear(16F, 4) on token 0, the contrastive head Linear(16F, 512) on
    token 1; neither pools nor has an MLP. ``pooled_mlp`` (the paper's description): the mean of all
    tokens through a 2-layer MLP for each. The inpainting head is the code's "vae" decoder: four
    blocks Conv3 -> InstanceNorm -> LeakyReLU -> trilinear x2 halving the channels (16F -> F),
    Conv3(F, F) -> IN -> LeakyReLU -> x2, and a linear Conv1(F, 1): x32 in total.
    """

    def __init__(
        self,
        dim: int,
        contrastive_dim: int = 512,
        mode: Literal["code", "pooled_mlp"] = "code",
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        if mode not in ("code", "pooled_mlp"):
            raise ValueError(f"Swin SSL heads {mode!r}: use 'code' or 'pooled_mlp'")
        if dim % 16:
            raise ValueError(f"h4 channels {dim} must be 16 * feature_size")
        self.mode = mode
        if mode == "code":
            self.rotation_head: nn.Module = nn.Linear(dim, 4)
            self.contrastive_head: nn.Module = nn.Linear(dim, contrastive_dim)
        else:
            self.rotation_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 4))
            self.contrastive_head = nn.Sequential(
                nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, contrastive_dim)
            )
        f = dim // 16
        layers: list[nn.Module] = []
        for cin in (dim, dim // 2, dim // 4, dim // 8):
            layers += _up_block(cin, cin // 2)
        layers += _up_block(f, f)
        layers.append(nn.Conv3d(f, out_channels, kernel_size=1))
        self.inpainting_head = nn.Sequential(*layers)

    def forward(self, h4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotation logits (B, 4), contrastive embedding (B, D), reconstruction (B, 1, 32g, ...))."""
        tokens = h4.flatten(2).transpose(1, 2)  # (B, N, C), token t = (i0*g + i1)*g + i2
        if self.mode == "code":
            if tokens.shape[1] < 2:
                raise ValueError(
                    f"the code's heads read tokens 0 and 1 of the last stage, which has {tokens.shape[1]} "
                    "token(s): use inputs of at least 64 voxels per axis"
                )
            rot, con = self.rotation_head(tokens[:, 0]), self.contrastive_head(tokens[:, 1])
        else:
            pooled = tokens.mean(1)
            rot, con = self.rotation_head(pooled), self.contrastive_head(pooled)
        return rot, con, self.inpainting_head(h4)


VoCoFeatures = Literal["multi_scale", "last_stage"]


def voco_feature_dim(feature_size: int, mode: VoCoFeatures = "multi_scale") -> int:
    """24F for the five pooled maps (F + F + 2F + 4F + 16F), 16F for h4 alone."""
    return 24 * feature_size if mode == "multi_scale" else 16 * feature_size


def voco_features(
    net: SwinUNETR, x: torch.Tensor, hidden: list[torch.Tensor], mode: VoCoFeatures = "multi_scale"
) -> torch.Tensor:
    """VoCo's crop embedding (B, D): the global average pool of [encoder1(x), encoder2(h0),
    encoder3(h1), encoder4(h2), encoder10(h4)] concatenated (the released code), or of h4 only."""
    if mode == "last_stage":
        return hidden[4].mean(dim=(2, 3, 4))
    if mode != "multi_scale":
        raise ValueError(f"VoCo features {mode!r}: use 'multi_scale' or 'last_stage'")
    maps = [
        net.encoder1(x),
        net.encoder2(hidden[0]),
        net.encoder3(hidden[1]),
        net.encoder4(hidden[2]),
        net.encoder10(hidden[4]),
    ]
    return torch.cat([m.mean(dim=(2, 3, 4)) for m in maps], dim=1)


class VoCoProjector(nn.Sequential):
    """As published: Linear(D, 2048) -> BN -> ReLU -> Linear(2048, 2048) -> BN -> ReLU ->
    Linear(2048, 2048). The BatchNorms have no affine parameters and no running statistics (batch
    statistics only, so they hold no buffer); under several ranks the method converts them to
    ``nn.SyncBatchNorm`` so the statistics span every rank's crops."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

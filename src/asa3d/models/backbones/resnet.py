"""MONAI ``ResNet`` (2D or 3D) as declared backbones:

- ``resnet``: the classifier, parts ``stem``, ``layer1``..``layer4``, head ``fc`` (``num_classes``);
  linear probing freezes the encoder parts and trains the new ``fc``.
- ``resnet_unet``: a U-Net on that ResNet as its encoder (``ResNetUNet``: MONAI's ``ResNet``
  without its head, MONAI's ``UNetDecoder`` and ``SegmentationHead``, wired as MONAI's
  ``FlexibleUNet`` wires its registered encoders, but at any depth and width, so a checkpoint of
  a ResNet of widths 8-32 fits too). Keys ``encoder.<ResNet keys>``, ``decoder.*``,
  ``segmentation_head.*``; a ``resnet`` state (an Adam export) is adopted into the encoder with
  ``fc`` dropped (``BackboneSpec.adopt``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from asa3d.models.backbones.spec import BackboneKind, BackboneSpec, register_backbone

RESNET_CLASS = "monai.networks.nets.ResNet"
# MONAI's named depths (block type, blocks per stage)
DEPTHS: dict[int, tuple[str, list[int]]] = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
}


def _adapt(kwargs: dict[str, Any]) -> dict[str, Any]:
    from monai.networks.nets import ResNet

    params = inspect.signature(ResNet.__init__).parameters
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        raise TypeError(
            f"ResNet does not accept {unknown}; valid: {sorted(p for p in params if p != 'self')}"
        )
    out = dict(kwargs)
    # recorded explicitly (MONAI's default 1): a spec then says whether its stem halves the input
    out.setdefault("conv1_t_stride", 1)
    return out


def _parts(kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    return {
        "stem": ("conv1.", "bn1."),
        "layer1": ("layer1.",),
        "layer2": ("layer2.",),
        "layer3": ("layer3.",),
        "layer4": ("layer4.",),
    }


# network.options of a downstream config
OPTIONS = ("depth", "widths", "in_channels", "spatial_dims", "stem_stride")


def _encoder_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """``network.options`` (depth 10/18/34/50, widths, in_channels, spatial_dims, stem_stride) ->
    ResNet kwargs. ``stem_stride`` 2 by default: torchvision's ResNet-50, the layout Adam's paper
    pretrained and fine-tuned; it must equal the pretraining's (a mismatch is refused by name)."""
    unknown = sorted(set(options) - set(OPTIONS) - {"decoder_channels"})
    if unknown:
        raise ValueError(f"unknown network.options {unknown}; valid: {list(OPTIONS)}")
    depth = int(options.get("depth", 50))
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth {depth}: one of {sorted(DEPTHS)}")
    block, layers = DEPTHS[depth]
    widths = [int(w) for w in options.get("widths", (64, 128, 256, 512))]
    if len(widths) != 4:
        raise ValueError(f"network.options.widths={widths}: four widths, one per stage")
    stride = int(options.get("stem_stride", 2))
    if stride not in (1, 2):
        raise ValueError(f"network.options.stem_stride={stride}: 1 or 2")
    return dict(
        block=block,
        layers=list(layers),
        block_inplanes=widths,
        spatial_dims=int(options.get("spatial_dims", 2)),
        n_input_channels=int(options.get("in_channels", 1)),
        conv1_t_stride=stride,
    )


def _classifier_options(options: Mapping[str, Any], out: int) -> dict[str, Any]:
    if "decoder_channels" in options:
        raise ValueError("decoder_channels: the classifier has no decoder (network.name=resnet_unet has)")
    return {**_encoder_kwargs(options), "num_classes": out}


register_backbone(
    BackboneKind(
        name="resnet",
        network=RESNET_CLASS,
        adapt=_adapt,
        parts=_parts,
        head=("fc.",),
        encoder=("stem", "layer1", "layer2", "layer3", "layer4"),
        out_key="num_classes",
        from_options=_classifier_options,
    )
)


# ---- the U-Net --------------------------------------------------------------------------------
UNET_CLASS = "asa3d.models.backbones.resnet.ResNetUNet"
ENCODER_KWARGS = ("block", "layers", "block_inplanes", "spatial_dims", "n_input_channels", "conv1_t_stride")
EXPANSION = {"basic": 1, "bottleneck": 4}  # MONAI's ResNetBlock / ResNetBottleneck


class ResNetUNet(nn.Module):
    """U-Net with a MONAI ``ResNet`` encoder and MONAI's ``UNetDecoder`` and ``SegmentationHead``
    (MONAI ``FlexibleUNet``'s layout). The ResNet halves the input in its max-pool and layers 2-4,
    and once more in its stem when ``conv1_t_stride=2`` (the paper's ResNet-50; MONAI's default 1
    keeps it), so the four stage outputs are at strides s*2, s*4, s*8, s*16 for stem stride s: the
    decoder's four up-sampling blocks take skips from layers 3, 2, 1 and end at stride s, and the
    segmentation head up-samples by s to the input resolution."""

    def __init__(
        self,
        block: str,
        layers: list[int],
        block_inplanes: list[int],
        spatial_dims: int = 2,
        n_input_channels: int = 1,
        out_channels: int = 2,
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32),
        upsample: str = "nontrainable",
        conv1_t_stride: int = 1,
    ) -> None:
        super().__init__()
        from monai.networks.nets import ResNet
        from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder

        if len(decoder_channels) != 4:
            raise ValueError(f"decoder_channels={list(decoder_channels)}: four, one per up-sampling block")
        self.encoder = ResNet(
            block,
            layers,
            block_inplanes,
            spatial_dims,
            n_input_channels,
            conv1_t_stride=conv1_t_stride,
            feed_forward=False,
        )
        feats = [w * EXPANSION[block] for w in block_inplanes]
        self.decoder = UNetDecoder(
            spatial_dims=spatial_dims,
            encoder_channels=[n_input_channels, *feats],  # the first: the input level, no skip
            decoder_channels=list(decoder_channels),
            act=("relu", {"inplace": True}),
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
            dropout=0.0,
            bias=False,
            upsample=upsample,
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.segmentation_head = SegmentationHead(
            spatial_dims, decoder_channels[-1], out_channels, 3, scale_factor=float(conv1_t_stride)
        )

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        e = self.encoder
        x = e.act(e.bn1(e.conv1(x)))
        out = []
        if not e.no_max_pool:
            x = e.maxpool(x)
        for layer in (e.layer1, e.layer2, e.layer3, e.layer4):
            x = layer(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.features(x), 3))


def _unet_input(kwargs: Mapping[str, Any], size: Any) -> str | None:
    # four halvings (max-pool, layers 2-4), five with a strided stem: MONAI's decoder pads only
    # where sides divide evenly
    stride = int(kwargs.get("conv1_t_stride", 1))
    unit = 16 * stride
    if any(int(s) % unit for s in size):
        halvings = "five" if stride == 2 else "four"
        return f"every side must be a multiple of {unit} (the encoder halves it {halvings} times)"
    return None


def _unet_adapt(kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(ResNetUNet.__init__).parameters
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        raise TypeError(
            f"ResNetUNet does not accept {unknown}; valid: {sorted(p for p in params if p != 'self')}"
        )
    return dict(kwargs)


def _unet_parts(kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    parts = {p: tuple("encoder." + x for x in v) for p, v in _parts(kwargs).items()}
    return {**parts, "decoder": ("decoder.",)}


def _unet_options(options: Mapping[str, Any], out: int) -> dict[str, Any]:
    kw = {**_encoder_kwargs(options), "out_channels": out}
    if "decoder_channels" in options:
        kw["decoder_channels"] = [int(c) for c in options["decoder_channels"]]
    return kw


register_backbone(
    BackboneKind(
        name="resnet_unet",
        network=UNET_CLASS,
        adapt=_unet_adapt,
        parts=_unet_parts,
        head=("segmentation_head.",),
        encoder=("stem", "layer1", "layer2", "layer3", "layer4"),
        out_key="out_channels",
        embeds=(
            "resnet",
            lambda kw: {k: kw[k] for k in ENCODER_KWARGS if k in kw},
            lambda key: None if key.startswith("fc.") else "encoder." + key,
        ),
        from_options=_unet_options,
        check_input=_unet_input,
    )
)


def resnet_spec(
    depth: int = 18,
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 1,
    widths: tuple[int, int, int, int] = (64, 128, 256, 512),
    **extra: Any,
) -> BackboneSpec:
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth {depth}: one of {sorted(DEPTHS)}")
    block, layers = DEPTHS[depth]
    return BackboneSpec.create(
        "resnet",
        dict(
            block=block,
            layers=list(layers),
            block_inplanes=list(widths),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=num_classes,
            **extra,
        ),
    )

"""MONAI ``ResNet`` (2D or 3D) as a declared backbone: parts ``stem``, ``layer1``..``layer4``,
head ``fc`` (``num_classes``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

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
    return dict(kwargs)


def _parts(kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    return {
        "stem": ("conv1.", "bn1."),
        "layer1": ("layer1.",),
        "layer2": ("layer2.",),
        "layer3": ("layer3.",),
        "layer4": ("layer4.",),
    }


register_backbone(
    BackboneKind(
        name="resnet",
        network=RESNET_CLASS,
        adapt=_adapt,
        parts=_parts,
        head=("fc.",),
        encoder=("stem", "layer1", "layer2", "layer3", "layer4"),
        out_key="num_classes",
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

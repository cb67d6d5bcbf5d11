"""Declared backbones: ``BackboneSpec`` (spec.py) and one module per network family."""

from asa3d.models.backbones.spec import (
    DEFAULT_BACKBONE,
    BackboneError,
    BackboneSpec,
    convert_known_layout,
    default_spec,
    kind_of,
    network_spec,
    register_backbone,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneError",
    "BackboneSpec",
    "convert_known_layout",
    "default_spec",
    "kind_of",
    "network_spec",
    "register_backbone",
]

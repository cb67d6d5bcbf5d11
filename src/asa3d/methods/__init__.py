"""Self-supervised methods, one module each, found through a flat registry (``METHODS``)."""

from __future__ import annotations

import importlib

from asa3d.methods.base import METHODS, PretrainMethod, SampleSpec, StepOutput, build_method, register_method

# Modules that register built-in methods on import. Peers (simmim, swin_ssl, voco, adam) are
# added here as they land.
BUILTIN_METHOD_MODULES = (
    "asa3d.methods.asa",
    "asa3d.methods.simmim",
    "asa3d.methods.swinssl",
    "asa3d.methods.voco",
    "asa3d.methods.adam",
)


def load_builtin_methods() -> None:
    for name in BUILTIN_METHOD_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


__all__ = [
    "METHODS",
    "PretrainMethod",
    "SampleSpec",
    "StepOutput",
    "build_method",
    "load_builtin_methods",
    "register_method",
]

"""Compatibility re-export: the SwinUNETR backbone lives in ``asa3d.models.backbones.swinunetr``."""

from asa3d.models.backbones.swinunetr import *  # noqa: F403
from asa3d.models.backbones.swinunetr import SPEED_ONLY_KWARGS, __all__  # noqa: F401

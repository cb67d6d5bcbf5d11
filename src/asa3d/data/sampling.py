"""What a method asks the data loader for (``SampleSpec``); the data layer owns it and every
method reads it from here (``asa3d.methods.base`` re-exports it for older imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SampleSpec:
    """What the data loader must deliver to the method for one phase.

    ``mode="whole"``: every volume whole (a list of (1, X, Y, Z) tensors of varying shape; the
    method resizes on the device). ``mode="crop"``: random crops of ``crop_size`` (padded where the
    volume is smaller), stacked into (B, 1, *crop_size).

    ``views``: crops drawn independently from the SAME volume per sample (two augmented views for
    contrastive methods); with ``views > 1`` a sample's image is (views, 1, *crop_size) and a
    batch (B, views, 1, *crop_size). ``spatial_dims=2``: 2D images, an axial slice (at a random
    z) of the cached CT volume, cropped to ``crop_size = (H, W)`` (whole: the full slice).
    """

    mode: Literal["whole", "crop"] = "whole"
    crop_size: tuple[int, ...] | None = None
    views: int = 1
    spatial_dims: Literal[2, 3] = 3

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "crop"):
            raise ValueError(f"SampleSpec.mode={self.mode!r}: whole | crop")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"SampleSpec.spatial_dims={self.spatial_dims}: 2 or 3")
        if self.mode == "crop" and (not self.crop_size or len(self.crop_size) != self.spatial_dims):
            raise ValueError(
                f"SampleSpec(mode='crop') needs a crop_size of {self.spatial_dims} sides, "
                f"got {self.crop_size}"
            )
        if self.views < 1:
            raise ValueError(f"SampleSpec.views={self.views}: at least 1")
        if self.views > 1 and self.mode != "crop":
            raise ValueError("SampleSpec.views > 1 needs mode='crop' (whole volumes are all the same view)")

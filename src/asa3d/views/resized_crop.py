"""Random resized crops of whole volumes with a left-right flip (SimMIM-3D's augmentation).

SimMIM's official 2D pipeline uses a random resized crop (area scale 0.67-1) and a horizontal flip.
In 3D asa3d keeps a box of volume fraction s ~ U(lo, hi) with the volume's own aspect ratio (each
side scaled by s^(1/3)) at a uniform position, resizes it to the target cube, and flips the
left-right axis (array axis 0 after RAS) with probability ``p_flip``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from asa3d.views.resize import ResizeMode, resize_volumes

__all__ = ["random_resized_crops"]


def random_resized_crops(
    volumes: Sequence[torch.Tensor],
    size: int,
    scale: tuple[float, float] = (0.67, 1.0),
    p_flip: float = 0.5,
    mode: ResizeMode = "area",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(C, X, Y, Z) volumes of any shapes -> (B, C, size, size, size)."""
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop scale {scale} must satisfy 0 < lo <= hi <= 1")
    gdev = generator.device if generator is not None else torch.device("cpu")

    def draw() -> float:
        return float(torch.rand((), generator=generator, device=gdev))

    out = []
    for v in volumes:
        if v.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {tuple(v.shape)}")
        side = (lo + (hi - lo) * draw()) ** (1.0 / 3.0)
        box = []
        for s in v.shape[1:]:
            n = max(1, min(int(s), round(side * int(s))))
            start = int(draw() * (int(s) - n + 1))
            box.append(slice(start, start + n))
        crop = resize_volumes(v[(slice(None), *box)][None], size, mode)
        if draw() < p_flip:
            crop = crop.flip(2)
        out.append(crop)
    return torch.cat(out, 0)

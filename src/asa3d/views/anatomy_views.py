"""Adam's view generator T (two independent draws per anchor part), 2D and 3D, batched on the device.

In order, as the Adam-v1 reference pipeline (MoCo-v2's without flip or random greyscale):
1. random resized crop of the anchor part: area (2D) / volume (3D) fraction s ~ U(scale), per-axis
   aspect jitter exp(U(log 3/4, log 4/3)) (2D: width vs height, as torchvision's ratio; 3D: each
   axis, normalised so the fractions multiply to s), clipped to the part, at a uniform position,
   resampled (bilinear / trilinear) to ``size`` per axis;
2. intensity jitter with probability ``p_jitter``: brightness (2D: x * U[1-b, 1+b], torchvision's
   ColorJitter; 3D: x + U[-b, b], a shift) then contrast ((x - mean) * U[1-c, 1+c] + mean), clipped
   to [0, 1]; saturation and hue do nothing to a greyscale image, so they are left out;
3. Gaussian blur with probability ``p_blur``, sigma ~ U(blur_sigma) pixels/voxels, separable;
4. rotation by U(-deg, deg) in the first two spatial axes' plane (2D: the image plane; 3D (x, y, z):
   about z), zero fill.
The crop coordinates are relative to the part, so ratio 1 keeps a square part's crops square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["anatomy_views", "gaussian_blur", "intensity_jitter", "random_rotate", "resized_crops"]


def _theta(lo: torch.Tensor, hi: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Affine ``theta`` (B, D, D+1) mapping the output grid onto the box [lo, hi) (B, D) of an
    image of spatial ``shape`` (align_corners=False). grid coordinate j runs along array axis D-1-j."""
    b, d = lo.shape
    theta = torch.zeros(b, d, d + 1, dtype=torch.float32, device=lo.device)
    for a, n in enumerate(shape):
        j = d - 1 - a
        theta[:, j, j] = (hi[:, a] - lo[:, a]) / n
        theta[:, j, d] = (hi[:, a] + lo[:, a]) / n - 1.0
    return theta


def resized_crops(
    images: Sequence[torch.Tensor] | torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """One random resized crop inside ``boxes[i]`` (D, 2) of each image (C, *spatial) -> (B, C, *[size]*D)."""
    b, d = boxes.shape[0], boxes.shape[1]
    dev = images[0].device
    lo_p, hi_p = boxes[..., 0].float().to(dev), boxes[..., 1].float().to(dev)
    ext = hi_p - lo_p
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(b, device=dev)
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(b, d, device=dev)
    # 2D as torchvision: width = sqrt(s r), height = sqrt(s / r) (fractions of the part); 3D: zero-mean
    logr = torch.stack([-logr[:, 0], logr[:, 0]], 1) / 2 if d == 2 else logr - logr.mean(1, keepdim=True)
    frac = (s[:, None] ** (1.0 / d) * logr.exp()).clamp(max=1.0)
    side = (frac * ext).clamp(min=1.0)
    lo = lo_p + torch.rand(b, d, device=dev) * (ext - side)
    hi = lo + side
    out = []
    for i in range(b):
        x = images[i][None].float()
        theta = _theta(lo[i : i + 1], hi[i : i + 1], x.shape[2:])
        grid = F.affine_grid(theta, [1, x.shape[1], *([size] * d)], align_corners=False)
        out.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return torch.cat(out)


def intensity_jitter(
    x: torch.Tensor, brightness: float, contrast: float, p: float, brightness_mode: str = "scale"
) -> torch.Tensor:
    """Brightness then contrast per sample, each applied with probability ``p``; output in [0, 1]."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    on = (torch.rand(b, device=x.device) < p).float().view(shape)
    u = 2 * torch.rand(b, device=x.device).view(shape) - 1
    if brightness_mode == "scale":
        y = x * (1 + on * brightness * u)
    elif brightness_mode == "shift":
        y = x + on * brightness * u
    else:
        raise ValueError(f"brightness_mode {brightness_mode!r}: scale | shift")
    y = y.clamp(0, 1)
    c = 1 + on * contrast * (2 * torch.rand(b, device=x.device).view(shape) - 1)
    mean = y.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return ((y - mean) * c + mean).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: tuple[float, float], p: float, max_radius: int = 6) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma ~ U(sigma), applied with probability ``p``."""
    b, c = x.shape[:2]
    d = x.ndim - 2
    sig = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(b, device=x.device)
    on = torch.rand(b, device=x.device) < p
    r = min(max_radius, math.ceil(3 * sigma[1]), min(x.shape[2:]) // 2)
    if r < 1 or not bool(on.any()):
        return x
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sig[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, 2r+1)
    k = k.repeat_interleave(c, 0)  # one kernel per (sample, channel)
    y = x.float().reshape(1, b * c, *x.shape[2:])
    for a in range(d):
        shape = [b * c, 1] + [1] * d
        shape[2 + a] = 2 * r + 1
        pad = [0, 0] * d
        pad[2 * (d - 1 - a)] = pad[2 * (d - 1 - a) + 1] = r
        y = _conv(F.pad(y, pad, mode="reflect"), k.view(shape), d, b * c)
    y = y.reshape(x.shape)
    return torch.where(on.view((b,) + (1,) * (x.ndim - 1)), y, x)


def _conv(y: torch.Tensor, k: torch.Tensor, d: int, groups: int) -> torch.Tensor:
    return (F.conv2d if d == 2 else F.conv3d)(y, k, groups=groups)


def random_rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate each sample by U(-degrees, degrees) in the plane of spatial axes 0 and 1 (2D: the image;
    3D (x, y, z): about z); zero fill outside."""
    if degrees <= 0:
        return x
    b, d = x.shape[0], x.ndim - 2
    ang = (2 * torch.rand(b, device=x.device) - 1) * math.radians(degrees)
    theta = torch.zeros(b, d, d + 1, device=x.device)
    for j in range(d):
        theta[:, j, j] = 1.0
    # array axes 0 and 1 are grid coordinates d-1 and d-2
    i, j = d - 1, d - 2
    theta[:, i, i] = ang.cos()
    theta[:, i, j] = -ang.sin()
    theta[:, j, i] = ang.sin()
    theta[:, j, j] = ang.cos()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def anatomy_views(
    images: Sequence[torch.Tensor] | torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    brightness: float = 0.4,
    contrast: float = 0.4,
    p_jitter: float = 0.8,
    brightness_mode: str = "scale",
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    p_blur: float = 0.5,
    rotation_deg: float = 30.0,
) -> torch.Tensor:
    """One draw of T on the anchor part ``boxes`` of each image: (B, C, *[size]*D) in [0, 1]."""
    v = resized_crops(images, boxes, size, scale, ratio)
    v = intensity_jitter(v, brightness, contrast, p_jitter, brightness_mode)
    v = gaussian_blur(v, blur_sigma, p_blur)
    return random_rotate(v, rotation_deg)

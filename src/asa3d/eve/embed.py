"""Embeddings from a pretrained encoder (MONAI ``ResNet`` 2D/3D or ``SwinUNETR``): feature maps,
dense maps, crop vectors.

Two readings of one network, because the pretraining losses train one and the pictures need the
other:

- **crop embedding** (Eve proper): a crop resized to the network input, encoded, globally
  average-pooled at the *deepest trained* stage. ResNet: ``layer4`` (what Adam's projector reads);
  SwinUNETR: the last Swin stage the checkpoint trained (``h4``: Adam-3D, Swin UNETR SSL, VoCo,
  SimMIM; ASA without appearance recovery trains up to its tap, ``h3``). This is the vector the
  contrastive losses act on, so the t-SNE, the whole-vs-parts table and the localisation scores
  use it.
- **feature map** (``dense_stage``): ResNet ``layer4`` (stride 16 with MONAI's stride-1 stem);
  SwinUNETR the mid-level ``h3`` tokens (8F channels, one per 16^3 voxels) rather than ``h4``
  (one per 32^3: a 128^3 volume gives only 4^3 tokens, too coarse to draw matches on). No loss
  acts on these maps directly (Adam pools them first), so they are an option of the
  correspondence picture (``--dense map``), not the default.

The network runs in eval mode without gradients (BatchNorm uses its running statistics, so a
sample's embedding never depends on the rest of the batch) and its training flag is restored
afterwards. A one-channel image fed to a three-channel network (Adam's ResNet-50 takes greyscale
replicated to RGB) is replicated; the method's input normalisation (Adam-2D: ImageNet mean / std)
is applied after cropping, as in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EveEncoder",
    "as_encoder",
    "crop_embeddings",
    "dense_embeddings",
    "resnet_features",
    "swin_features",
]

STAGES = ("layer1", "layer2", "layer3", "layer4")


@contextlib.contextmanager
def _inference(net: nn.Module) -> Iterator[None]:
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was)


def _is_resnet(net: nn.Module) -> bool:
    return all(hasattr(net, n) for n in ("conv1", "bn1", "act", *STAGES))


def _is_swinunetr(net: nn.Module) -> bool:
    return hasattr(net, "swinViT") and hasattr(net, "normalize")


def _fit_channels(want: int, x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == want:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, want, *x.shape[2:])
    raise ValueError(f"the network takes {want} channel(s), the image has {x.shape[1]}")


def resnet_features(net: nn.Module, x: torch.Tensor, stage: int = 4) -> torch.Tensor:
    """The feature map after ``layer{stage}`` of a MONAI ``ResNet`` for ``x`` (B, C, *spatial):
    (B, F, *spatial / stride). Runs the stem and the stages only (no pooling, no fc)."""
    if not 1 <= stage <= 4:
        raise ValueError(f"stage {stage} must be 1..4 (layer1..layer4)")
    if not _is_resnet(net):
        missing = [n for n in ("conv1", "bn1", "act", *STAGES) if not hasattr(net, n)]
        raise TypeError(f"expected a monai.networks.nets.ResNet; {type(net).__name__} lacks {missing}")
    with _inference(net):
        h = net.act(net.bn1(net.conv1(_fit_channels(net.conv1.in_channels, x.float()))))
        if not getattr(net, "no_max_pool", False):
            h = net.maxpool(h)
        for name in STAGES[:stage]:
            h = getattr(net, name)(h)
    return h


def swin_features(net: nn.Module, x: torch.Tensor, stage: int = 4) -> torch.Tensor:
    """The hidden state ``h_stage`` of a MONAI ``SwinUNETR``'s ``swinViT`` for ``x`` (B, C, X, Y, Z):
    (B, F * 2**stage, *spatial / (patch_size * 2**stage)), normalised as MONAI does. Runs
    ``patch_embed`` and ``layers1..layers<stage>`` only (no UNETR blocks, no decoder)."""
    from asa3d.models.backbones.swinunetr import swin_hidden_states

    if not _is_swinunetr(net):
        raise TypeError(f"expected a monai.networks.nets.SwinUNETR; {type(net).__name__} has no swinViT")
    with _inference(net):
        return swin_hidden_states(net, x.float(), stage)[stage]


@dataclass
class EveEncoder:
    """A pretrained backbone as Eve reads it: input preparation, the pooled crop embedding and the
    dense feature map (see the module docstring for which stage is which, and why)."""

    net: nn.Module
    kind: str  # "resnet" | "swinunetr"
    spatial_dims: int
    pool_stage: int = 4
    dense_stage: int = 4
    mean: tuple[float, ...] | None = None  # per input channel; None: no normalisation
    std: tuple[float, ...] | None = None
    input_size: int = 64  # side of the network input a crop is resized to
    info: dict[str, Any] = field(default_factory=dict)  # provenance for scores.json
    on_batch: Callable[[int], None] | None = None  # called with each batch size (progress bars)

    @property
    def in_channels(self) -> int:
        if self.kind == "resnet":
            return int(self.net.conv1.in_channels)
        return int(self.net.swinViT.patch_embed.proj.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) images in [0, 1] -> the network's input (channels, normalisation)."""
        x = _fit_channels(self.in_channels, x.float().to(self.device))
        if self.mean is not None and self.std is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            x = (x - torch.tensor(self.mean, device=x.device).view(shape)) / torch.tensor(
                self.std, device=x.device
            ).view(shape)
        return x

    def feature_map(self, x: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        stage = self.dense_stage if stage is None else stage
        x = self.prepare(x)
        if self.kind == "resnet":
            return resnet_features(self.net, x, stage)
        return swin_features(self.net, x, stage)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F): the deepest trained stage, globally average-pooled."""
        out = self.feature_map(x, self.pool_stage).flatten(2).mean(-1)
        if self.on_batch is not None:
            self.on_batch(int(x.shape[0]))
        return out

    def describe(self) -> dict[str, Any]:
        layer = "layer" if self.kind == "resnet" else "h"
        return {
            "backbone": self.kind,
            "crop_embedding": f"global average pool of {layer}{self.pool_stage}",
            "dense_map": f"{layer}{self.dense_stage}",
            "input_size": self.input_size,
            "normalisation": None
            if self.mean is None
            else {"mean": list(self.mean), "std": list(self.std or ())},
            **self.info,
        }


def as_encoder(net: nn.Module | EveEncoder, stage: int | None = None) -> EveEncoder:
    """``net`` as an ``EveEncoder``: a MONAI ``ResNet`` (pooled and dense: ``layer4``) or
    ``SwinUNETR`` (pooled ``h4``, dense ``h3``), unnormalised input; ``stage`` overrides both."""
    if isinstance(net, EveEncoder):
        if stage is None or stage == net.pool_stage:
            return net
        return EveEncoder(**{**net.__dict__, "pool_stage": stage, "dense_stage": stage})
    if _is_resnet(net):
        dims = 3 if isinstance(net.conv1, nn.Conv3d) else 2
        s = 4 if stage is None else stage
        return EveEncoder(net, "resnet", dims, pool_stage=s, dense_stage=s)
    if _is_swinunetr(net):
        return EveEncoder(
            net,
            "swinunetr",
            3,
            pool_stage=4 if stage is None else stage,
            dense_stage=3 if stage is None else stage,
        )
    raise TypeError(
        f"Eve reads a MONAI ResNet or SwinUNETR; got {type(net).__name__} (lacks conv1/layer1..4 and swinViT)"
    )


def dense_embeddings(
    net: nn.Module | EveEncoder,
    x: torch.Tensor,
    stage: int | None = None,
    upsample: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """Per-pixel (per-voxel) embeddings (B, F, *x.spatial): the dense stage's feature map,
    l2-normalised along F, interpolated (bi/trilinear) back to the input grid when ``upsample``."""
    enc = as_encoder(net)
    h = enc.feature_map(x, stage)
    if normalize:
        h = F.normalize(h, dim=1)
    if upsample:
        mode = "bilinear" if h.ndim == 4 else "trilinear"
        h = F.interpolate(h, size=tuple(x.shape[2:]), mode=mode, align_corners=False)
        if normalize:
            h = F.normalize(h, dim=1)
    return h


def _crop_grid(
    centres: torch.Tensor, sizes: torch.Tensor, shape: Sequence[int], out: Sequence[int]
) -> torch.Tensor:
    """``grid_sample`` grids (N, *out, D) of crops centred at ``centres`` (N, D) pixel coordinates
    with extents ``sizes`` (N, D) pixels; pixel i covers [i - 0.5, i + 0.5] (align_corners=False)."""
    axes = []
    for d, (n_in, n_out) in enumerate(zip(shape, out, strict=True)):
        k = (torch.arange(n_out, dtype=torch.float32) + 0.5) / n_out - 0.5  # in (-0.5, 0.5)
        p = centres[:, d, None] + k[None] * sizes[:, d, None]  # (N, n_out) pixel coordinates
        axes.append((p + 0.5) * 2.0 / n_in - 1.0)
    n, dims = centres.shape
    mesh = []
    for d in range(dims):
        view = [n] + [1] * dims
        view[d + 1] = out[d]
        mesh.append(axes[d].reshape(view).expand(n, *out))
    return torch.stack(mesh[::-1], dim=-1)  # grid_sample wants (x=last axis, y, z) order


def crop_images(
    image: torch.Tensor,
    centres: torch.Tensor | Sequence[Sequence[float]] | np.ndarray,
    sizes: torch.Tensor | Sequence[float] | float | np.ndarray,
    input_size: int | Sequence[int],
) -> torch.Tensor:
    """Crops (N, C, *input_size) of ``image`` (C, *spatial) centred at ``centres`` (N, D) pixel
    coordinates with sides ``sizes`` pixels (scalar, (D,), (1, D), (N, 1) or (N, D)), resampled
    bi/trilinearly, zero outside the image."""
    spatial = tuple(image.shape[1:])
    dims = len(spatial)
    c = torch.as_tensor(np.asarray(centres, dtype=np.float32)).reshape(-1, dims)
    s = torch.as_tensor(np.asarray(sizes, dtype=np.float32))
    if s.ndim <= 1 and s.numel() in (1, dims):  # one size for every crop: scalar or (D,)
        s = s.reshape(1, -1).expand(c.shape[0], dims)
    elif s.ndim == 2 and (s.shape[0] == 1 and s.shape[1] in (1, dims) or s.shape == (c.shape[0], 1)):
        s = s.expand(c.shape[0], dims)
    elif tuple(s.shape) != (c.shape[0], dims):
        raise ValueError(
            f"sizes {tuple(s.shape)}: use a scalar, (D,), (N, 1) or (N, D) with N={c.shape[0]}, D={dims}"
        )
    out = (int(input_size),) * dims if isinstance(input_size, int) else tuple(int(v) for v in input_size)
    grid = _crop_grid(c, s, spatial, out).to(image.device)
    src = image.float()[None].expand(grid.shape[0], *image.shape)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_embeddings(
    net: nn.Module | EveEncoder,
    image: torch.Tensor,
    centres: torch.Tensor | Sequence[Sequence[float]] | np.ndarray,
    sizes: torch.Tensor | Sequence[float] | float | np.ndarray,
    input_size: int | Sequence[int] | None = None,
    stage: int | None = None,
    batch: int = 64,
) -> torch.Tensor:
    """Eve vectors (N, F): crops of ``image`` (C, *spatial) centred at ``centres`` (N, D) pixel
    coordinates, of ``sizes`` pixels (scalar, (D,), (N, 1) or (N, D)), resampled (bi/trilinear, zero
    outside the image) to ``input_size`` (default: the encoder's), encoded and globally
    average-pooled (``stage``: default the encoder's pooled stage)."""
    enc = as_encoder(net, stage)
    size = enc.input_size if input_size is None else input_size
    dims = image.ndim - 1
    c = np.asarray(centres, dtype=np.float32).reshape(-1, dims)
    s = np.asarray(sizes, dtype=np.float32)
    per_crop = s.ndim == 2 and s.shape[0] == c.shape[0] and c.shape[0] > 1
    vecs = []
    for i in range(0, c.shape[0], batch):
        si = s[i : i + batch] if per_crop else s
        crops = crop_images(image, c[i : i + batch], si, size)
        vecs.append(enc.pooled(crops).cpu())
    return torch.cat(vecs) if vecs else torch.zeros(0, 0)

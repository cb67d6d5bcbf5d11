"""Torch datasets over a ``CacheIndex``: whole volumes, or seeded random crops read chunk-wise."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from asa3d.data.cache import CacheIndex
from asa3d.data.sampling import SampleSpec


def crop_window(
    shape: Sequence[int], size: Sequence[int], rng: np.random.Generator, centre: Sequence[int] | None = None
) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
    """Source slices and (before, after) zero padding for a ``size`` crop of an array of ``shape``
    (any number of axes: the 3D cache and 2D images, ``asa3d.data.dataset2d``, share it).

    Like MONAI ``SpatialPad`` (symmetric) + ``RandSpatialCrop``, but computed on indices so only the
    chunks under the crop are decoded.
    """
    slices, pads = [], []
    for s, c, *ctr in zip(shape, size, *([centre] if centre is not None else []), strict=False):
        if s <= c:
            before = (c - s) // 2
            slices.append(slice(0, s))
            pads.append((before, c - s - before))
        else:
            start = int(np.clip(int(ctr[0]) - c // 2, 0, s - c)) if ctr else int(rng.integers(0, s - c + 1))
            slices.append(slice(start, start + c))
            pads.append((0, 0))
    return tuple(slices), pads


class CachedVolumeDataset(Dataset):
    """Samples ``{"image": (1, x, y, z) float32, "label"?: (1, x, y, z) int64, "id": str}``.

    ``spec.mode == "whole"``: the full cached volume. ``"crop"``: a ``spec.crop_size`` crop (zero
    padded first where the volume is smaller), drawn from ``default_rng([seed, epoch, idx])`` so a
    resumed run repeats its crops; ``balanced``: half the crops (pos/neg 1:1) are centred on a
    foreground voxel (labels required). ``spec.views > 1``: that many crops of the same volume,
    stacked to (views, 1, ...); ``spec.spatial_dims == 2``: axial slices (1, x, y) at a random z.
    """

    def __init__(
        self,
        index: CacheIndex,
        spec: SampleSpec,
        seed: int = 0,
        with_labels: bool = False,
        balanced: bool = False,
    ) -> None:
        if spec.mode == "crop" and not spec.crop_size:
            raise ValueError("SampleSpec(mode='crop') needs crop_size")
        if with_labels and not all(c.has_label for c in index.cases):
            missing = [c.id for c in index.cases if not c.has_label]
            raise ValueError(
                f"with_labels=True but cases {missing[:5]} were cached without labels; "
                "build the cache with with_labels=True"
            )
        if balanced and not with_labels:
            raise ValueError("balanced crops need with_labels=True")
        self.index = index
        self.spec = spec
        self.seed = int(seed)
        self.with_labels = with_labels
        self.balanced = balanced
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index.cases)

    @property
    def collate_fn(self):
        """``collate_volumes`` that stacks crops (and 2D slices) and always lists whole volumes."""
        return functools.partial(
            collate_volumes, stack=self.spec.mode == "crop" or self.spec.spatial_dims == 2
        )

    def __getitem__(self, idx: int) -> dict[str, Any]:
        case = self.index.cases[idx]
        out: dict[str, Any] = {"id": case.id}
        spec = self.spec
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        imgs, labs = [], []
        for _ in range(spec.views):  # views of ONE volume, drawn one after another from its rng
            img, lab = self._draw(case, rng)
            imgs.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None])
            if lab is not None:
                labs.append(torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64))[None])
        out["image"] = imgs[0] if spec.views == 1 else torch.stack(imgs)
        if labs:
            out["label"] = labs[0] if spec.views == 1 else torch.stack(labs)
        return out

    def _draw(self, case: Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """One view: the whole volume (or, 2D, a whole axial slice) or a seeded crop."""
        spec = self.spec
        two_d = spec.spatial_dims == 2
        if spec.mode == "whole" and not two_d:
            return case.image(), (case.label() if self.with_labels else None)
        if spec.mode == "whole":
            size: tuple[int, ...] = (case.shape[0], case.shape[1], 1)
        else:
            size = tuple(spec.crop_size) + ((1,) if two_d else ())  # a 2D crop is one z-slice thick
        centre = None
        if self.balanced and rng.random() < 0.5:
            fg = case.foreground_coords()
            if len(fg):
                centre = fg[rng.integers(len(fg))]
        slices, pads = crop_window(case.shape, size, rng, centre)
        img = case.image(slices)
        lab = case.label(slices) if self.with_labels else None
        if any(p != (0, 0) for p in pads):
            img = np.pad(img, pads)
            lab = np.pad(lab, pads) if lab is not None else None
        if two_d:
            img, lab = img[..., 0], (lab[..., 0] if lab is not None else None)
        return img, lab


def collate_volumes(batch: Sequence[dict[str, Any]], stack: bool | None = None) -> dict[str, Any]:
    """Stack samples of one shape into (B, 1, x, y, z); otherwise (or ``stack=False``) keep a list.

    ``stack=None`` decides by shape; ``CachedVolumeDataset.collate_fn`` fixes it by mode so a
    whole-volume method always receives a list.
    """
    out: dict[str, Any] = {"id": [b["id"] for b in batch]}
    for key in ("image", "label"):
        if key not in batch[0]:
            continue
        tensors = [b[key] for b in batch]
        same = len({tuple(t.shape) for t in tensors}) == 1
        do_stack = same if stack is None else (stack and same)
        if stack and not same:
            raise ValueError(f"cannot stack {key} tensors of shapes {[tuple(t.shape) for t in tensors]}")
        out[key] = torch.stack(tensors) if do_stack else tensors
    return out

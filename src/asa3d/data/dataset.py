"""Torch datasets over a ``CacheIndex``: whole volumes, or seeded random crops read chunk-wise."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from asa3d.data.cache import CacheIndex
from asa3d.methods.base import SampleSpec


def _crop_window(
    shape: Sequence[int], size: Sequence[int], rng: np.random.Generator, centre: Sequence[int] | None = None
) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
    """Source slices and (before, after) zero padding for a ``size`` crop of a volume of ``shape``.

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
    foreground voxel (labels required).
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
        """``collate_volumes`` that stacks in crop mode and always lists in whole mode."""
        return functools.partial(collate_volumes, stack=self.spec.mode == "crop")

    def __getitem__(self, idx: int) -> dict[str, Any]:
        case = self.index.cases[idx]
        out: dict[str, Any] = {"id": case.id}
        if self.spec.mode == "whole":
            img = case.image()
            lab = case.label() if self.with_labels else None
        else:
            rng = np.random.default_rng([self.seed, self.epoch, idx])
            centre = None
            if self.balanced and rng.random() < 0.5:
                fg = case.foreground_coords()
                if len(fg):
                    centre = fg[rng.integers(len(fg))]
            slices, pads = _crop_window(case.shape, self.spec.crop_size, rng, centre)
            img = case.image(slices)
            lab = case.label(slices) if self.with_labels else None
            if any(p != (0, 0) for p in pads):
                img = np.pad(img, pads)
                lab = np.pad(lab, pads) if lab is not None else None
        out["image"] = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
        if lab is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64))[None]
        return out


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

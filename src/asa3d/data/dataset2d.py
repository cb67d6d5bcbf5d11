"""Pretraining datasets of 2D images (radiographs) for 2D methods (Adam): the engine's default
dataset factory uses them when ``data:`` names a 2D source (``is_2d_source``).

Sources, in order: ``data.preset: phantom_drr`` (the embedded default: DRRs projected from the
phantom, made in memory, nothing downloaded; ``data.root`` unused), ``data.preset: chestxray14``
(``asa3d.data.presets_2d``), a ``dataset.json`` with ``"spatial_dims": 2`` (as written by
``asa3d.data.drr.write_drr_dataset``), or a folder of PNG / JPEG / DICOM files. Images are
``{"image": (1, H, W) float32 in [0, 1], "id": str}`` at their own size; ``SampledImages2D``
delivers them as a method's ``SampleSpec`` asks, like ``CachedVolumeDataset`` for CT volumes:
whole (Adam decomposes and crops on the device), or seeded crops, several views of one image.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from asa3d.config_sections import DataConfig
from asa3d.data.dataset import collate_volumes, crop_window
from asa3d.data.errors import DataError
from asa3d.data.sampling import SampleSpec

__all__ = [
    "DRR_PRESET",
    "Image2DDataset",
    "PhantomDRRDataset",
    "SampledImages2D",
    "dataset_2d",
    "is_2d_source",
]

DRR_PRESET = "phantom_drr"
PRESETS_2D = (DRR_PRESET, "chestxray14")
# the embedded default: 16 phantom subjects, a 64 x 64 radiograph each (6 mm voxels, about 0.4 s each)
DRR_SUBJECTS = 16
DRR_VOLUME = (64, 50, 64)
DRR_SPACING = (6.0, 6.0, 6.0)


def _json_of(root: Path) -> Path | None:
    if root.is_file() and root.suffix.lower() == ".json":
        return root
    if (root / "dataset.json").is_file():
        return root / "dataset.json"
    return None


def is_2d_source(data: DataConfig) -> bool:
    """True when ``data:`` names 2D images (a 2D preset, a 2D dataset.json, or a folder of 2D images
    holding no CT scans)."""
    if data.preset in PRESETS_2D:
        return True
    if data.preset or data.root is None:
        return False
    root = Path(data.root).expanduser()
    js = _json_of(root)
    if js is not None:
        try:
            return int(json.loads(js.read_text()).get("spatial_dims", 3)) == 2
        except (OSError, ValueError, AttributeError):
            return False
    if root.is_dir():
        from asa3d.data.datalist2d import list_images2d

        return bool(list_images2d(root)) and not any(root.rglob("*.nii*"))
    return False


class PhantomDRRDataset(Dataset):
    """``n`` phantom DRRs (subject ``i`` = phantom seed ``(seed, i)``), made once in memory."""

    def __init__(self, n: int = DRR_SUBJECTS, seed: int = 0) -> None:
        from asa3d.data.drr import phantom_drr

        self.images = [
            torch.from_numpy(phantom_drr((seed, i), DRR_VOLUME, DRR_SPACING).image.astype(np.float32))[None]
            for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"image": self.images[idx], "id": f"drr_{idx:03d}"}


class Image2DDataset(Dataset):
    """The images of a datalist read with ``read_image2d`` (greyscale, scaled to [0, 1])."""

    def __init__(self, items: list[dict[str, str]]) -> None:
        if not items:
            raise DataError("the 2D datalist is empty: no images to pretrain on.")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        from asa3d.data.io2d import read_image2d

        it = self.items[idx]
        img = read_image2d(it["image"]).to_unit().astype(np.float32)
        return {"image": torch.from_numpy(img)[None], "id": str(it["id"])}


def _json_items(js: Path, split: str) -> list[dict[str, str]]:
    doc = json.loads(js.read_text())
    if split not in doc:
        raise DataError(
            f"{js}: no {split!r} list (has {sorted(k for k in doc if isinstance(doc[k], list))}).", js
        )
    out = []
    for i, e in enumerate(doc[split]):
        path = Path(e["image"] if isinstance(e, dict) else e)
        path = path if path.is_absolute() else js.parent / path
        out.append({"image": str(path), "id": str(e.get("id", path.stem) if isinstance(e, dict) else i)})
    return out


class SampledImages2D(Dataset):
    """The samples a ``SampleSpec`` asks for, cut from a dataset of whole 2D images.

    ``spec.mode == "whole"``: each image as it is (1, H, W) (images of one size are stacked by
    the collate, others listed). ``"crop"``: a ``spec.crop_size = (H, W)`` crop (zero padded
    symmetrically where the image is smaller), drawn from ``default_rng([seed, epoch, idx])``
    so a resumed run repeats its crops; ``spec.views > 1``: that many crops of the same image,
    stacked to (views, 1, H, W), a batch to (B, views, 1, H, W). A 3D spec is refused: 2D images
    hold no volume to cut it from.
    """

    def __init__(self, images: Dataset, spec: SampleSpec, seed: int = 0, source: str = "2D images") -> None:
        if spec.spatial_dims != 2:
            raise DataError(
                f"the method asks for 3D volumes (SampleSpec spatial_dims=3) but data: names {source}. "
                "Use a 2D method (e.g. method.spatial_dims=2 for adam) or a CT source (data.preset / "
                "data.root of volumes)."
            )
        self.images, self.spec, self.seed = images, spec, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    @property
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """Crops always stack; whole images stack when they share a size, else stay a list."""
        return functools.partial(collate_volumes, stack=True if self.spec.mode == "crop" else None)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = self.images[idx]
        if self.spec.mode == "whole":
            return item
        img = item["image"]
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        crops = []
        for _ in range(self.spec.views):  # views of ONE image, drawn one after another from its rng
            slices, pads = crop_window(img.shape[1:], self.spec.crop_size, rng)  # type: ignore[arg-type]
            crop = img[(slice(None), *slices)]
            if any(p != (0, 0) for p in pads):
                crop = F.pad(crop, [v for pair in reversed(pads) for v in pair])  # last axis first
            crops.append(crop.contiguous())
        return {**item, "image": crops[0] if self.spec.views == 1 else torch.stack(crops)}


def dataset_2d(data: DataConfig, spec: SampleSpec | None = None, seed: int = 0) -> Dataset:
    """The 2D dataset ``data:`` names (see the module docstring): whole images, or, given a
    ``spec``, what it asks for (``SampledImages2D``; ``seed`` draws the crops)."""
    images = _images_2d(data)
    if spec is None:
        return images
    return SampledImages2D(images, spec, seed, source=f"2D images ({data.preset or data.root})")


def _images_2d(data: DataConfig) -> Dataset:
    if data.preset == DRR_PRESET:
        return PhantomDRRDataset(DRR_SUBJECTS, seed=0)  # fixed subjects: the data do not follow train.seed
    if data.root is None:
        raise DataError(
            f"data.root is not set: give the folder of {data.preset or '2D'} images (data.root=PATH)."
        )
    root = Path(data.root).expanduser()
    if data.preset == "chestxray14":
        from asa3d.data.presets_2d import load_preset_2d

        return Image2DDataset(load_preset_2d("chestxray14", root, data.split).items)
    js = _json_of(root)
    if js is not None:
        return Image2DDataset(_json_items(js, data.split))
    from asa3d.data.datalist2d import load_folder_2d

    return Image2DDataset(load_folder_2d(root, data.split).items)

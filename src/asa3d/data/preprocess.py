"""Canonical preprocessing as a MONAI transform chain: RAS -> spacing -> HU window to [0, 1].

``LoadVolumed`` puts our reader (``asa3d.data.io``) inside MONAI, so a MONAI pipeline and the
cache see the same array and RAS affine for every format (MONAI's own ITKReader and
NibabelReader agree with it on NIfTI; for DICOM/MHD we keep one reader so there is one geometry
convention to test).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Orientationd, ScaleIntensityRanged, Spacingd

from asa3d.config_sections import PreprocessConfig
from asa3d.data.io import Volume, read_volume


def to_metatensor(vol: Volume, dtype: torch.dtype | None = torch.float32) -> MetaTensor:
    """(1, x, y, z) channel-first MetaTensor carrying the RAS affine (MONAI's convention)."""
    arr = np.ascontiguousarray(vol.array)
    t = torch.from_numpy(arr.astype(np.float32) if dtype == torch.float32 else arr)[None]
    meta = {
        "filename_or_obj": str(vol.path),
        "original_affine": torch.as_tensor(vol.affine, dtype=torch.float64),
        "spatial_shape": np.asarray(vol.shape),
        "space": "RAS",
        "original_channel_dim": "no_channel",
    }
    return MetaTensor(t, affine=torch.as_tensor(vol.affine, dtype=torch.float64), meta=meta)


class LoadVolumed(MapTransform):
    """Dictionary transform: read ``keys`` with ``asa3d.data.io.read_volume`` into channel-first
    MetaTensors (images float32, keys listed in ``label_keys`` kept as integers)."""

    def __init__(
        self, keys: KeysCollection, label_keys: Sequence[str] = ("label",), allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            vol = read_volume(d[key])
            if key in self.label_keys:
                vol.array = vol.array.astype(np.int16 if vol.array.max() > 255 else np.uint8)
                d[key] = to_metatensor(vol, dtype=None)
            else:
                d[key] = to_metatensor(vol)
        return d


def canonical_transforms(cfg: PreprocessConfig, with_labels: bool = False, load: bool = False) -> Compose:
    """The canonical chain on dicts {"image", "label"?} of channel-first MetaTensors (or of paths
    when ``load``). Label: nearest-neighbour resampling, never intensity-scaled."""
    keys = ["image", "label"] if with_labels else ["image"]
    modes = [cfg.image_interp, "nearest"] if with_labels else [cfg.image_interp]
    chain: list = [LoadVolumed(keys)] if load else []
    chain += [
        Orientationd(keys=keys, axcodes=cfg.orientation, labels=None),
        Spacingd(keys=keys, pixdim=tuple(cfg.spacing), mode=modes, dtype=[np.float32] * len(keys)),
        ScaleIntensityRanged(
            keys=["image"], a_min=cfg.window[0], a_max=cfg.window[1], b_min=0.0, b_max=1.0, clip=True
        ),
    ]
    return Compose(chain)


def preprocess_volumes(
    image: Volume, label: Volume | None, cfg: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Apply the canonical chain; returns (image float32 (x, y, z) in [0, 1], label int or None,
    RAS affine after preprocessing)."""
    d: dict[str, Any] = {"image": to_metatensor(image)}
    if label is not None:
        d["label"] = to_metatensor(label)  # float for resampling; nearest keeps the class values exact
    out = canonical_transforms(cfg, with_labels=label is not None)(d)
    img = out["image"]
    affine = np.asarray(img.affine, dtype=float)
    img_np = img.as_tensor().numpy()[0].astype(np.float32, copy=False)
    lab_np = None
    if label is not None:
        lab = np.rint(out["label"].as_tensor().numpy()[0])
        lab_np = lab.astype(np.uint8 if lab.max() <= 255 else np.int16)
    return img_np, lab_np, affine

"""2D images are delivered as the method's SampleSpec asks: whole, seeded crops (padded where the
image is smaller), several views of one image; a 3D spec is refused with the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from asa3d.config import from_dict
from asa3d.config_sections import PretrainConfig
from asa3d.data.dataset2d import SampledImages2D
from asa3d.data.errors import DataError
from asa3d.data.sampling import SampleSpec
from asa3d.engine.trainer import default_dataset_factory

H, W = 20, 30


class _Images(Dataset):
    """Distinct positive values everywhere (``idx * 1000 + raster index + 1``), so a crop matches
    exactly one window of its image and padding (zeros) is unmistakable."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, idx: int) -> dict[str, Any]:
        img = (torch.arange(H * W, dtype=torch.float32).reshape(1, H, W) + 1 + 1000 * idx) / 4096
        return {"image": img, "id": f"img{idx}"}


def _origin(img: torch.Tensor, crop: torch.Tensor) -> tuple[int, int]:
    """Where ``crop`` (1, h, w) sits in ``img`` (1, H, W); asserts it is exactly one window of it."""
    h, w = crop.shape[1:]
    hits = [
        (r, c)
        for r in range(img.shape[1] - h + 1)
        for c in range(img.shape[2] - w + 1)
        if torch.equal(crop, img[:, r : r + h, c : c + w])
    ]
    assert len(hits) == 1, hits
    return hits[0]


def test_whole_spec_returns_the_image_unchanged() -> None:
    base = _Images()
    ds = SampledImages2D(base, SampleSpec(spatial_dims=2))
    assert torch.equal(ds[1]["image"], base[1]["image"]) and ds[1]["id"] == "img1"
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["image"].shape == (2, 1, H, W)


def test_crops_are_seeded_windows_of_the_image() -> None:
    base = _Images()
    spec = SampleSpec(mode="crop", crop_size=(8, 12), spatial_dims=2)
    ds = SampledImages2D(base, spec, seed=3)
    first = ds[2]["image"]
    assert first.shape == (1, 8, 12)
    _origin(base[2]["image"], first)
    assert torch.equal(SampledImages2D(base, spec, seed=3)[2]["image"], first)  # (seed, epoch, idx)
    origins = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        origins.add(_origin(base[2]["image"], ds[2]["image"]))
    assert len(origins) > 1  # the window moves with the epoch


def test_views_are_independent_crops_of_one_image_and_stack() -> None:
    base = _Images()
    spec = SampleSpec(mode="crop", crop_size=(8, 8), views=3, spatial_dims=2)
    ds = SampledImages2D(base, spec, seed=0)
    s = ds[0]["image"]
    assert s.shape == (3, 1, 8, 8)
    origins = {_origin(base[0]["image"], v) for v in s}  # each view is a window of image 0
    assert len(origins) > 1
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 1, 8, 8) and batch["id"] == ["img0", "img1"]


def test_crop_larger_than_the_image_is_padded_symmetrically() -> None:
    base = _Images()
    ds = SampledImages2D(base, SampleSpec(mode="crop", crop_size=(H + 4, 10), spatial_dims=2))
    img, crop = base[0]["image"], ds[0]["image"]
    assert crop.shape == (1, H + 4, 10)
    assert (crop[:, :2] == 0).all() and (crop[:, -2:] == 0).all()  # 2 rows of zeros each side
    r, _ = _origin(img, crop[:, 2:-2])
    assert r == 0


def test_a_3d_spec_on_2d_images_is_refused() -> None:
    with pytest.raises(DataError, match="asks for 3D volumes.*method.spatial_dims=2"):
        SampledImages2D(_Images(), SampleSpec(mode="crop", crop_size=(8, 8, 8)))


def test_the_engine_factory_serves_specs_from_an_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 28), dtype=np.uint8)).save(tmp_path / f"x{i}.png")
    cfg = from_dict(PretrainConfig, {"method": {"name": "adam"}, "data": {"root": str(tmp_path)}})
    factory = default_dataset_factory(cfg)
    two = factory("adam", SampleSpec(mode="crop", crop_size=(16, 16), views=2, spatial_dims=2))
    assert len(two) == 3 and two[0]["image"].shape == (2, 1, 16, 16)
    whole = factory("adam", SampleSpec(spatial_dims=2))[0]["image"]
    _origin(whole, two[0]["image"][0])  # crops of the image as read, in [0, 1]
    assert float(whole.min()) >= 0.0 and float(whole.max()) <= 1.0
    with pytest.raises(DataError, match="asks for 3D volumes"):
        factory("adam", SampleSpec())

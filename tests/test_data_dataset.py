"""CachedVolumeDataset: whole volumes, seeded crops (per seed/epoch/idx), padding, balanced crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from asa3d.config_sections import DataConfig, PreprocessConfig
from asa3d.data.dataset import CachedVolumeDataset, collate_volumes
from asa3d.data.prepare import ensure_cache
from asa3d.data.sampling import SampleSpec

CROP = SampleSpec(mode="crop", crop_size=(32, 32, 32))


@pytest.fixture(scope="module")
def index(phantom_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = DataConfig(
        root=str(phantom_dataset),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        num_workers=1,
        preprocess=PreprocessConfig(spacing=(6.0, 6.0, 8.0)),
    )
    return ensure_cache(cfg, with_labels=True)


def test_whole_volumes(index) -> None:
    ds = CachedVolumeDataset(index, SampleSpec(), with_labels=True)
    s = ds[0]
    assert s["image"].shape == (1, *index.cases[0].shape) and s["image"].dtype == torch.float32
    assert s["label"].dtype == torch.int64 and s["id"] == index.cases[0].id
    assert float(s["image"].min()) >= 0.0 and float(s["image"].max()) <= 1.0
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=ds.collate_fn)))
    assert isinstance(batch["image"], list) and len(batch["image"]) == 2 and batch["id"] == ds.index.ids[:2]


def test_crop_determinism(index) -> None:
    ds = CachedVolumeDataset(index, CROP, seed=3, with_labels=True)
    a = ds[1]
    b = CachedVolumeDataset(index, CROP, seed=3, with_labels=True)[1]
    assert a["image"].shape == (1, 32, 32, 32) and torch.equal(a["image"], b["image"])
    assert torch.equal(a["label"], b["label"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], a["image"])  # a new epoch draws new crops
    ds.set_epoch(0)
    assert torch.equal(ds[1]["image"], a["image"])  # ... and a resumed epoch the same ones
    assert not torch.equal(CachedVolumeDataset(index, CROP, seed=4)[1]["image"], a["image"])
    # the crop is the matching window of the whole volume
    whole = index.cases[1].image()
    rng = np.random.default_rng([3, 0, 1])
    starts = [int(rng.integers(0, s - 32 + 1)) for s in whole.shape]
    np.testing.assert_array_equal(a["image"][0].numpy(), whole[tuple(slice(s, s + 32) for s in starts)])
    batch = collate_volumes([ds[0], ds[1]])
    assert batch["image"].shape == (2, 1, 32, 32, 32) and batch["label"].shape == (2, 1, 32, 32, 32)


def test_crop_padding(index) -> None:
    shape = index.cases[0].shape
    big = SampleSpec(mode="crop", crop_size=(shape[0] + 6, 16, shape[2] + 3))
    s = CachedVolumeDataset(index, big, with_labels=True)[0]
    assert s["image"].shape == (1, shape[0] + 6, 16, shape[2] + 3)
    img, lab = s["image"][0], s["label"][0]
    assert float(img[:3].abs().max()) == 0.0 and float(img[-3:].abs().max()) == 0.0  # zero padding
    assert int(lab[:3].max()) == 0 and int(lab[:, :, :1].max()) == 0


def test_balanced_crops_hit_foreground(index) -> None:
    spec = SampleSpec(mode="crop", crop_size=(8, 8, 8))
    ds = CachedVolumeDataset(index, spec, seed=0, with_labels=True, balanced=True)
    plain = CachedVolumeDataset(index, spec, seed=0, with_labels=True)
    hits = {"balanced": 0, "plain": 0}
    for epoch in range(6):
        for name, d in (("balanced", ds), ("plain", plain)):
            d.set_epoch(epoch)
            hits[name] += sum(int(d[i]["label"].max() > 0) for i in range(len(d)))
    n = 6 * len(ds)
    assert hits["balanced"] >= n // 2 and hits["balanced"] >= hits["plain"]
    with pytest.raises(ValueError, match="balanced crops need"):
        CachedVolumeDataset(index, spec, balanced=True)


def _found_in(volume: np.ndarray, crop: np.ndarray) -> bool:
    """Whether ``crop`` is a sub-block of ``volume`` (unpadded crops only)."""
    cx, cy, cz = crop.shape
    vx, vy, vz = volume.shape
    for i in range(vx - cx + 1):
        for j in range(vy - cy + 1):
            for k in range(vz - cz + 1):
                if np.array_equal(volume[i : i + cx, j : j + cy, k : k + cz], crop):
                    return True
    return False


def test_several_views_come_from_the_same_volume(index) -> None:
    spec = SampleSpec(mode="crop", crop_size=(16, 16, 16), views=2)
    ds = CachedVolumeDataset(index, spec, seed=5, with_labels=True)
    s = ds[2]
    assert s["image"].shape == (2, 1, 16, 16, 16) and s["label"].shape == (2, 1, 16, 16, 16)
    vol = index.cases[2].image()
    assert all(_found_in(vol, s["image"][v, 0].numpy()) for v in range(2))
    assert not torch.equal(s["image"][0], s["image"][1])  # two independent crops
    # the first view is the crop a one-view spec draws (same rng stream)
    one = CachedVolumeDataset(
        index, SampleSpec(mode="crop", crop_size=(16, 16, 16)), seed=5, with_labels=True
    )
    assert torch.equal(one[2]["image"], s["image"][0])
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=ds.collate_fn)))
    assert batch["image"].shape == (2, 2, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="views > 1 needs mode='crop'"):
        SampleSpec(views=2)


def test_2d_slices_from_cached_volumes(index) -> None:
    ds = CachedVolumeDataset(index, SampleSpec(mode="crop", crop_size=(24, 24), spatial_dims=2), seed=1)
    s = ds[0]
    assert s["image"].shape == (1, 24, 24)
    vol = index.cases[0].image()
    assert _found_in(vol, s["image"][0].numpy()[..., None])  # one axial slice of the volume
    whole = CachedVolumeDataset(index, SampleSpec(spatial_dims=2), seed=1)[0]["image"]
    assert whole.shape == (1, *index.cases[0].shape[:2])
    with pytest.raises(ValueError, match="crop_size of 2 sides"):
        SampleSpec(mode="crop", crop_size=(24, 24, 24), spatial_dims=2)

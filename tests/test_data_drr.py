"""DRRs of CT volumes: line integrals by hand, radiograph layout, projected multi-label masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from asa3d.data.drr import MU_WATER_PER_MM, phantom_drr, project_labels, radiograph, write_drr_dataset
from asa3d.data.errors import DataError
from asa3d.data.io2d import read_image2d


def test_line_integral_by_hand_and_layout() -> None:
    hu = np.full((4, 3, 5), -1000.0, np.float32)  # (x, y, z): air
    hu[0, :, 4] = [0.0, 1000.0, -1000.0]  # x=0: the patient's far left, the most superior slice
    hu[3, :, 0] = [-2000.0, 0.0, 0.0]  # below -1000 HU: mu clipped at 0, not negative
    img, p = radiograph(hu, spacing=(1.0, 2.5, 1.0), body_only=False, window=None)
    assert p.shape == img.shape == (5, 4)  # rows = z, cols = x
    # row 0 = the most superior slice (z=4); col 0 = the largest x (the patient's right on the left)
    assert p[0, 3] == pytest.approx(MU_WATER_PER_MM * (1 + 2 + 0) * 2.5)
    assert p[4, 0] == pytest.approx(MU_WATER_PER_MM * (0 + 1 + 1) * 2.5)
    assert np.count_nonzero(p) == 2
    assert img.min() == 0.0 and img.max() == 1.0 and img[0, 3] == 1.0


def test_body_only_leaves_the_table_out() -> None:
    hu = np.full((12, 12, 4), -1000.0, np.float32)
    hu[3:9, 4:10, :] = 40.0  # the body
    hu[5:7, 6:8, :] = -850.0  # lungs, enclosed: still the body
    hu[:, 1, :] = 150.0  # a table slab, not touching the body
    _, with_table = radiograph(hu, (1.0, 1.0, 1.0), body_only=False, window=None)
    _, body = radiograph(hu, (1.0, 1.0, 1.0), body_only=True, window=None)
    assert (with_table[:, 0] > 0).all() and np.allclose(body[:, 0], 0.0)  # col 0 = x 11: only the table
    mu = lambda v: MU_WATER_PER_MM * (1 + v / 1000)  # noqa: E731
    assert body[0, 12 - 1 - 5] == pytest.approx(4 * mu(40.0) + 2 * mu(-850.0), rel=1e-5)


def test_masks_project_any_voxel_on_the_ray_and_overlap() -> None:
    lab = np.zeros((4, 3, 5), np.uint8)
    lab[1, 0, 2] = 1  # organ 1 in front ...
    lab[1, 2, 2] = 2  # ... organ 2 behind it on the same ray
    lab[2, 1, 0] = 2
    m = project_labels(lab, classes=[1, 2, 3])
    assert m.shape == (3, 5, 4) and m.dtype == np.uint8
    assert m[0, 2, 2] == 1 and m[1, 2, 2] == 1  # both organs at the shared pixel
    assert m[1, 4, 1] == 1 and m[0].sum() == 1 and m[1].sum() == 2 and m[2].sum() == 0


def test_phantom_drr_looks_like_a_chest_radiograph() -> None:
    d = phantom_drr((0, 0), shape=(32, 28, 32), spacing=(12.0, 12.0, 12.0))
    assert d.image.shape == (32, 32) and d.image.dtype == np.float32
    assert d.image.min() >= 0.0 and d.image.max() <= 1.0
    assert d.masks.shape == (13, 32, 32) and d.names[12] == "lungs" and d.spacing == (12.0, 12.0)
    lungs, spine = d.masks[d.names.index("lungs")], d.masks[d.names.index("vertebrae")]
    assert lungs.any() and spine.any()
    assert d.image[(lungs == 1) & (spine == 0)].mean() < d.image[spine == 1].mean()  # air dark, bone bright
    assert (lungs[:, :16].any(), lungs[:, 16:].any()) == (True, True)
    assert lungs[:4].sum() > lungs[-4:].sum()  # lungs above (rows on top), abdomen below


def test_write_drr_dataset_round_trip(tmp_path: Path) -> None:
    js = write_drr_dataset(
        tmp_path / "drr", n=2, shape=(24, 20, 16), spacing=(16.0, 16.0, 16.0), n_validation=1
    )
    doc = json.loads(js.read_text())
    assert [e["id"] for e in doc["training"]] == ["drr_000"] and [e["id"] for e in doc["validation"]] == [
        "drr_001"
    ]
    assert doc["mask_channels"][0] == "spleen" and doc["spatial_dims"] == 2
    ref = phantom_drr((0, 1), shape=(24, 20, 16), spacing=(16.0, 16.0, 16.0))
    img = read_image2d(js.parent / doc["validation"][0]["image"])
    assert img.bits == 16 and np.abs(img.to_unit() - ref.image).max() <= 0.5 / 65535 + 1e-7
    with np.load(js.parent / doc["validation"][0]["mask"]) as z:
        assert np.array_equal(z["masks"], ref.masks) and list(z["names"]) == ref.names
    with pytest.raises(DataError, match="exists already"):
        write_drr_dataset(tmp_path / "drr", n=1, shape=(24, 20, 16), spacing=(16.0, 16.0, 16.0))

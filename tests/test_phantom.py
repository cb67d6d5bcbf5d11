"""The procedural CT phantom: determinism, anatomy, HU ranges, geometry and the data set writer."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from asa3d.data.montage import MontageRow, oriented_slice, render_montage, render_side_by_side
from asa3d.data.phantom import PHANTOM_LABELS, make_phantom, write_phantom_dataset

DEFAULT = ((96, 96, 80), (4.0, 4.0, 4.0))
SMALL = ((64, 64, 48), (6.0, 6.0, 8.0))  # the shape the shared conftest fixture uses
ORGANS = [k for k in PHANTOM_LABELS if k > 0]
NAME = {v: k for k, v in PHANTOM_LABELS.items()}


@cache
def phantom(seed: int, grid: tuple = DEFAULT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, label, affine = make_phantom(seed, *grid)
    for a in (image, label, affine):
        a.setflags(write=False)  # shared between tests
    return image, label, affine


def centroid_mm(label: np.ndarray, affine: np.ndarray, k: int) -> np.ndarray:
    idx = np.argwhere(label == k).mean(0)
    return nib.affines.apply_affine(affine, idx)


def test_label_table() -> None:
    assert PHANTOM_LABELS[0] == "background"
    assert sorted(PHANTOM_LABELS) == list(range(len(PHANTOM_LABELS)))
    assert len(ORGANS) >= 10
    assert len(set(PHANTOM_LABELS.values())) == len(PHANTOM_LABELS)
    for name in ("spleen", "liver", "aorta", "inferior vena cava", "pancreas", "bladder", "gallbladder"):
        assert name in NAME


@pytest.mark.parametrize("grid", [DEFAULT, SMALL])
def test_shape_dtype_affine(grid: tuple) -> None:
    shape, spacing = grid
    image, label, affine = phantom(0, grid)
    assert image.shape == label.shape == shape
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert affine.shape == (4, 4)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), spacing)
    # The volume centre is the world origin.
    centre = nib.affines.apply_affine(affine, (np.array(shape) - 1) / 2)
    np.testing.assert_allclose(centre, 0, atol=1e-6)
    assert set(np.unique(label).tolist()) <= set(PHANTOM_LABELS)
    assert image.min() >= -1024 and image.max() <= 3071


def test_deterministic_bitwise() -> None:
    a = make_phantom(7, *SMALL)
    b = make_phantom(7, *SMALL)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        assert np.array_equal(x, y)


def test_different_seeds_differ() -> None:
    (ia, la, _), (ib, lb, _) = phantom(0, SMALL), phantom(1, SMALL)
    assert not np.array_equal(ia, ib)
    # Not only the noise: the anatomy (labels) changes too.
    assert np.mean(la != lb) > 0.01
    sizes_a = np.bincount(la.ravel(), minlength=len(PHANTOM_LABELS))
    sizes_b = np.bincount(lb.ravel(), minlength=len(PHANTOM_LABELS))
    assert not np.array_equal(sizes_a, sizes_b)


@pytest.mark.parametrize("grid", [DEFAULT, SMALL])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_organ_present(seed: int, grid: tuple) -> None:
    _, label, _ = phantom(seed, grid)
    counts = np.bincount(label.ravel(), minlength=len(PHANTOM_LABELS))
    missing = [PHANTOM_LABELS[k] for k in ORGANS if counts[k] == 0]
    assert not missing, f"empty labels: {missing}"


# (label name, low, high) for the median HU inside the label.
HU_RANGES = [
    ("liver", 40, 130),
    ("spleen", 60, 160),
    ("pancreas", 40, 130),
    ("gallbladder", -5, 40),
    ("bladder", -20, 30),
    ("aorta", 120, 300),
    ("inferior vena cava", 90, 250),
    ("portal and splenic vein", 90, 250),
    ("right kidney", 60, 220),
    ("left kidney", 60, 220),
    ("vertebrae", 300, 1200),
    ("lungs", -1000, -600),
]


@pytest.mark.parametrize("seed", [0, 1])
def test_median_hu_per_organ(seed: int) -> None:
    image, label, _ = phantom(seed)
    bad = {}
    for name, lo, hi in HU_RANGES:
        med = float(np.median(image[label == NAME[name]]))
        if not lo <= med <= hi:
            bad[name] = med
    assert not bad, f"median HU out of range: {bad}"


def test_kidney_cortex_brighter_than_medulla() -> None:
    image, label, _ = phantom(0)
    for k in (NAME["right kidney"], NAME["left kidney"]):
        kidney = ndimage.binary_fill_holes(label == k)
        rim = ndimage.binary_erosion(kidney, iterations=1) & ~ndimage.binary_erosion(kidney, iterations=2)
        core = ndimage.binary_erosion(kidney, iterations=3) & (label == k)
        assert rim.sum() > 20 and core.sum() > 5
        assert np.median(image[rim]) > np.median(image[core]) + 40


def test_body_wall_air_and_fat() -> None:
    image, _, _ = phantom(0)
    # Air outside the body: the anterior corners of the field of view.
    assert np.median(image[:8, -8:, :]) < -950 and np.median(image[-8:, -8:, :]) < -950
    # Subcutaneous fat: 1-2 voxels (4-12 mm) under the anterior skin, in the mid-abdomen.
    mid = slice(image.shape[2] // 2 - 8, image.shape[2] // 2 + 8)
    body = ndimage.binary_fill_holes(image > -400, structure=np.ones((3, 3, 1)))
    ring = ndimage.binary_erosion(body, iterations=1) & ~ndimage.binary_erosion(body, iterations=3)
    ring[:, : image.shape[1] // 2 + 10, :] = False  # anterior part only (the table is behind)
    ring[:, :, : mid.start] = False
    ring[:, :, mid.stop :] = False
    assert ring.sum() > 100
    assert np.median(image[ring]) < -50
    # Walking in from the anterior skin on the midline: skin, fat, then the muscle wall.
    cx = image.shape[0] // 2
    profile = np.median(image[cx - 2 : cx + 3, :, mid], axis=(0, 2))[::-1]  # anterior -> posterior
    start = int(np.argmax(profile > -400))
    seg = profile[start : start + 60 // 4]
    i_fat = int(np.argmax(seg < -50))
    assert seg[i_fat] < -50
    after = seg[i_fat:]
    i_mus = int(np.argmax(after > 0))
    assert 0 < after[i_mus] < 120, seg


def test_bone_and_lung_tissue() -> None:
    image, label, _ = phantom(0)
    spine = label == NAME["vertebrae"]
    assert np.percentile(image[spine], 90) > 600  # cortical bone
    # Bone also outside the labels (ribs, pelvis); lung bases at the superior end only.
    assert np.sum((image > 300) & (label == 0)) > 500
    lung_z = np.argwhere(label == NAME["lungs"])[:, 2]
    assert lung_z.min() > image.shape[2] // 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_anatomical_layout(seed: int) -> None:
    _, label, affine = phantom(seed, SMALL)
    c = {name: centroid_mm(label, affine, k) for k, name in PHANTOM_LABELS.items() if k}
    x, y, z = 0, 1, 2  # RAS: +x patient right, +y anterior, +z superior
    assert c["liver"][x] > 20 and c["spleen"][x] < -20
    assert c["right kidney"][x] > c["vertebrae"][x] > c["left kidney"][x]
    assert c["right kidney"][z] < c["left kidney"][z] + 10  # the right kidney sits lower
    assert c["inferior vena cava"][x] > c["aorta"][x]
    assert c["aorta"][x] < c["vertebrae"][x] and c["aorta"][y] > c["vertebrae"][y]
    assert c["gallbladder"][x] > 0 and c["stomach"][x] < 0
    assert c["bladder"][z] < c["right kidney"][z] < c["liver"][z] < c["lungs"][z]
    assert c["bladder"][y] > c["vertebrae"][y]


def test_resolution_independent_anatomy() -> None:
    coarse = ((64, 64, 40), (6.0, 6.0, 8.0))  # same field of view as DEFAULT, other voxels
    _, la, aa = phantom(2, DEFAULT)
    _, lb, ab = phantom(2, coarse)
    va, vb = np.prod(DEFAULT[1]), np.prod(coarse[1])
    for k in (NAME["liver"], NAME["right kidney"], NAME["spleen"], NAME["aorta"], NAME["bladder"]):
        np.testing.assert_allclose(centroid_mm(la, aa, k), centroid_mm(lb, ab, k), atol=4.0)
        vol_a, vol_b = (la == k).sum() * va, (lb == k).sum() * vb
        assert abs(vol_a - vol_b) / vol_a < 0.1, PHANTOM_LABELS[k]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        make_phantom(0, (64, 64), (6.0, 6.0))
    with pytest.raises(ValueError):
        make_phantom(0, (64, 64, 48), (6.0, 0.0, 8.0))
    with pytest.raises(ValueError):
        write_phantom_dataset("/nonexistent-never-written", n=2, n_validation=3)


def test_dataset_round_trip(phantom_dataset: Path) -> None:
    doc = json.loads(phantom_dataset.read_text())
    root = phantom_dataset.parent
    assert doc["modality"] == {"0": "CT"}
    assert {int(k): v for k, v in doc["labels"].items()} == PHANTOM_LABELS
    assert len(doc["training"]) == 4 and len(doc["validation"]) == 2 and doc["numTraining"] == 4
    entries = doc["training"] + doc["validation"]
    assert [e["image"] for e in entries] == [f"imagesTr/phantom_{i:03d}.nii.gz" for i in range(6)]
    for i, e in enumerate(entries):
        assert not Path(e["image"]).is_absolute() and not Path(e["label"]).is_absolute()
        img, lab = nib.load(root / e["image"]), nib.load(root / e["label"])
        assert img.shape == lab.shape == SMALL[0]
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.header.get_zooms(), SMALL[1])
        np.testing.assert_allclose(img.affine, lab.affine)
        if i in (0, 5):  # the files hold exactly subject (seed, i)
            image, label, affine = make_phantom((0, i), *SMALL)
            assert np.array_equal(np.asarray(img.dataobj), image)
            assert np.array_equal(np.asarray(lab.dataobj), label)
            np.testing.assert_allclose(img.affine, affine)


def test_subject_independent_of_n(phantom_dataset: Path, tmp_path: Path) -> None:
    small = write_phantom_dataset(tmp_path, n=2, seed=0, shape=SMALL[0], spacing=SMALL[1])
    doc = json.loads(small.read_text())
    assert len(doc["training"]) == 2 and doc["validation"] == []
    for i in range(2):
        name = f"phantom_{i:03d}.nii.gz"
        for sub in ("imagesTr", "labelsTr"):
            a = np.asarray(nib.load(tmp_path / sub / name).dataobj)
            b = np.asarray(nib.load(phantom_dataset.parent / sub / name).dataobj)
            assert np.array_equal(a, b)
    other_seed = write_phantom_dataset(tmp_path / "s1", n=1, seed=1, shape=SMALL[0], spacing=SMALL[1])
    a = np.asarray(nib.load(other_seed.parent / "labelsTr/phantom_000.nii.gz").dataobj)
    assert not np.array_equal(a, np.asarray(nib.load(tmp_path / "labelsTr/phantom_000.nii.gz").dataobj))


def test_montage_orientation_is_radiological() -> None:
    vol = np.zeros((10, 8, 6), np.float32)
    vol[9, 4, 3] = 1  # patient's far right
    vol[5, 7, 3] = 2  # most anterior
    vol[5, 4, 5] = 3  # most superior
    ax = oriented_slice(vol, "axial", (5, 4, 3))
    assert ax.shape == (8, 10)  # rows = y (A->P), columns = x (R->L)
    assert ax[:, 0].max() == 1  # patient right on the image left
    assert ax[0, :].max() == 2  # anterior on top
    cor = oriented_slice(vol, "coronal", (5, 4, 3))
    assert cor[0, :].max() == 3 and cor[:, 0].max() == 1  # superior on top, right on the left
    sag = oriented_slice(vol, "sagittal", (5, 4, 3))
    assert sag[0, :].max() == 3  # superior on top


def test_render_montage_writes_png(tmp_path: Path) -> None:
    image, label, _ = phantom(0, SMALL)
    out = render_montage(
        image, label, tmp_path / "m.png", spacing=SMALL[1], title="t", label_names=PHANTOM_LABELS
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = render_side_by_side(
        [
            MontageRow(image, label, SMALL[1], "a", "label"),
            MontageRow((image + 1024) / 4095.0, None, SMALL[1], "b"),
        ],
        tmp_path / "s.png",
        window=None,
    )
    assert out2.stat().st_size > 10_000

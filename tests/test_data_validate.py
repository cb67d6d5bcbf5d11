"""Every bad input gives a DataError (or warning) whose message names the file and the fix."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asa3d.data.errors import DataError
from asa3d.data.io import Volume, read_volume, write_volume
from asa3d.data.validate import IntensityWarning, validate_image, validate_label

AFF = np.diag([2.0, 2.0, 3.0, 1.0])


def ct(shape=(12, 10, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)


def save(arr: np.ndarray, path: Path, affine: np.ndarray = AFF) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def test_truncated_nifti(tmp_path: Path) -> None:
    good = save(ct((40, 40, 30)), tmp_path / "good.nii.gz")
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz.*truncated or corrupt"):
        read_volume(bad)
    raw = tmp_path / "cut.nii"  # uncompressed, cut inside the voxel data
    raw.write_bytes(gzip.decompress(good.read_bytes())[:5000])
    with pytest.raises(DataError, match=r"cut\.nii"):
        read_volume(raw)


def test_truncated_mhd(tmp_path: Path) -> None:
    p = write_volume(ct(), tmp_path / "scan.mhd", AFF)
    data = next(f for f in tmp_path.iterdir() if f.suffix in (".raw", ".zraw"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(DataError, match=r"scan\.mhd.*truncated"):
        read_volume(p)


def test_not_3d(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"flat\.nii\.gz.*expected a 3D volume"):
        read_volume(save(ct((12, 10)), tmp_path / "flat.nii.gz"))
    with pytest.raises(DataError, match=r"slice\.nii\.gz.*2D slice"):
        read_volume(save(ct((12, 10, 1)), tmp_path / "slice.nii.gz"))
    with pytest.raises(DataError, match=r"multi\.nii\.gz.*4th axis has length 1"):
        read_volume(save(ct((12, 10, 8, 2)), tmp_path / "multi.nii.gz"))
    vol = read_volume(save(ct((12, 10, 8, 1)), tmp_path / "single.nii.gz"))  # squeezed
    assert vol.shape == (12, 10, 8)


def test_missing_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.nii\.gz: file not found"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"scan\.png: unsupported file type"):
        read_volume(tmp_path / "scan.png")
    (tmp_path / "empty_series").mkdir()
    with pytest.raises(DataError, match=r"empty_series: no DICOM series"):
        read_volume(tmp_path / "empty_series")


def test_nan_inf(tmp_path: Path) -> None:
    a = ct().astype(np.float32)
    a[1, 2, 3] = np.nan
    a[0, 0, 0] = np.inf
    vol = read_volume(save(a, tmp_path / "nan.nii.gz"))
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 2 voxel\(s\) are NaN/inf.*skip-bad"):
        validate_image(vol)


def test_hu_warnings(tmp_path: Path) -> None:
    norm = read_volume(
        save(np.random.default_rng(0).random((12, 10, 8)).astype(np.float32), tmp_path / "n.nii.gz")
    )
    with pytest.warns(IntensityWarning, match=r"n\.nii\.gz.*within \[0, 1\]"):
        assert validate_image(norm)
    mri = read_volume(save(np.full((12, 10, 8), 300, np.int16), tmp_path / "mr.nii.gz"))
    with pytest.warns(IntensityWarning, match=r"mr\.nii\.gz.*minimum 300 > -200"):
        validate_image(mri)
    low = read_volume(save(np.full((12, 10, 8), -900, np.int16), tmp_path / "low.nii.gz"))
    with pytest.warns(IntensityWarning, match=r"low\.nii\.gz.*maximum -900 < 100"):
        validate_image(low)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_image(Volume(ct(), AFF, tmp_path / "ok.nii.gz")) == []


def test_label_mismatches(tmp_path: Path) -> None:
    img = Volume(ct(), AFF, tmp_path / "img.nii.gz")
    lab = np.zeros((12, 10, 8), np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    with pytest.raises(DataError, match=r"lab_shape\.nii\.gz: label shape \(12, 10, 7\).*img\.nii\.gz"):
        validate_label(Volume(lab[:, :, :7], AFF, tmp_path / "lab_shape.nii.gz"), img)
    shifted = AFF.copy()
    shifted[0, 3] = 5.0
    with pytest.raises(DataError, match=r"lab_aff\.nii\.gz: label affine does not match.*Resample"):
        validate_label(Volume(lab, shifted, tmp_path / "lab_aff.nii.gz"), img)
    lab[0, 0, 0] = 7
    with pytest.raises(DataError, match=r"lab_vals\.nii\.gz: label values \[7\] are not among.*\[0, 1, 2\]"):
        validate_label(Volume(lab, AFF, tmp_path / "lab_vals.nii.gz"), img, classes=[0, 1, 2])
    validate_label(Volume(lab, AFF + 1e-5 * (AFF != 0), tmp_path / "ok.nii.gz"), img, classes=range(8))
    frac = lab.astype(np.float32)
    frac[1, 1, 1] = 0.5
    with pytest.raises(DataError, match=r"frac\.nii\.gz: label map holds non-integer"):
        validate_label(Volume(frac, AFF, tmp_path / "frac.nii.gz"), img)

"""Every bad input gives a DataError (or warning) whose message names the file and the fix."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asa3d.data.errors import DataError
from asa3d.data.io import Volume, read_volume, write_volume
from asa3d.data.validate import (
    IntensityWarning,
    check_finite,
    hu_warning,
    smaller_than_crop,
    validate_image,
    validate_label,
)

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


# exact messages, HU-check boundaries and crop notes (what mutation testing found unguarded)
P = Path("/scans/a.nii.gz")


def vol(arr: np.ndarray, affine: np.ndarray = AFF, path: Path = P) -> Volume:
    return Volume(np.asarray(arr), affine, path)


def hu_tail(reasons: str) -> str:
    return (
        f"{P}: intensities do not look like Hounsfield units ({reasons}). The HU window will clip them "
        "wrongly: check the rescale slope/intercept, or that this is CT, not MRI."
    )


@pytest.mark.parametrize(
    ("values", "kinds", "n"),
    [
        ([np.nan, 1.0, 2.0], "NaN", 1),
        ([np.inf, -np.inf, 0.0], "inf", 2),
        ([np.nan, np.inf, 0.0], "NaN/inf", 2),
    ],
)
def test_check_finite_message_counts_and_names_the_kinds(values: list[float], kinds: str, n: int) -> None:
    with pytest.raises(DataError) as e:
        check_finite(vol(np.array(values, np.float32).reshape(1, 1, 3)))
    assert str(e.value) == (
        f"{P}: {n} voxel(s) are {kinds}. Fix or re-export the scan (e.g. replace them with -1024 HU), "
        "or pass --skip-bad / data.skip_bad=true to leave it out."
    )
    assert e.value.path == str(P)


def test_check_finite_affine_degenerate_or_not_finite() -> None:
    arr = np.zeros((2, 2, 2), np.int16)
    check_finite(vol(arr))  # a fine header passes
    check_finite(vol(arr, np.diag([1e-3, 1e-3, 1e-3, 1.0])))  # det ~1e-9 is tiny spacing, not degenerate
    flat = np.diag([2.0, 2.0, 0.0, 1.0])
    with pytest.raises(DataError) as e:
        check_finite(vol(arr, flat))
    assert str(e.value) == (
        f"{P}: the header's affine/direction is degenerate ({flat.tolist()}). "
        "Fix the header (spacing and orientation) and export again."
    )
    assert e.value.path == str(P)
    nan_origin = AFF.copy()
    nan_origin[0, 3] = np.nan  # a finite 3x3 but a NaN origin
    with pytest.raises(DataError, match="degenerate"):
        check_finite(vol(arr, nan_origin))
    with pytest.raises(DataError, match="degenerate"):
        check_finite(vol(arr, np.diag([1e-4, 1e-3, 1e-3, 1.0])))  # det 1e-10 < 1e-9
    mirrored = np.diag([-2.0, 2.0, 3.0, 1.0])  # a negative determinant is a valid (flipped) grid
    check_finite(vol(arr, mirrored))


def test_check_finite_ignores_integer_arrays_and_finite_floats() -> None:
    check_finite(vol(np.array([[[0.5, -1000.0]]], np.float32)))
    check_finite(vol(np.array([[[3, -1000]]], np.int16)))


def test_hu_warning_exact_messages_and_boundaries() -> None:
    v = vol(np.zeros((1, 1, 2), np.float32))
    assert hu_warning(v, 0.0, 1.0) == hu_tail("values lie within [0, 1] (0..1): already normalised?")
    # just outside [0, 1] on either side: not "normalised", but not HU either
    assert hu_warning(v, -0.001, 1.0) == hu_tail(
        "minimum -0.001 > -200 (air is about -1000 HU); maximum 1 < 100 (bone is above 300 HU)"
    )
    assert hu_warning(v, 0.0, 1.5) == hu_tail(
        "minimum 0 > -200 (air is about -1000 HU); maximum 1.5 < 100 (bone is above 300 HU)"
    )
    # the HU thresholds themselves are plausible CT
    assert hu_warning(v, -200.0, 100.0) is None
    assert hu_warning(v, -199.0, 100.0) == hu_tail("minimum -199 > -200 (air is about -1000 HU)")
    assert hu_warning(v, -200.0, 99.5) == hu_tail("maximum 99.5 < 100 (bone is above 300 HU)")
    assert hu_warning(v, -1024.0, 3071.0) is None


def test_hu_warning_reads_the_array_unless_both_bounds_are_given() -> None:
    v = vol(np.array([[[-1000.0, 2000.0]]], np.float32))
    assert hu_warning(v) is None
    assert hu_warning(v, lo=0.2) is None  # one bound alone is ignored: both come from the array
    assert hu_warning(v, hi=0.5) is None
    assert hu_warning(v, 0.2, 0.5) == hu_tail("values lie within [0, 1] (0.2..0.5): already normalised?")
    n = vol(np.array([[[0.25, 0.75]]], np.float32))
    assert hu_warning(n, lo=-1000.0) == hu_tail("values lie within [0, 1] (0.25..0.75): already normalised?")


def test_validate_image_emits_only_when_asked() -> None:
    v = vol(np.full((1, 1, 2), 300, np.int16))
    msg = hu_tail("minimum 300 > -200 (air is about -1000 HU)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_image(v, emit=False) == [msg]
    with pytest.warns(IntensityWarning) as rec:
        assert validate_image(v) == [msg]
    assert [str(w.message) for w in rec] == [msg]
    assert not rec[0].filename.endswith("asa3d/data/validate.py")  # stacklevel 2: it points at a caller


def test_validate_label_exact_messages() -> None:
    img = vol(np.zeros((4, 3, 2), np.int16), path=Path("/scans/img.nii.gz"))
    lp = Path("/scans/lab.nii.gz")
    with pytest.raises(DataError) as e:
        validate_label(vol(np.zeros((4, 3, 1), np.uint8), path=lp), img)
    assert str(e.value) == (
        f"{lp}: label shape (4, 3, 1) does not match its image {img.path} of shape (4, 3, 2). Resample "
        "the label onto the image grid (nearest neighbour) or pair the right files."
    )
    assert e.value.path == str(lp)
    moved = AFF.copy()
    moved[:3, 3] = [1.23456, 0.0, -2.0]
    moved[0, 0] = 2.123456
    with pytest.raises(DataError) as e:
        validate_label(vol(np.zeros((4, 3, 2), np.uint8), moved, lp), img)
    assert str(e.value) == (
        f"{lp}: label affine does not match its image {img.path} (label spacing [2.1235, 2.0, 3.0], "
        "orientation RAS, origin [1.235, 0.0, -2.0]; image [2.0, 2.0, 3.0], RAS, [0.0, 0.0, 0.0]). "
        "Resample the label onto the image grid, or fix its header if only the header differs."
    )
    assert e.value.path == str(lp)
    frac = np.zeros((4, 3, 2), np.float32)
    frac[0, 0, 0] = 1.5
    with pytest.raises(DataError) as e:
        validate_label(vol(frac, path=lp), img)
    assert str(e.value) == (
        f"{lp}: label map holds non-integer values. Save class indices as integers (uint8/int16)."
    )
    assert e.value.path == str(lp)
    nan = np.zeros((4, 3, 2), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="non-integer"):
        validate_label(vol(nan, path=lp), img)
    ints_as_float = np.zeros((4, 3, 2), np.float32)
    ints_as_float[1, 1, 1] = 3.0
    validate_label(vol(ints_as_float, path=lp), img, classes=[3])  # whole numbers stored as float are fine


def test_validate_label_affine_tolerance_is_a_thousandth_of_a_mm() -> None:
    img = vol(np.zeros((4, 3, 2), np.int16))  # origin 0: only the absolute tolerance applies there
    near = AFF.copy()
    near[:3, 3] = 5e-4
    validate_label(vol(np.zeros((4, 3, 2), np.uint8), near), img)
    far = AFF.copy()
    far[2, 3] = 2e-3
    with pytest.raises(DataError, match="label affine does not match"):
        validate_label(vol(np.zeros((4, 3, 2), np.uint8), far), img)


def test_validate_label_classes_and_negative_values() -> None:
    img = vol(np.zeros((4, 3, 2), np.int16))
    lp = Path("/scans/lab.nii.gz")
    lab = np.zeros((4, 3, 2), np.int16)
    lab[0, 0, :] = [5, 9]
    lab[1, 0, 0] = 2
    validate_label(vol(lab, path=lp), img, classes=[2, 5, 9])  # background 0 is always allowed
    with pytest.raises(DataError) as e:
        validate_label(vol(lab, path=lp), img, classes=(c for c in [2]))
    assert str(e.value) == (
        f"{lp}: label values [5, 9] are not among the declared classes [0, 2]. Declare them in the "
        "dataset.json 'labels' (or the preset), or remap the label map."
    )
    assert e.value.path == str(lp)
    many = np.arange(24, dtype=np.int16).reshape(4, 3, 2) + 1
    with pytest.raises(DataError) as e:
        validate_label(vol(many, path=lp), img, classes=[1])
    assert f"label values {list(range(2, 22))} are not among" in str(e.value)  # the first 20 only
    neg = np.zeros((4, 3, 2), np.int16)
    neg.flat[:12] = -np.arange(1, 13)
    with pytest.raises(DataError) as e:
        validate_label(vol(neg, path=lp), img)
    assert str(e.value) == (
        f"{lp}: negative label values {list(range(-12, -2))}. Class indices must be >= 0."
    )
    assert e.value.path == str(lp)
    validate_label(vol(np.zeros((4, 3, 2), np.int16), path=lp), img)  # all background, no classes: fine
    neg[...] = -1
    with pytest.raises(DataError, match="negative"):  # undeclared: refused as negative
        validate_label(vol(neg, path=lp), img)
    validate_label(vol(neg, path=lp), img, classes=[-1])


def test_smaller_than_crop_names_each_short_axis() -> None:
    assert smaller_than_crop({"a": (64, 64, 64), "b": (96, 64, 70)}, (64, 64, 64)) == []
    out = smaller_than_crop({"a": (64, 64, 64), "b": (63, 64, 10), "c": (96, 40, 96)}, (64, 64, 64))
    assert out == [
        "case 'b': preprocessed shape (63, 64, 10) is smaller than the crop (64, 64, 64) on axis 0, 2; "
        "training zero-pads it (choose a finer data.preprocess.spacing or a smaller train.crop_size to "
        "avoid padding).",
        "case 'c': preprocessed shape (96, 40, 96) is smaller than the crop (64, 64, 64) on axis 1; "
        "training zero-pads it (choose a finer data.preprocess.spacing or a smaller train.crop_size to "
        "avoid padding).",
    ]
    # a list shape is printed as a tuple; a crop with fewer axes checks only those
    assert smaller_than_crop({"d": [10, 100, 100]}, (64, 64)) == [
        "case 'd': preprocessed shape (10, 100, 100) is smaller than the crop (64, 64) on axis 0; "
        "training zero-pads it (choose a finer data.preprocess.spacing or a smaller train.crop_size to "
        "avoid padding)."
    ]

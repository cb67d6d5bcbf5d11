"""Readers: geometry (RAS affine, orientation, spacing) and HU values identical across formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asa3d.data.io import LPS_TO_RAS, Volume, read_volume, write_volume

TS = "totalsegmentator_tests"


def write_dicom_series(vol: Volume, folder: Path, j2k: bool = False) -> Path:
    """A CT series written with pydicom (stored value = HU + 1024, intercept -1024)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_TO_RAS @ vol.affine
    sx, sy, sz = vol.spacing
    row_dir, col_dir = lps[:3, 0] / sx, lps[:3, 1] / sy
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    data = np.clip(np.rint(vol.array), -1024, 3071).astype(np.int32) + 1024
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.Modality, ds.InstanceNumber = "TEST", "CT", k + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # (between rows, between columns)
        ds.SliceThickness = f"{sz:.4f}"
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        plane = np.ascontiguousarray(data[:, :, k].T.astype(np.uint16))  # (rows=j, cols=i)
        if j2k:
            ds.compress(JPEG2000Lossless, plane)
        else:
            ds.PixelData = plane.tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def small_lps(shared_data: Path) -> Volume:
    """A 40x36x10 crop of a real LPS CT (float32 storage, whole-number HU)."""
    vol = read_volume(shared_data / "ibsi_sts_ct" / "STS_002" / "CT_image.nii.gz")
    aff = vol.affine.copy()
    aff[:3, 3] = vol.affine[:3, :3] @ np.array([60, 50, 20]) + vol.affine[:3, 3]
    return Volume(vol.array[60:100, 50:86, 20:30].astype(np.int16), aff, vol.path)


def test_real_files_geometry(shared_data: Path) -> None:
    import nibabel as nib

    cases = {
        f"{TS}/example_ct.nii.gz": ("RAS", np.int32, (3.0, 3.0, 3.0)),
        "ibsi_sts_ct/STS_002/CT_image.nii.gz": ("LPS", np.float32, (0.977, 0.977, 3.27)),
        "popi_4dct/popi_phase00_2mm.nii.gz": ("LPS", np.int16, (1.953, 1.953, 2.0)),
        f"{TS}/aorta_report/test_result/models/ct_cropped.nii.gz": ("LPS", np.int16, (1.5, 1.5, 1.5)),
    }
    for rel, (orient, dtype, spacing) in cases.items():
        vol = read_volume(shared_data / rel)
        ref = nib.load(str(shared_data / rel))
        assert vol.orientation == orient, rel
        assert vol.array.dtype == dtype, rel
        np.testing.assert_allclose(vol.spacing, spacing, atol=1e-3)
        np.testing.assert_allclose(vol.affine, ref.affine)
        assert vol.shape == ref.shape
        assert vol.array.min() <= -1000 and vol.array.max() > 1000  # HU kept as stored


def test_odd_origin_header_kept(shared_data: Path) -> None:
    full = read_volume(shared_data / TS / "example_ct.nii.gz")
    sm = read_volume(shared_data / TS / "example_ct_sm.nii.gz")
    # the crop is slices 82..111 but its header keeps the full volume's origin: we report the header
    np.testing.assert_allclose(sm.affine, full.affine)
    np.testing.assert_array_equal(sm.array, full.array[:, :, 82:112])


def test_monai_loadimage_agrees(shared_data: Path) -> None:
    from monai.transforms import LoadImage

    from asa3d.data.preprocess import LoadVolumed

    for rel in (f"{TS}/example_ct_sm.nii.gz", "ibsi_sts_ct/STS_008/CT_image.nii.gz"):
        path = shared_data / rel
        ours = LoadVolumed(["image"])({"image": str(path)})["image"]
        theirs = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
        np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy(), atol=1e-5)
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy().astype(np.float32))


def test_same_volume_all_formats(small_lps: Volume, tmp_path: Path) -> None:
    from asa3d.data.io import _read_dicom_pydicom

    paths = {
        "nifti": write_volume(small_lps, tmp_path / "v.nii.gz"),
        "mhd": write_volume(small_lps, tmp_path / "v.mhd"),
        "nrrd": write_volume(small_lps, tmp_path / "v.nrrd"),
        "dicom": write_dicom_series(small_lps, tmp_path / "dcm"),
        "dicom_j2k": write_dicom_series(small_lps, tmp_path / "j2k", j2k=True),
    }
    ref = read_volume(paths["nifti"])
    np.testing.assert_array_equal(ref.array, small_lps.array)
    vols = {k: read_volume(p) for k, p in paths.items()}
    vols["dicom_pydicom"] = _read_dicom_pydicom(paths["dicom"])  # the fallback reader, same answer
    vols["dicom_j2k_pydicom"] = _read_dicom_pydicom(paths["dicom_j2k"])
    from monai.transforms import LoadImage  # MONAI's own NRRD reader (pynrrd) agrees too

    monai_nrrd = LoadImage(image_only=True)(str(paths["nrrd"]))
    np.testing.assert_allclose(monai_nrrd.affine.numpy(), small_lps.affine, atol=1e-4)
    np.testing.assert_array_equal(monai_nrrd.numpy(), small_lps.array)
    for name, vol in vols.items():
        assert vol.orientation == "LPS", name
        np.testing.assert_allclose(vol.affine, small_lps.affine, atol=1e-3, err_msg=name)
        np.testing.assert_array_equal(
            vol.array.astype(np.int32), small_lps.array.astype(np.int32), err_msg=name
        )


def test_dicom_ras_orientation(shared_data: Path, tmp_path: Path) -> None:
    """A RAS-stored volume written as DICOM comes back with the same RAS affine."""
    full = read_volume(shared_data / TS / "example_ct_sm.nii.gz")
    vol = Volume(
        np.clip(full.array[30:60, 40:64, 5:11], -1024, None).astype(np.int16), full.affine, full.path
    )
    back = read_volume(write_dicom_series(vol, tmp_path / "ras"))
    assert back.orientation == "RAS"
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-3)
    np.testing.assert_array_equal(back.array, vol.array)


def test_dicom_falls_back_to_pydicom(
    small_lps: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asa3d.data import io

    folder = write_dicom_series(small_lps, tmp_path / "j2k", j2k=True)

    def gdcm_fails(_folder: Path) -> Volume:
        raise RuntimeError("ITK ERROR: GDCMImageIO: cannot decode")

    monkeypatch.setattr(io, "_read_dicom_sitk", gdcm_fails)
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.array, small_lps.array)
    np.testing.assert_allclose(vol.affine, small_lps.affine, atol=1e-3)

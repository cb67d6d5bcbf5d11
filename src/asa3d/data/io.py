"""Readers that keep geometry: every format becomes a ``Volume`` with a 4x4 RAS affine.

NIfTI goes through nibabel (its affine is already RAS, and MONAI's NibabelReader gives the same
array and affine, so our cache and a plain MONAI pipeline agree). MetaImage, NRRD and DICOM go
through SimpleITK, whose geometry is LPS; ``itk_to_ras_affine`` converts it. DICOM series that
GDCM cannot decode (e.g. some JPEG 2000 files) fall back to pydicom + pylibjpeg-openjpeg.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asa3d.data.errors import DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
# LPS (ITK/DICOM world) <-> RAS (nibabel/MONAI world): flip the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D scan: ``array`` indexed (x, y, z) = voxel (i, j, k) as nibabel stores it (no
    reorientation), ``affine`` maps (i, j, k, 1) to RAS millimetres."""

    array: np.ndarray
    affine: np.ndarray
    path: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))


DICOM_MAGIC_OFFSET = 128  # PS3.10 7.1: a 128-byte preamble, then "DICM"
DICOM_PROBE_FILES = 3  # a folder is a series when one of its first regular files is DICOM


def is_dicom_file(path: str | Path) -> bool:
    """Recognise a DICOM file by its content, whatever its name (PACS exports often name slices
    ``CT.1.3.12...`` without a ``.dcm`` suffix): the ``DICM`` magic after the preamble, else a
    preamble-less file that pydicom parses into a dataset with a SOP Class UID."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    if head[DICOM_MAGIC_OFFSET:] == b"DICM":
        return True
    if len(head) < 8 or p.name.lower().endswith(IMAGE_SUFFIXES):
        return False
    try:
        import pydicom

        ds = pydicom.dcmread(str(p), stop_before_pixels=True, force=True)
        return "SOPClassUID" in ds
    except Exception:  # any parse failure means "not DICOM"
        return False


def is_dicom_dir(folder: str | Path) -> bool:
    """A folder holding a DICOM series: ``.dcm`` files, or slices recognised by content."""
    d = Path(folder)
    try:
        files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
    except OSError:
        return False
    if any(f.suffix.lower() == ".dcm" for f in files):
        return True
    probe = [f for f in files if not f.name.lower().endswith(IMAGE_SUFFIXES + (".json", ".txt", ".md"))]
    return any(is_dicom_file(f) for f in probe[:DICOM_PROBE_FILES])


def volume_kind(path: str | Path) -> str:
    """``nifti`` | ``itk`` | ``dicom`` (a series folder, or one of its slices) | ``unknown``."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(".dcm") or is_dicom_file(p):
        return "dicom"
    return "unknown"


def case_id_from_path(path: str | Path) -> str:
    """File name without its (possibly double) image extension."""
    name = Path(path).name
    for suf in sorted(IMAGE_SUFFIXES + (".dcm",), key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def itk_to_ras_affine(origin, spacing, direction) -> np.ndarray:
    """Affine (i, j, k) -> RAS mm from ITK's LPS origin, spacing and direction (3x3, row-major)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = d * np.asarray(spacing, dtype=float)[None, :]
    aff[:3, 3] = np.asarray(origin, dtype=float)
    return LPS_TO_RAS @ aff


def ras_affine_to_itk(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Inverse of ``itk_to_ras_affine``: (origin, spacing, direction) for SimpleITK writers."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    return tuple(lps[:3, 3]), tuple(spacing), tuple(direction.ravel())


def _to_3d(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]  # e.g. a NIfTI saved with a singleton time axis
    if array.ndim != 3:
        raise DataError(
            f"{path}: expected a 3D volume, got shape {tuple(array.shape)}. "
            "Export the scan as one 3D volume (a 2D slice or a multi-channel/4D series cannot be used; "
            "a 4D file is accepted only when its 4th axis has length 1).",
            path,
        )
    if min(array.shape) < 2:
        raise DataError(
            f"{path}: shape {tuple(array.shape)} has an axis of length {min(array.shape)}, i.e. it is a 2D "
            "slice, not a 3D scan. Provide the whole series/volume.",
            path,
        )
    return array


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        # The data is read lazily, so truncation/corruption shows up here, not in load().
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types (EOFError, zlib.error, ImageFileError...)
        raise DataError(
            f"{path}: cannot read this NIfTI file ({type(exc).__name__}: {exc}). It is probably truncated "
            "or corrupt: download or export it again.",
            path,
        ) from None
    return Volume(_to_3d(np.asarray(array), path), np.asarray(img.affine, dtype=float), path)


def _sitk_to_volume(image, path: Path) -> Volume:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "export a single-channel (grey-value) volume.",
            path,
        )
    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(image)  # (k, j, i): reverse to (i, j, k)
    array = np.ascontiguousarray(array.transpose(tuple(range(array.ndim))[::-1]))
    if dim == 4 and array.shape[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise DataError(
            f"{path}: expected a 3D volume, got a {dim}D image of size {image.GetSize()}. "
            "Export the scan as one 3D volume.",
            path,
        )
    affine = itk_to_ras_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(_to_3d(array, path), affine, path)


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise DataError(
            f"{path}: cannot read this image ({first}). Check that the file (and, for .mhd, its .raw data "
            "file) is complete and not truncated; export it again if needed.",
            path,
        ) from None
    return _sitk_to_volume(image, path)


def _dicom_files(folder: Path) -> list[str]:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(
            f"{folder}: no DICOM series found in this folder. Point to the folder that holds the "
            "series' .dcm files.",
            folder,
        )
    if len(series) > 1:
        # Several series in one folder: take the one with most slices, and say so.
        files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
        log.warning(
            "%s: holds %d DICOM series; using the largest (%d slices). Put one series per folder "
            "to choose explicitly.",
            folder,
            len(series),
            len(files),
        )
        return list(files)
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _read_dicom_sitk(folder: Path) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(_dicom_files(folder))
    image = reader.Execute()  # applies RescaleSlope/Intercept, so values are HU
    return _sitk_to_volume(image, folder)


def _read_dicom_pydicom(folder: Path) -> Volume:
    """Series reader on pydicom, used when GDCM cannot decode the pixel data.

    Written here (not delegated) because SimpleITK's GDCM build may lack a codec that
    pylibjpeg-openjpeg provides; the geometry follows the DICOM standard (C.7.6.2.1.1):
    world(LPS) = IPP + i * col_spacing * row_dir + j * row_spacing * col_dir along the slice normal.
    """
    import pydicom

    slices = []
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(f))
        except Exception:
            continue  # not a DICOM file (DICOMDIR, notes...)
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            slices.append(ds)
    if len(slices) < 2:
        raise DataError(
            f"{folder}: found {len(slices)} readable DICOM image slice(s); a 3D series needs at "
            "least 2. Point to the folder of one complete series.",
            folder,
        )
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, dtype=float), normal)))
    positions = np.array([np.asarray(d.ImagePositionPatient, dtype=float) for d in slices])
    dz = float(np.median(np.diff(positions @ normal))) if len(slices) > 1 else 1.0
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)  # (between rows, between cols)
    planes = []
    for d in slices:
        try:
            arr = d.pixel_array.astype(np.float32)
        except Exception as exc:
            raise DataError(
                f"{folder}: cannot decode the pixel data of {Path(d.filename).name} "
                f"({type(exc).__name__}: {exc}). Install pylibjpeg and pylibjpeg-openjpeg "
                "(JPEG 2000), or decompress the series (e.g. gdcmconv --raw).",
                folder,
            ) from None
        slope = float(getattr(d, "RescaleSlope", 1.0))
        intercept = float(getattr(d, "RescaleIntercept", 0.0))
        planes.append(arr * slope + intercept)
    array = np.stack(planes, axis=-1)  # pixel_array is (rows, cols) = (j, i)
    array = np.ascontiguousarray(array.transpose(1, 0, 2))  # -> (i, j, k)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = normal * dz
    lps[:3, 3] = positions[0]
    if np.allclose(array, np.round(array)) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    return Volume(_to_3d(array, folder), LPS_TO_RAS @ lps, folder)


def _read_dicom(folder: Path) -> Volume:
    try:
        return _read_dicom_sitk(folder)
    except DataError:
        raise
    except RuntimeError as exc:
        log.info(
            "%s: SimpleITK/GDCM could not read the series (%s); trying pydicom.",
            folder,
            str(exc).strip().splitlines()[-1] if str(exc).strip() else exc,
        )
        return _read_dicom_pydicom(folder)


def read_volume(path: str | Path) -> Volume:
    """Read a 3D scan or label map from NIfTI, MetaImage, NRRD or a DICOM series folder.

    Raises ``DataError`` naming the file for a missing, unreadable or non-3D input. Value checks
    (NaN, HU range, label classes) live in ``asa3d.data.validate``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"{p}: file not found. Check the path (relative paths in a dataset.json are "
            "resolved against the json's folder).",
            p,
        )
    kind = volume_kind(p)
    if kind == "nifti":
        return _read_nifti(p)
    if kind == "itk":
        return _read_itk(p)
    if kind == "dicom":
        return _read_dicom(p if p.is_dir() else p.parent)
    raise DataError(
        f"{p}: unsupported file type. Supported: NIfTI (.nii, .nii.gz), MetaImage (.mhd/.mha), "
        "NRRD (.nrrd/.nhdr) and DICOM series folders. Convert the scan to one of these.",
        p,
    )


def write_volume(volume_or_array, path: str | Path, affine: np.ndarray | None = None) -> Path:
    """Write a volume as NIfTI (nibabel) or MHD/NRRD (SimpleITK), geometry preserved, atomically
    (for tests, examples and exporting predictions)."""
    array = volume_or_array.array if isinstance(volume_or_array, Volume) else np.asarray(volume_or_array)
    affine = volume_or_array.affine if isinstance(volume_or_array, Volume) else affine
    if affine is None:
        affine = np.eye(4)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    kind = volume_kind(p)
    if kind == "nifti":
        import gzip

        import nibabel as nib

        from asa3d.atomic import atomic_write_bytes

        img = nib.Nifti1Image(array, np.asarray(affine, dtype=float))
        img.set_qform(np.asarray(affine, dtype=float), code=1)
        img.set_sform(np.asarray(affine, dtype=float), code=1)
        data = img.to_bytes()
        # atomic: a killed writer never leaves a truncated file under the final name
        atomic_write_bytes(
            p, gzip.compress(data, compresslevel=6) if p.name.lower().endswith(".gz") else data
        )
    elif kind == "itk":
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        origin, spacing, direction = ras_affine_to_itk(affine)
        image.SetOrigin(origin)
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        from asa3d.atomic import atomic_path

        # a temp name in the same folder, then renamed (an .mhd's .raw first, its header last)
        with atomic_path(p) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)
    else:
        raise DataError(f"{p}: cannot write this file type; use .nii.gz, .mhd or .nrrd.", p)
    return p

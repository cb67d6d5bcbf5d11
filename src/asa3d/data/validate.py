"""Value checks on read volumes: finite voxels, HU plausibility, label maps that fit their image.

Errors are ``DataError`` (the case cannot be used); a suspicious intensity range is only a warning
(it may be a legitimately cropped or pre-normalised scan) naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np

from asa3d.data.errors import DataError
from asa3d.data.io import Volume

AFFINE_ATOL_MM = 1e-3  # geometry written by different tools differs by float32 rounding only


class IntensityWarning(UserWarning):
    """The intensities of a scan do not look like Hounsfield units."""


def check_finite(vol: Volume) -> None:
    if np.issubdtype(vol.array.dtype, np.floating):
        bad = ~np.isfinite(vol.array)
        n = int(bad.sum())
        if n:
            kinds = []
            if np.isnan(vol.array).any():
                kinds.append("NaN")
            if np.isinf(vol.array).any():
                kinds.append("inf")
            raise DataError(
                f"{vol.path}: {n} voxel(s) are {'/'.join(kinds)}. Fix or re-export the scan (e.g. replace "
                "them with -1024 HU), or pass --skip-bad / data.skip_bad=true to leave it out.",
                vol.path,
            )
    if not np.isfinite(vol.affine).all() or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise DataError(
            f"{vol.path}: the header's affine/direction is degenerate ({vol.affine.tolist()}). "
            "Fix the header (spacing and orientation) and export again.",
            vol.path,
        )


def hu_warning(vol: Volume, lo: float | None = None, hi: float | None = None) -> str | None:
    """A message when the intensities do not look like CT in HU, else None."""
    if lo is None or hi is None:
        lo, hi = float(np.min(vol.array)), float(np.max(vol.array))
    reasons = []
    if lo >= 0.0 and hi <= 1.0:
        reasons.append(f"values lie within [0, 1] ({lo:.3g}..{hi:.3g}): already normalised?")
    else:
        if lo > -200:
            reasons.append(f"minimum {lo:.4g} > -200 (air is about -1000 HU)")
        if hi < 100:
            reasons.append(f"maximum {hi:.4g} < 100 (bone is above 300 HU)")
    if not reasons:
        return None
    return (
        f"{vol.path}: intensities do not look like Hounsfield units ({'; '.join(reasons)}). The HU window "
        "will clip them wrongly: check the rescale slope/intercept, or that this is CT, not MRI."
    )


def validate_image(vol: Volume, emit: bool = True) -> list[str]:
    """Raise ``DataError`` for an unusable image; return the warnings for a suspicious one (also
    issued as ``IntensityWarning`` when ``emit``; the cache builder logs them itself instead)."""
    check_finite(vol)
    msg = hu_warning(vol)
    if msg is None:
        return []
    if emit:
        warnings.warn(msg, IntensityWarning, stacklevel=2)
    return [msg]


def validate_label(label: Volume, image: Volume, classes: Iterable[int] | None = None) -> None:
    """The label map must share the image's grid and use only declared class indices."""
    if label.shape != image.shape:
        raise DataError(
            f"{label.path}: label shape {label.shape} does not match its image {image.path} of shape "
            f"{image.shape}. Resample the label onto the image grid (nearest neighbour) or pair the right "
            "files.",
            label.path,
        )
    if not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL_MM, rtol=1e-5):
        raise DataError(
            f"{label.path}: label affine does not match its image {image.path} (label spacing "
            f"{np.round(label.spacing, 4).tolist()}, orientation {label.orientation}, origin "
            f"{np.round(label.affine[:3, 3], 3).tolist()}; image {np.round(image.spacing, 4).tolist()}, "
            f"{image.orientation}, {np.round(image.affine[:3, 3], 3).tolist()}). Resample the label onto "
            "the image grid, or fix its header if only the header differs.",
            label.path,
        )
    arr = label.array
    if np.issubdtype(arr.dtype, np.floating) and (
        not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr))
    ):
        raise DataError(
            f"{label.path}: label map holds non-integer values. Save class indices as integers "
            "(uint8/int16).",
            label.path,
        )
    values = np.unique(arr).astype(np.int64)
    if classes is not None:
        allowed = {int(c) for c in classes} | {0}
        extra = sorted(set(values.tolist()) - allowed)
        if extra:
            raise DataError(
                f"{label.path}: label values {extra[:20]} are not among the declared classes "
                f"{sorted(allowed)}. Declare them in the dataset.json 'labels' (or the preset), or remap the "
                "label map.",
                label.path,
            )
    elif values.min() < 0:
        raise DataError(
            f"{label.path}: negative label values {values[values < 0][:10].tolist()}. Class "
            "indices must be >= 0.",
            label.path,
        )


def smaller_than_crop(shapes: dict[str, tuple[int, ...]], crop: tuple[int, ...]) -> list[str]:
    """One message per case whose preprocessed volume is smaller than the training crop on some
    axis: training zero-pads it (``asa3d.data.dataset``), which a user should know about."""
    out = []
    for case_id, shape in shapes.items():
        short = [ax for ax, (s, c) in enumerate(zip(shape, crop, strict=False)) if s < c]
        if short:
            out.append(
                f"case {case_id!r}: preprocessed shape {tuple(shape)} is smaller than the crop {tuple(crop)} "
                f"on axis {', '.join(map(str, short))}; training zero-pads it (choose a finer "
                "data.preprocess.spacing or a smaller train.crop_size to avoid padding)."
            )
    return out

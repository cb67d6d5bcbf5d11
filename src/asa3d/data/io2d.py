"""2D image readers (PNG, JPEG, DICOM) for radiographs: grey values at their true bit depth.

Every reader returns an ``Image2D``: ``array`` (H, W) of unsigned integers as stored (uint8 for
8-bit files, uint16 for 16-bit PNG and for DICOM up to 16 bits stored), ``bits`` the bit depth of
the stored values, so ``to_unit()`` maps them to [0, 1] by ``value / (2^bits - 1)`` without losing
or inventing precision. Rules, each with an error naming the file and the fix when it fails:

- Colour: an RGB/RGBA/palette image whose colour channels are equal everywhere (a greyscale image
  saved in colour, common for exported radiographs and for part of ChestX-ray14) is read as grey
  (the shared channel; alpha ignored). JPEG decoding perturbs equal channels slightly, so for JPEG
  "equal" means within 2 grey levels, and the channel mean (rounded) is used. A truly coloured
  image is refused, unless ``colour="luma"``, which converts it with the ITU-R 601 luma weights
  (Pillow's ``convert("L")``).
- 16-bit PNG: greyscale is read as uint16 (``bits=16``). Pillow would silently reduce 16-bit
  colour or grey+alpha PNGs to 8 bits, so those are refused (the header is read first).
- 1-bit images become 0/255 with ``bits=8``; 2- and 4-bit grey PNGs are expanded by Pillow to 8.
- A truncated or corrupt file is refused (Pillow's ``LOAD_TRUNCATED_IMAGES`` is never set).
- DICOM: one frame, one sample per pixel; the stored values (``BitsStored``) are kept, signed
  values shifted to unsigned, MONOCHROME1 (white = low values) inverted so that high values
  are always bright (dense). Rescale slope/intercept and VOI LUTs are not applied (radiograph
  values are not calibrated units). A file without pixel data is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from asa3d.data.errors import DataError

__all__ = ["IMAGE2D_SUFFIXES", "Image2D", "image2d_kind", "read_image2d"]

PNG_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE2D_SUFFIXES = PNG_SUFFIXES + JPEG_SUFFIXES + DICOM_SUFFIXES
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_GREY_TOLERANCE = 2  # grey levels by which JPEG decoding may make equal channels differ
Colour = Literal["refuse", "luma"]


@dataclass
class Image2D:
    """A 2D grey image: ``array`` (rows, cols) unsigned integers at ``bits`` bits per pixel."""

    array: np.ndarray
    bits: int
    path: Path
    spacing: tuple[float, float] | None = None  # (row, col) mm where the file records it

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[0]), int(self.array.shape[1])

    def to_unit(self) -> np.ndarray:
        """float32 in [0, 1]: value / (2^bits - 1)."""
        return (self.array.astype(np.float32) / float(2**self.bits - 1)).astype(np.float32)


def image2d_kind(path: str | Path) -> str:
    """``png`` | ``jpeg`` | ``dicom`` | ``unknown``, from the suffix, else from the file's magic."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(PNG_SUFFIXES):
        return "png"
    if name.endswith(JPEG_SUFFIXES):
        return "jpeg"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return "unknown"
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    return "unknown"


def _png_header(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from the PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise DataError(
            f"{path}: not a valid PNG file (bad signature or header). The file is corrupt or not a PNG: "
            "export it again.",
            path,
        )
    depth, ctype = struct.unpack(">BB", head[24:26])
    return int(depth), int(ctype)


def _grey_from_colour(rgb: np.ndarray, path: Path, tolerance: int, colour: Colour, img) -> np.ndarray:
    spread = int((rgb.max(-1).astype(np.int32) - rgb.min(-1).astype(np.int32)).max())
    if spread <= tolerance:
        return np.rint(rgb.astype(np.float32).mean(-1)).astype(rgb.dtype) if tolerance else rgb[..., 0]
    if colour == "luma":
        return np.asarray(img.convert("RGB").convert("L"))
    raise DataError(
        f"{path}: is a colour image (its colour channels differ by up to {spread} grey levels). "
        "Radiographs must be greyscale: convert it (e.g. `convert in.png -colorspace Gray out.png`), or "
        "set colour='luma' (data.colour=luma) to convert colour images with the ITU-R 601 luma weights.",
        path,
    )


def _open_pillow(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()  # decoding happens here: a truncated file fails now, not later
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot decode this {what} ({type(exc).__name__}: {exc}). The file is probably "
            "truncated or corrupt: download or export it again (or leave it out of the data list).",
            path,
        ) from None
    return img


def _from_pillow(img, path: Path, tolerance: int, colour: Colour) -> tuple[np.ndarray, int]:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.uint16), 16
    if mode == "I":  # 32-bit container (older Pillow for 16-bit PNG): keep when it fits 16 bits
        a = np.asarray(img)
        if a.min() < 0 or a.max() > 65535:
            raise DataError(f"{path}: 32-bit integer pixels outside 0..65535 are not supported.", path)
        return a.astype(np.uint16), 16
    if mode == "1":
        return np.asarray(img).astype(np.uint8) * np.uint8(255), 8
    if mode == "L":
        return np.asarray(img), 8
    if mode in ("LA", "La"):
        return np.asarray(img)[..., 0], 8
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr"):
        rgb = np.asarray(img.convert("RGB"))
        return _grey_from_colour(rgb, path, tolerance, colour, img), 8
    raise DataError(
        f"{path}: pixel mode {mode!r} is not supported. Save the image as 8- or 16-bit greyscale.", path
    )


def _read_png(path: Path, colour: Colour) -> Image2D:
    depth, ctype = _png_header(path)
    if depth == 16 and ctype != 0:
        kind = {2: "RGB", 4: "grey+alpha", 6: "RGBA"}.get(ctype, f"colour type {ctype}")
        raise DataError(
            f"{path}: is a 16-bit {kind} PNG. It would be read with 8 bits per channel, losing half its "
            "precision; save it as a 16-bit greyscale PNG (e.g. `convert in.png -colorspace Gray "
            "-depth 16 out.png`).",
            path,
        )
    img = _open_pillow(path, "PNG")
    array, bits = _from_pillow(img, path, 0, colour)
    return Image2D(np.ascontiguousarray(array), bits, path)


def _read_jpeg(path: Path, colour: Colour) -> Image2D:
    img = _open_pillow(path, "JPEG")
    array, bits = _from_pillow(img, path, JPEG_GREY_TOLERANCE, colour)
    return Image2D(np.ascontiguousarray(array), bits, path)


def _read_dicom(path: Path) -> Image2D:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, ...
        raise DataError(
            f"{path}: cannot read this DICOM file ({type(exc).__name__}: {exc}). It is corrupt or not "
            "DICOM: export it again.",
            path,
        ) from None
    if "PixelData" not in ds:
        raise DataError(
            f"{path}: this DICOM file has no pixel data (it may be a report, a structured document or a "
            "DICOMDIR). Leave it out of the image folder, or export the image itself.",
            path,
        )
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if samples != 1 or frames != 1:
        raise DataError(
            f"{path}: has {samples} sample(s) per pixel and {frames} frame(s); a 2D radiograph has one of "
            "each. Export a single greyscale frame.",
            path,
        )
    try:
        a = ds.pixel_array
    except Exception as exc:
        raise DataError(
            f"{path}: cannot decode the DICOM pixel data ({type(exc).__name__}: {exc}). Install the "
            "codec (pylibjpeg, pylibjpeg-openjpeg), or decompress the file (e.g. gdcmconv --raw).",
            path,
        ) from None
    bits = int(getattr(ds, "BitsStored", a.dtype.itemsize * 8))
    if bits > 16:
        raise DataError(f"{path}: {bits} bits stored; at most 16 are supported.", path)
    a = a.astype(np.int32)
    if int(getattr(ds, "PixelRepresentation", 0)) == 1:
        a = a + 2 ** (bits - 1)  # signed -> unsigned, same order
    a = np.clip(a, 0, 2**bits - 1)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        a = (2**bits - 1) - a
    spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    sp = (float(spacing[0]), float(spacing[1])) if spacing is not None else None
    return Image2D(a.astype(np.uint8 if bits <= 8 else np.uint16), bits, path, sp)


def read_image2d(path: str | Path, colour: Colour = "refuse") -> Image2D:
    """Read a 2D grey image from PNG, JPEG or DICOM (see the module doc for the rules).

    Raises ``DataError`` naming the file for a missing, unreadable, colour (unless
    ``colour='luma'``), multi-frame or pixel-less input.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: file not found. Check the path.", p)
    kind = image2d_kind(p)
    if kind == "png":
        img = _read_png(p, colour)
    elif kind == "jpeg":
        img = _read_jpeg(p, colour)
    elif kind == "dicom":
        img = _read_dicom(p)
    else:
        raise DataError(
            f"{p}: unsupported 2D image type. Supported: PNG, JPEG and single-frame DICOM; convert it.", p
        )
    if img.array.ndim != 2 or min(img.array.shape) < 2:
        raise DataError(f"{p}: expected a 2D image, got shape {tuple(img.array.shape)}.", p)
    return img

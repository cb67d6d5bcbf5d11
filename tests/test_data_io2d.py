"""2D readers (PNG / JPEG / DICOM), 2D folder datalists, the ChestX-ray14 preset, CT slices."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asa3d.data.datalist2d import load_folder_2d
from asa3d.data.errors import DataError
from asa3d.data.io2d import read_image2d
from asa3d.data.montage import oriented_slice
from asa3d.data.presets_2d import CHESTXRAY14_CLASSES, load_preset_2d, multi_hot
from asa3d.data.slices2d import draw_slices, volume_slice

RAMP8 = (np.arange(24 * 20).reshape(24, 20) % 256).astype(np.uint8)
RAMP16 = (np.arange(24 * 20).reshape(24, 20) * 131 + 7).astype(np.uint16)  # up to 62,747: needs 16 bits


def _png_bytes(rows: np.ndarray, colour_type: int) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour): big-endian samples, filter 0."""
    h, w = rows.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + r.astype(">u2").tobytes() for r in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _dicom(path: Path, plane: np.ndarray | None, bits: int = 12, photometric: str = "MONOCHROME2") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.PatientID = (
        sop,
        meta.MediaStorageSOPInstanceUID,
        "DX",
        "T",
    )
    if plane is not None:
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
        ds.ImagerPixelSpacing = ["0.139", "0.143"]
        ds.PixelData = np.ascontiguousarray(plane.astype(np.uint16)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_8_and_16_bit_png_keep_their_depth(tmp_path: Path) -> None:
    Image.fromarray(RAMP8).save(tmp_path / "a8.png")
    Image.fromarray(RAMP16).save(tmp_path / "a16.png")
    a8, a16 = read_image2d(tmp_path / "a8.png"), read_image2d(tmp_path / "a16.png")
    assert a8.bits == 8 and a8.array.dtype == np.uint8 and np.array_equal(a8.array, RAMP8)
    assert (
        a16.bits == 16 and a16.array.dtype == np.uint16 and np.array_equal(a16.array, RAMP16)
    )  # not truncated
    assert a16.to_unit().max() == pytest.approx(RAMP16.max() / 65535)
    assert a8.to_unit().dtype == np.float32 and a8.to_unit().max() == pytest.approx(255 / 255)


def test_grey_saved_as_colour_is_read_as_grey_and_true_colour_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.stack([RAMP8] * 3 + [np.full_like(RAMP8, 255)], -1), "RGBA").save(tmp_path / "g.png")
    assert np.array_equal(read_image2d(tmp_path / "g.png").array, RAMP8)
    rgb = np.stack([RAMP8, RAMP8, 255 - RAMP8], -1)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match=r"colour\.png: is a colour image.*colour='luma'") as e:
        read_image2d(tmp_path / "colour.png")
    assert e.value.path == str(tmp_path / "colour.png")
    luma = read_image2d(tmp_path / "colour.png", colour="luma")
    assert luma.bits == 8 and np.array_equal(luma.array, np.asarray(Image.fromarray(rgb).convert("L")))


def test_16_bit_colour_png_is_refused_not_truncated(tmp_path: Path) -> None:
    rgb16 = np.stack([RAMP16] * 3, -1).reshape(24, 20 * 3)
    (tmp_path / "rgb16.png").write_bytes(_png_bytes(rgb16, colour_type=2))
    with pytest.raises(DataError, match=r"rgb16\.png: is a 16-bit RGB PNG.*16-bit greyscale"):
        read_image2d(tmp_path / "rgb16.png")
    (tmp_path / "grey16.png").write_bytes(_png_bytes(RAMP16, colour_type=0))  # the same writer, grey
    assert np.array_equal(read_image2d(tmp_path / "grey16.png").array, RAMP16)


def test_jpeg_grey_and_truncated(tmp_path: Path) -> None:
    smooth = (np.add.outer(np.arange(32), np.arange(32)) * 4).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.stack([smooth] * 3, -1)).save(tmp_path / "rgb.jpg", quality=95)
    g, c = read_image2d(tmp_path / "g.jpg"), read_image2d(tmp_path / "rgb.jpg")
    assert g.bits == 8 and np.abs(g.array.astype(int) - smooth).max() <= 8
    assert np.abs(c.array.astype(int) - g.array).max() <= 2  # grey saved as colour JPEG -> grey
    data = (tmp_path / "g.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: cannot decode this JPEG.*truncated"):
        read_image2d(tmp_path / "cut.jpg")


def test_dicom_bits_stored_monochrome1_and_no_pixel_data(tmp_path: Path) -> None:
    plane = (np.arange(24 * 20).reshape(24, 20) * 8).astype(np.uint16)  # < 4096: 12 bits
    d = read_image2d(_dicom(tmp_path / "a.dcm", plane))
    assert d.bits == 12 and np.array_equal(d.array, plane) and d.spacing == (0.139, 0.143)
    assert d.to_unit().max() == pytest.approx(plane.max() / 4095)
    inv = read_image2d(_dicom(tmp_path / "m1.dcm", plane, photometric="MONOCHROME1"))
    assert np.array_equal(inv.array, 4095 - plane)  # high values are bright in every image
    with pytest.raises(DataError, match=r"empty\.dcm: this DICOM file has no pixel data"):
        read_image2d(_dicom(tmp_path / "empty.dcm", None))


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_image2d(tmp_path / "nope.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported 2D image type"):
        read_image2d(tmp_path / "notes.txt")
    (tmp_path / "fake.png").write_bytes(b"not a png at all, just text" * 3)
    with pytest.raises(DataError, match=r"fake\.png: not a valid PNG"):
        read_image2d(tmp_path / "fake.png")


def test_folder_datalist_2d(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(RAMP8).save(tmp_path / sub / "x.png")
    Image.fromarray(RAMP8).save(tmp_path / "a" / "y.jpg")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(RAMP8).save(tmp_path / ".hidden" / "z.png")
    dl = load_folder_2d(tmp_path)
    assert [it["id"] for it in dl.items] == ["a__x", "a__y", "b__x"]  # names repeat: folder-qualified ids
    assert dl.source == "folder2d" and all(Path(it["image"]).is_file() for it in dl.items)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no 2D images"):
        load_folder_2d(tmp_path / "empty")
    with pytest.raises(DataError, match="not a folder"):
        load_folder_2d(tmp_path / "missing")


def _chestxray14(root: Path, with_lists: bool) -> None:
    rows = [
        ("00000001_000.png", "Cardiomegaly", "1"), ("00000001_001.png", "Cardiomegaly|Emphysema", "1"),
        ("00000002_000.png", "No Finding", "2"), ("00000003_000.png", "Hernia|Mass", "3"),
        ("00000004_000.png", "Effusion", "4"), ("00000005_000.png", "No Finding", "5"),
    ]  # fmt: skip
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"]  # fmt: skip
    for i, (name, findings, pid) in enumerate(rows):
        lines.append(f"{name},{findings},{i},{pid},50,M,PA,1024,1024,0.143,0.143,")
        folder = root / ("images_001" if i < 3 else "images_002") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")  # the preset never opens images
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    if with_lists:
        (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000003_000.png\n")
        (root / "test_list.txt").write_text("00000002_000.png\n00000004_000.png\n00000005_000.png\n")


def test_chestxray14_preset_official_lists_and_labels(tmp_path: Path) -> None:
    _chestxray14(tmp_path, with_lists=True)
    tr = load_preset_2d("chestxray14", tmp_path, "training")
    te = load_preset_2d("chestxray14", tmp_path, "test")
    assert [it["id"] for it in tr.items] == ["00000001_000", "00000001_001", "00000003_000"]
    assert [it["id"] for it in te.items] == ["00000002_000", "00000004_000", "00000005_000"]
    assert tr.items[1]["findings"] == "Cardiomegaly|Emphysema" and te.items[0]["findings"] == ""
    assert tr.label_names[13] == "Hernia" and len(tr.label_names) == 14
    mh = multi_hot(tr.items[2]["findings"])
    assert mh.tolist() == [float(c in ("Hernia", "Mass")) for c in CHESTXRAY14_CLASSES]
    assert "official" in tr.split_record["provenance"]


def test_chestxray14_fallback_split_is_patient_wise(tmp_path: Path) -> None:
    _chestxray14(tmp_path, with_lists=False)
    tr = load_preset_2d("chestxray14", tmp_path, "training")
    te = load_preset_2d("chestxray14", tmp_path, "test")
    assert len(tr) + len(te) == 6 and len(te) >= 1
    assert not {it["patient"] for it in tr.items} & {it["patient"] for it in te.items}
    assert any("seeded" in n for n in tr.notes)
    with pytest.raises(DataError, match="Data_Entry_2017.csv"):
        load_preset_2d("chestxray14", tmp_path / "images_001")


def test_ct_slices_are_oriented_like_the_montage() -> None:
    vol = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    ax = volume_slice(vol, "axial", 3)
    assert ax.shape == (6, 5)  # rows: y (anterior on top), cols: x (patient right on the left)
    assert ax[0, 0] == vol[4, 5, 3]  # top-left = most anterior, most right
    assert np.array_equal(volume_slice(vol, "coronal", 2), oriented_slice(vol, "coronal", (0, 2, 0)))
    assert volume_slice(vol, "sagittal", 1).shape == (7, 6)
    a = draw_slices(vol, 20, np.random.default_rng(0), margin=0.2)
    b = draw_slices(vol, 20, np.random.default_rng(0), margin=0.2)
    assert [(v, i) for v, i, _ in a] == [(v, i) for v, i, _ in b]
    assert {v for v, _, _ in a} == {"axial", "coronal", "sagittal"}
    for view, idx, s in a:
        assert np.array_equal(s, volume_slice(vol, view, idx))
        length = {"axial": 7, "coronal": 6, "sagittal": 5}[view]
        assert int(0.2 * length) <= idx < length - int(0.2 * length)
    with pytest.raises(ValueError, match="outside"):
        volume_slice(vol, "axial", 7)

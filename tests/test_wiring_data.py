"""Data wiring: the cache key follows every preprocessing field and the scan's bytes; a label that
disagrees with its image is refused through `asa3d data prepare`, not only by the validator."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asa3d.cli import main
from asa3d.config_sections import PreprocessConfig
from asa3d.data.cache import cache_key, content_hash
from asa3d.data.msd_json import write_dataset_json

# one changed value per PreprocessConfig field; a new field must be added here (and to the key)
CHANGED = {
    "orientation": "LPS",
    "spacing": (1.5, 1.5, 2.5),
    "window": (-175.0, 300.0),
    "image_interp": "nearest",
}


def test_cache_key_changes_with_every_preprocessing_field() -> None:
    fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
    assert set(CHANGED) == fields, f"add the new preprocessing field(s) {fields - set(CHANGED)} to CHANGED"
    base = PreprocessConfig()
    k0 = cache_key("img", "lab", base)
    assert cache_key("img", "lab", PreprocessConfig()) == k0  # deterministic
    keys = {k0}
    for name, value in CHANGED.items():
        assert getattr(base, name) != value
        k = cache_key("img", "lab", dataclasses.replace(base, **{name: value}))
        assert k != k0, f"the cache key ignores preprocess.{name}"
        keys.add(k)
    assert len(keys) == len(CHANGED) + 1
    # one axis of the spacing, one bound of the window
    for spacing in [(1.6, 1.5, 2.0), (1.5, 1.6, 2.0)]:
        assert cache_key("img", "lab", dataclasses.replace(base, spacing=spacing)) != k0
    assert cache_key("img", "lab", dataclasses.replace(base, window=(-100.0, 250.0))) != k0


def test_cache_key_changes_with_image_and_label_content() -> None:
    cfg = PreprocessConfig()
    k0 = cache_key("img", "lab", cfg)
    assert cache_key("img2", "lab", cfg) != k0
    assert cache_key("img", "lab2", cfg) != k0
    assert cache_key("img", None, cfg) != k0
    assert cache_key("lab", "img", cfg) != k0  # image and label hashes are not interchangeable


def test_content_hash_follows_the_bytes_not_size_or_mtime(tmp_path: Path) -> None:
    p = tmp_path / "a.nii"
    data = bytearray(np.arange(4096, dtype=np.uint8).tobytes())
    p.write_bytes(bytes(data))
    st = p.stat()
    h0 = content_hash(p)
    assert content_hash(p) == h0
    data[2000] ^= 1  # one bit, same size, same mtime
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_hash(p) != h0
    # MHD: the separate data file is part of the scan
    mhd, raw = tmp_path / "s.mhd", tmp_path / "s.raw"
    mhd.write_text("NDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nElementDataFile = s.raw\n")
    raw.write_bytes(bytes(64))
    h1 = content_hash(mhd)
    raw.write_bytes(bytes(63) + b"\x01")
    assert content_hash(mhd) != h1
    # a DICOM folder: every slice counts
    d = tmp_path / "series"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.dcm").write_bytes(bytes([i]) * 10)
    h2 = content_hash(d)
    (d / "1.dcm").write_bytes(bytes([9]) * 10)
    assert content_hash(d) != h2


def _pair(root: Path, label_shape=(16, 14, 10), label_affine=None) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "lab").mkdir(parents=True, exist_ok=True)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    entries = []
    for i in range(2):
        img = rng.integers(-1000, 1000, (16, 14, 10)).astype(np.int16)
        nib.save(nib.Nifti1Image(img, aff), str(root / "img" / f"s{i}.nii.gz"))
        shape = label_shape if i == 1 else (16, 14, 10)
        lab = np.zeros(shape, np.uint8)
        lab[4:8, 4:8, 3:6] = 1
        la = label_affine if (i == 1 and label_affine is not None) else aff
        nib.save(nib.Nifti1Image(lab, la), str(root / "lab" / f"s{i}.nii.gz"))
        entries.append({"image": f"img/s{i}.nii.gz", "label": f"lab/s{i}.nii.gz"})
    return write_dataset_json(root / "dataset.json", "pairs", {"0": "background", "1": "organ"}, entries)


def _prepare(ds: Path, cache: Path, *extra: str) -> int:
    return main(["data", "prepare", f"data.root={ds}", "--workers", "1", "--cache-dir", str(cache), *extra])


def _shifted() -> np.ndarray:
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    aff[0, 3] = 12.0  # 4 voxels off
    return aff


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"label_shape": (16, 14, 9)}, "label shape"),
        ({"label_affine": _shifted()}, "label affine does not match"),
    ],
    ids=["shape", "affine"],
)
def test_prepare_refuses_a_label_that_disagrees_with_its_image(
    kwargs: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ds = _pair(tmp_path / "d", **kwargs)
    capsys.readouterr()
    assert _prepare(ds, tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "lab/s1.nii.gz" in err.replace(os.sep, "/") and message in err
    assert "Traceback" not in err
    assert _prepare(ds, tmp_path / "c", "--skip-bad") == 0  # the good pair is built, the bad one listed
    out = capsys.readouterr().out
    assert "rejected (1)" in out and "s1.nii.gz" in out


def test_prepare_accepts_matching_pairs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = _pair(tmp_path / "d")
    assert _prepare(ds, tmp_path / "c") == 0
    assert "2 built" in capsys.readouterr().out

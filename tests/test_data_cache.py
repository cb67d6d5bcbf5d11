"""Cache: content-keyed reuse and invalidation, atomic entries, --skip-bad, partial reads."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asa3d.config_sections import DataConfig, PreprocessConfig
from asa3d.data import cache as cache_mod
from asa3d.data.cache import CacheIndex, build_cache
from asa3d.data.datalist import load_datalist
from asa3d.data.errors import DataError
from asa3d.data.msd_json import write_dataset_json
from asa3d.data.prepare import default_cache_dir, ensure_cache

CFG = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
AFF = np.diag([-4.0, -4.0, 4.0, 1.0])  # LPS storage: preprocessing flips to RAS


def make_dataset(root: Path, n: int = 3, suffix: str = ".nii.gz") -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        img = rng.integers(-1000, 1200, (20, 18, 12)).astype(np.int16)
        lab = np.zeros(img.shape, np.uint8)
        lab[5 + i : 12, 4:10, 3:8] = 1
        lab[14:17, 10:14, 6:10] = 2
        for sub, arr in (("imagesTr", img), ("labelsTr", lab)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, AFF), str(root / sub / f"case{i}{suffix}"))
        entries.append({"image": f"imagesTr/case{i}{suffix}", "label": f"labelsTr/case{i}{suffix}"})
    return write_dataset_json(root / "dataset.json", "toy", {0: "background", 1: "a", 2: "b"}, entries)


def entry_dirs(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.iterdir() if p.is_dir()}


def test_build_reuse_and_read(tmp_path: Path) -> None:
    dl = load_datalist(make_dataset(tmp_path / "d"))
    idx = build_cache(dl, CFG, tmp_path / "c", workers=1, with_labels=True)
    assert (idx.built, idx.reused, len(idx)) == (3, 0, 3)
    assert idx.label_names == {0: "background", 1: "a", 2: "b"}
    case = idx.cases[0]
    assert case.shape == (20, 18, 12) and case.spacing == (4.0, 4.0, 4.0)
    np.testing.assert_allclose(case.affine[:3, :3], np.diag([4.0, 4.0, 4.0]))  # RAS after Orientationd
    np.testing.assert_allclose(case.source_affine, AFF)
    assert case.source_shape == (20, 18, 12) and case.source.endswith("case0.nii.gz")
    # values: the source flipped to RAS, windowed to [0, 1], within the uint16 quantisation step
    src = nib.load(case.source).get_fdata()[::-1, ::-1, :]
    expected = np.clip((src + 175.0) / 425.0, 0, 1)
    full = case.image()
    assert full.dtype == np.float32 and np.abs(full - expected).max() <= 1.0 / 65535 + 1e-6
    lab = case.label()
    np.testing.assert_array_equal(lab, nib.load(idx.cases[0].label_source).get_fdata()[::-1, ::-1, :])
    # partial reads equal slicing the full read
    sl = (slice(3, 17), slice(0, 9), slice(5, 12))
    np.testing.assert_array_equal(case.image(sl), full[sl])
    np.testing.assert_array_equal(case.label(sl), lab[sl])
    assert len(case.foreground_coords()) == int((lab > 0).sum())
    # nothing changed: everything reused, same entries
    again = build_cache(dl, CFG, tmp_path / "c", workers=1, with_labels=True)
    assert (again.built, again.reused) == (0, 3) and again.ids == idx.ids
    loaded = CacheIndex.load(tmp_path / "c", "toy", "training")
    assert loaded.ids == idx.ids and loaded.label_names == idx.label_names
    np.testing.assert_allclose(loaded.cases[1].affine, idx.cases[1].affine)


def test_invalidation_by_content_and_parameters(tmp_path: Path) -> None:
    dl = load_datalist(make_dataset(tmp_path / "d", suffix=".nii"))
    cdir = tmp_path / "c"
    first = build_cache(dl, CFG, cdir, with_labels=True)
    before = entry_dirs(cdir)
    # same size, same mtime, different bytes: a size+mtime key would miss this edit
    p = Path(dl.items[1]["image"])
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    second = build_cache(dl, CFG, cdir, with_labels=True)
    assert (second.built, second.reused) == (1, 2)
    assert second.cases[1].key != first.cases[1].key and second.cases[0].key == first.cases[0].key
    # a label edit invalidates too
    lp = Path(dl.items[2]["label"])
    arr = nib.load(lp).get_fdata().astype(np.uint8)
    arr[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(arr, AFF), str(lp))
    assert build_cache(dl, CFG, cdir, with_labels=True).built == 1
    # a preprocessing parameter change invalidates every entry
    third = build_cache(
        dl, PreprocessConfig(spacing=(4.0, 4.0, 4.0), window=(-100.0, 200.0)), cdir, with_labels=True
    )
    assert (third.built, third.reused) == (3, 0)
    assert len(entry_dirs(cdir)) == len(before) + 2 + 3


def test_skip_bad_and_first_error(tmp_path: Path) -> None:
    dl = load_datalist(make_dataset(tmp_path / "d", n=4))
    bad = Path(dl.items[1]["image"])
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=r"case1\.nii\.gz.*truncated"):
        build_cache(dl, CFG, tmp_path / "c", workers=1, with_labels=True)
    assert len(entry_dirs(tmp_path / "c")) == 1  # case0, written before the bad one, is kept
    idx = build_cache(dl, CFG, tmp_path / "c", workers=2, skip_bad=True, with_labels=True)  # process pool
    assert idx.ids == ["case0", "case2", "case3"] and (idx.reused, idx.built) == (1, 2)
    assert idx.rejected[0]["id"] == "case1" and "truncated" in idx.rejected[0]["reason"]
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".tmp")]


def test_interrupted_build_leaves_no_partial_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dl = load_datalist(make_dataset(tmp_path / "d"))
    real = cache_mod._write_b2nd
    calls = {"n": 0}

    def flaky(array, path):
        calls["n"] += 1
        if calls["n"] == 3:  # case1's image: the process "dies" mid-build
            raise KeyboardInterrupt
        real(array, path)

    monkeypatch.setattr(cache_mod, "_write_b2nd", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cache(dl, CFG, tmp_path / "c", with_labels=True)
    monkeypatch.setattr(cache_mod, "_write_b2nd", real)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(names) == 1 and names[0].startswith("case0-")  # no temp folder, no half entry
    idx = build_cache(dl, CFG, tmp_path / "c", with_labels=True)
    assert (idx.reused, idx.built) == (1, 2)


def test_ensure_cache_dirs_and_labels_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_dataset(tmp_path / "d", n=2)
    cfg = DataConfig(root=str(ds), preprocess=CFG, num_workers=1)
    idx = ensure_cache(cfg, with_labels=False)
    assert idx.cache_dir == tmp_path / "d" / ".asa3d_cache" and not idx.cases[0].has_label
    assert idx.label_names == {}
    other = ensure_cache(
        DataConfig(root=str(ds), preprocess=CFG, cache_dir=str(tmp_path / "x"), num_workers=1),
        with_labels=True,
    )
    assert other.cache_dir == tmp_path / "x" and other.cases[0].has_label
    # an image-only request reuses the labelled entries instead of preprocessing again
    again = ensure_cache(
        DataConfig(root=str(ds), preprocess=CFG, cache_dir=str(tmp_path / "x"), num_workers=1),
        with_labels=False,
    )
    assert (again.reused, again.built) == (2, 0) and again.label_names == {}
    monkeypatch.setattr(os, "access", lambda *a: False)  # read-only dataset folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    assert default_cache_dir(ds).parent == tmp_path / "home" / "asa3d"
    with pytest.raises(DataError, match="data.root is not set"):
        ensure_cache(DataConfig(), with_labels=False)


def test_preset_split_written_and_dicom_mhd_sources(tmp_path: Path) -> None:
    import json

    import SimpleITK as sitk

    from asa3d.data.io import Volume, write_volume
    from test_data_io import write_dicom_series

    rng = np.random.default_rng(2)
    root = tmp_path / "btcv"
    for i in (1, 35):
        img = rng.integers(-1000, 1000, (32, 32, 6)).astype(np.int16)
        write_volume(img, root / "RawData" / "Training" / "img" / f"img{i:04d}.nii.gz", AFF)
        write_volume(
            (img > 0).astype(np.uint8), root / "RawData" / "Training" / "label" / f"label{i:04d}.nii.gz", AFF
        )
    idx = ensure_cache(
        DataConfig(root=str(root), preset="btcv", split="test", preprocess=CFG, num_workers=1), True
    )
    assert idx.ids == ["img0035"] and idx.label_names[6] == "liver"
    split = json.loads((root / ".asa3d_cache" / "splits" / "btcv.json").read_text())
    assert (
        split["test"] == ["img0035"] and split["training"] == ["img0001"] and "paper" in split["provenance"]
    )

    # a DICOM series folder and an MHD (header + data file) are hashed over all their files
    folder = tmp_path / "scans"
    vol = Volume(rng.integers(-1000, 1000, (32, 32, 5)).astype(np.int16), AFF, folder)
    write_dicom_series(vol, folder / "series")
    write_volume(vol.array, folder / "scan.nii", AFF)  # -> an uncompressed MHD + .raw pair:
    sitk.WriteImage(sitk.ReadImage(str(folder / "scan.nii")), str(folder / "scan.mhd"), useCompression=False)
    (folder / "scan.nii").unlink()
    dl = load_datalist(folder)
    first = build_cache(dl, CFG, tmp_path / "c")
    assert first.ids == ["scan", "series"] and first.built == 2
    np.testing.assert_allclose(first.cases[0].image(), first.cases[1].image(), atol=2e-5)  # same volume
    raw = folder / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:-2] + b"\x01\x02")  # the header file is unchanged
    dcm = sorted((folder / "series").iterdir())[0]
    data = bytearray(dcm.read_bytes())
    data[-1] ^= 0x01
    dcm.write_bytes(bytes(data))
    again = build_cache(dl, CFG, tmp_path / "c")
    assert (again.built, again.reused) == (2, 0)

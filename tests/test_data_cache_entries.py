"""Cache entries and the index as a user meets them: the messages that name a damaged, missing or
unreadable file and its fix, what ``index.json`` / ``meta.json`` record, which leftovers a build
removes, and the source files a scan's key covers. Tiny 8^3 volumes at the target spacing."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asa3d.config_sections import PreprocessConfig
from asa3d.data import cache as cache_mod
from asa3d.data.cache import (
    CachedCase,
    CacheIndex,
    build_cache,
    build_entry,
    content_hash,
    file_checksum,
    lookup_entry,
    remove_stale_entries,
    verify_entry_files,
)
from asa3d.data.datalist import Datalist
from asa3d.data.errors import DataError

CFG = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
AFF = np.diag([4.0, 4.0, 4.0, 1.0])  # RAS at the target spacing: preprocessing keeps the grid


def _scan(root: Path, i: int, label: bool = True, lo: int = -1000) -> dict[str, str]:
    rng = np.random.default_rng(i)
    img = rng.integers(lo, 1200, (8, 8, 8)).astype(np.int16)
    root.mkdir(parents=True, exist_ok=True)
    item = {"id": f"case{i}", "image": str(root / f"case{i}.nii.gz")}
    nib.save(nib.Nifti1Image(img, AFF), item["image"])
    if label:
        lab = np.zeros(img.shape, np.uint8)
        lab[1:4, 2:6, 3:7] = 1
        lab[5:7, 5:7, 5:7] = 3
        item["label"] = str(root / f"label{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, AFF), item["label"])
    return item


def _datalist(root: Path, items: list[dict[str, str]], label_names: dict[int, str] | None = None) -> Datalist:
    return Datalist(items=items, label_names=label_names or {}, name="toy", root=root)


def _ours(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asa3d.data.cache" and r.levelno == level]


@pytest.fixture(autouse=True)
def _fresh_process() -> None:
    cache_mod._VERIFIED.clear()  # each test sees the files as a new process would


# --------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------
def test_checksum_is_blake2b_of_the_whole_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 7)
    (tmp_path / "f").write_bytes(data)
    assert file_checksum(tmp_path / "f") == hashlib.blake2b(data, digest_size=16).hexdigest()


def test_entry_verification_names_the_file_and_the_problem(tmp_path: Path) -> None:
    (tmp_path / "image.b2nd").write_bytes(b"image bytes")
    (tmp_path / "label.b2nd").write_bytes(b"label bytes")
    good = {n: file_checksum(tmp_path / n) for n in ("image.b2nd", "label.b2nd")}
    assert verify_entry_files(tmp_path, {}) == "no checksums recorded"
    assert verify_entry_files(tmp_path, {"image.b2nd": good["image.b2nd"]}) is None
    # the first file was verified before: the second is still checked
    bad = {**good, "label.b2nd": "0" * 32}
    assert verify_entry_files(tmp_path, bad) == (
        f"{tmp_path / 'label.b2nd'} does not match its checksum (flipped bytes or a truncated file)"
    )
    assert verify_entry_files(tmp_path, good) is None
    assert verify_entry_files(tmp_path, {**good, "fg.npy": "0" * 32}) == f"{tmp_path / 'fg.npy'} is missing"
    (tmp_path / "dir.b2nd").mkdir()
    got = verify_entry_files(tmp_path, {"dir.b2nd": "0" * 32})
    assert got is not None and got.startswith(f"{tmp_path / 'dir.b2nd'} cannot be read (")


def test_a_verified_file_is_hashed_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "image.b2nd").write_bytes(b"image bytes")
    sums = {"image.b2nd": file_checksum(tmp_path / "image.b2nd")}
    assert verify_entry_files(tmp_path, sums) is None
    calls = []
    monkeypatch.setattr(cache_mod, "file_checksum", lambda p: calls.append(p) or "x")
    assert verify_entry_files(tmp_path, sums) is None and calls == []
    os.utime(tmp_path / "image.b2nd", ns=(1, 1))  # another mtime: hashed again
    assert verify_entry_files(tmp_path, sums) is not None and len(calls) == 1


# --------------------------------------------------------------------------------------------
# what a scan's key covers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "data_name"),
    [
        ("ObjectType = Image\nElementDataFile = scan.raw\n", "scan.raw"),
        ("ObjectType = Image\nelementdatafile:data.bin  \n", "data.bin"),
        ("NRRD0004\ndata file: vol.raw\n", "vol.raw"),
        ("NRRD0004\ndatafile = vol.raw\n", "vol.raw"),
    ],
)
@pytest.mark.parametrize("suffix", [".mhd", ".MHD", ".nhdr"])
def test_a_header_files_key_covers_its_data_file(
    tmp_path: Path, header: str, data_name: str, suffix: str
) -> None:
    hdr = tmp_path / f"scan{suffix}"
    hdr.write_text(header)
    (tmp_path / data_name).write_bytes(b"\x00\x01" * 50)
    before = content_hash(hdr)
    (tmp_path / data_name).write_bytes(b"\x00\x02" * 50)
    assert content_hash(hdr) != before


def test_an_inline_header_has_no_data_file(tmp_path: Path) -> None:
    hdr = tmp_path / "scan.mhd"
    hdr.write_text("ObjectType = Image\nElementDataFile = LOCAL\n")
    assert content_hash(hdr) == content_hash(hdr)  # no file called LOCAL is looked for


def test_a_series_folder_key_covers_every_file_by_name(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)  # a subfolder is not part of the scan
        (d / "sub" / "x").write_text("ignored")
    (a / "1.dcm").write_bytes(b"one")
    (a / "2.dcm").write_bytes(b"two")
    (b / "1.dcm").write_bytes(b"two")
    (b / "2.dcm").write_bytes(b"one")
    assert content_hash(a) != content_hash(b)  # same bytes, other slice order
    (b / "1.dcm").write_bytes(b"one")
    (b / "2.dcm").write_bytes(b"two")
    assert content_hash(a) == content_hash(b)
    (b / "2.dcm").rename(b / "3.dcm")
    assert content_hash(a) != content_hash(b)


def test_an_unreadable_source_is_named_with_the_fix(tmp_path: Path) -> None:
    hdr = tmp_path / "scan.mhd"
    hdr.write_text("ElementDataFile = gone.raw\n")
    with pytest.raises(DataError) as err:
        content_hash(hdr)
    gone = tmp_path / "gone.raw"
    assert str(err.value).startswith(f"{gone}: cannot read (")
    assert str(err.value).endswith("). Check that the file exists and is readable.")
    assert err.value.path == str(gone)


# --------------------------------------------------------------------------------------------
# entries
# --------------------------------------------------------------------------------------------
def test_entry_records_what_was_built(tmp_path: Path) -> None:
    item = _scan(tmp_path / "d", 0)
    item["id"] = "a b/c?"
    case, reused = build_entry(item, CFG, tmp_path / "c", True, None)
    assert not reused and case.dir.name.startswith("a_b_c_-") and case.dir.is_dir()
    meta = json.loads((case.dir / "meta.json").read_text())
    src = nib.load(item["image"]).get_fdata()
    assert meta["stats"] == pytest.approx(
        {
            "min": src.min(),
            "max": src.max(),
            "mean": src.mean(),
            "p01": np.percentile(src, 1),
            "p99": np.percentile(src, 99),
        }
    )
    assert meta["label_values"] == [0, 1, 3] and meta["has_label"] and meta["label_source"] == item["label"]
    assert set(meta["checksums"]) == {"image.b2nd", "label.b2nd", "fg.npy"}
    assert all(meta["checksums"][f] == file_checksum(case.dir / f) for f in meta["checksums"])
    assert meta == case.to_json()
    assert sorted(p.name for p in case.dir.iterdir()) == ["fg.npy", "image.b2nd", "label.b2nd", "meta.json"]
    # image only: no label files, no foreground
    img_only, _ = build_entry(_scan(tmp_path / "d", 1, label=False), CFG, tmp_path / "c", False, None)
    assert img_only.label() is None and not img_only.has_label and img_only.label_source is None
    assert set(img_only.checksums) == {"image.b2nd"} and img_only.label_values == []
    fg = img_only.foreground_coords()
    assert fg.shape == (0, 3) and fg.dtype == np.int32
    # a long id is cut to 80 characters in the folder name
    long_item = _scan(tmp_path / "d", 2, label=False)
    long_item["id"] = "x" * 100
    long_case, _ = build_entry(long_item, CFG, tmp_path / "c", False, None)
    assert long_case.dir.name.split("-")[0] == "x" * 80


def test_foreground_sample_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "MAX_FG_COORDS", 10)
    case, _ = build_entry(_scan(tmp_path / "d", 0), CFG, tmp_path / "c", True, None)
    fg = case.foreground_coords()
    lab = case.label()
    assert fg.shape == (10, 3) and len({tuple(r) for r in fg}) == 10
    assert all(lab[tuple(r)] > 0 for r in fg)


def test_json_round_trip_and_defaults_of_older_entries(tmp_path: Path) -> None:
    case, _ = build_entry(_scan(tmp_path / "d", 0, lo=0), CFG, tmp_path / "c", True, None)
    assert case.warnings  # values >= 0: not HU-like; the warning is kept with the entry
    back = CachedCase.from_json(json.loads(json.dumps(case.to_json())), tmp_path / "c")
    assert back.to_json() == case.to_json() and back.dir == case.dir
    minimal = {k: case.to_json()[k] for k in ("id", "dir", "key", "shape", "spacing", "affine", "source")}
    minimal |= {"source_affine": case.to_json()["source_affine"], "source_shape": [8, 8, 8]}
    old = CachedCase.from_json(minimal, tmp_path / "c")
    assert (old.label_source, old.has_label, old.label_values, old.warnings, old.stats, old.checksums) == (
        None,
        False,
        [],
        [],
        {},
        {},
    )
    assert old.shape == (8, 8, 8) and isinstance(old.shape, tuple) and isinstance(old.spacing, tuple)


def test_reader_refuses_a_damaged_or_undecodable_entry(tmp_path: Path) -> None:
    case, _ = build_entry(_scan(tmp_path / "d", 0), CFG, tmp_path / "c", True, None)
    (case.dir / "label.b2nd").unlink()
    with pytest.raises(DataError) as err:
        case.label()
    assert str(err.value) == (
        f"cache entry of case 'case0' is damaged: {case.dir / 'label.b2nd'} is missing. Run `asa3d data "
        "prepare` with the same data settings (it rebuilds damaged entries), or delete the folder "
        f"{case.dir}."
    )
    assert err.value.path == str(case.dir / "label.b2nd")
    # checksums that match but bytes blosc2 cannot decode
    del case.checksums["label.b2nd"]
    (case.dir / "image.b2nd").write_bytes(b"not blosc2")
    case.checksums["image.b2nd"] = file_checksum(case.dir / "image.b2nd")
    with pytest.raises(DataError) as err:
        case.image()
    msg = str(err.value)
    assert msg.startswith(f"{case.dir / 'image.b2nd'}: cannot decode this cache file (")
    assert msg.endswith(f"). Delete {case.dir} and run `asa3d data prepare` again.")
    assert err.value.path == str(case.dir / "image.b2nd")


def test_a_damaged_meta_json_is_removed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    item = _scan(tmp_path / "d", 0)
    case, _ = build_entry(item, CFG, tmp_path / "c", True, None)
    (case.dir / "meta.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="asa3d.data.cache"):
        key, found = lookup_entry(item, CFG, tmp_path / "c", True)
    assert found is None and key == case.key and not case.dir.exists()
    assert _ours(caplog) == [
        f"cache entry {case.dir} is damaged ({case.dir / 'meta.json'} is unreadable (JSONDecodeError)): "
        "rebuilding it"
    ]


def test_labels_requested_for_a_case_without_one(tmp_path: Path) -> None:
    item = _scan(tmp_path / "d", 0, label=False)
    with pytest.raises(DataError) as err:
        lookup_entry(item, CFG, tmp_path / "c", True)
    assert str(err.value) == (
        f"{item['image']}: no label map listed for this case, but labels were requested. Add its label "
        "(dataset.json 'label' / --labels folder) or build without labels."
    )
    assert err.value.path == item["image"]


def test_an_image_only_lookup_is_served_by_the_labelled_entry(tmp_path: Path) -> None:
    item = _scan(tmp_path / "d", 0)
    case, _ = build_entry(item, CFG, tmp_path / "c", True, None)
    key, found = lookup_entry(item, CFG, tmp_path / "c", False)
    assert found is not None and found.dir == case.dir and key != case.key
    again, reused = build_entry(item, CFG, tmp_path / "c", False, None)
    assert reused and again.dir == case.dir
    os.remove(item["label"])  # the label file is gone: no labelled entry can be meant
    assert lookup_entry(item, CFG, tmp_path / "c", False)[1] is None


def test_a_concurrent_identical_build_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = _scan(tmp_path / "d", 0)
    first, _ = build_entry(item, CFG, tmp_path / "c", True, None)
    monkeypatch.setattr(cache_mod, "lookup_entry", lambda *a: (first.key, None))  # it raced us
    second, reused = build_entry(item, CFG, tmp_path / "c", True, None)
    assert not reused and second.dir == first.dir
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [first.dir.name]  # our temp folder is gone
    # a folder in the way that is not a complete entry is an error, and our temp folder still goes
    (first.dir / "meta.json").unlink()
    with pytest.raises(OSError):
        build_entry(item, CFG, tmp_path / "c", True, None)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [first.dir.name]


def test_a_preprocessing_failure_names_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asa3d.data.preprocess as pre

    def boom(*a):  # noqa: ANN002, ANN202
        raise RuntimeError("spacing out of range")

    monkeypatch.setattr(pre, "preprocess_volumes", boom)
    item = _scan(tmp_path / "d", 0)
    with pytest.raises(DataError) as err:
        build_entry(item, CFG, tmp_path / "c", True, None)
    assert str(err.value) == f"{item['image']}: preprocessing failed (RuntimeError: spacing out of range)."
    assert err.value.path == item["image"]


# --------------------------------------------------------------------------------------------
# the index
# --------------------------------------------------------------------------------------------
def test_index_holds_every_split_and_survives_a_damaged_file(tmp_path: Path) -> None:
    cdir = tmp_path / "c"
    case, _ = build_entry(_scan(tmp_path / "d", 0), CFG, cdir, True, None)
    rejected = [{"id": "case9", "path": "/x/case9.nii.gz", "reason": "truncated"}]
    train = CacheIndex(cdir, [case], {0: "background", 3: "kidney"}, {"p": 1}, "toy", "training", rejected)
    test = CacheIndex(cdir, [], {}, {"p": 1}, "toy", "test")
    path = train.save()
    assert path == cdir / "index.json"
    test.save()
    doc = json.loads(path.read_text())
    assert doc["format"] == "asa3d-cache-index/1" and sorted(doc["datalists"]) == ["toy/test", "toy/training"]
    assert doc["datalists"]["toy/training"]["label_names"] == {"0": "background", "3": "kidney"}
    got = CacheIndex.load(cdir, "toy", "training")
    assert got.ids == ["case0"] and got.label_names == {0: "background", 3: "kidney"}
    assert (
        got.rejected == rejected
        and got.preprocess == {"p": 1}
        and (got.name, got.split) == ("toy", "training")
    )
    assert CacheIndex.load(cdir, None, "test").split == "test"  # any datalist with that split
    assert CacheIndex.load(cdir).ids == ["case0"]  # default: the training split
    # a damaged index, or one of another format, is replaced by this split alone
    for text in ("{", json.dumps({"format": "asa3d-cache-index/0", "datalists": {"old/training": {}}})):
        path.write_text(text)
        test.save()
        assert list(json.loads(path.read_text())["datalists"]) == ["toy/test"]


def test_index_errors_name_the_file_and_what_exists(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        CacheIndex.load(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'index.json'}: cannot read the cache index (")
    assert str(err.value).endswith("). Rebuild with `asa3d data prepare`.")
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(DataError, match=r"cannot read the cache index \(Expecting"):
        CacheIndex.load(tmp_path)
    CacheIndex(tmp_path, [], {}, {}, "toy", "training").save()
    with pytest.raises(DataError) as err:
        CacheIndex.load(tmp_path, "toy", "validation")
    assert (
        str(err.value)
        == f"{tmp_path / 'index.json'}: no datalist toy/validation in this cache (have ['toy/training'])."
    )
    with pytest.raises(DataError, match=r"no datalist \*/test in this cache"):
        CacheIndex.load(tmp_path, None, "test")
    with pytest.raises(DataError, match="no datalist other/training"):
        CacheIndex.load(tmp_path, "other")


# --------------------------------------------------------------------------------------------
# leftovers of killed builds
# --------------------------------------------------------------------------------------------
def _age(p: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(p, (t, t))


def test_leftovers_by_host_and_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cache_mod.socket, "gethostname", lambda: "node-7.cluster-with-a-rather-long-domain")
    host = cache_mod._host_tag()
    assert "-" not in host and len(host) <= 32
    dead_pid = 2**22 + 12345  # above pid_max: no such process
    mine_dead = tmp_path / f".tmp-case0-abc-{host}-{dead_pid}-0123abcd"
    mine_live = tmp_path / f".tmp-case1-abc-{host}-{os.getpid()}-0123abcd"
    other_old = tmp_path / f".tmp-case2-abc-otherhost-{os.getpid()}-0123abcd"
    other_new = tmp_path / f".tmp-case3-abc-otherhost-{dead_pid}-0123abcd"
    unparsable_old = tmp_path / ".tmp-case4"
    for d in (mine_dead, mine_live, other_old, other_new, unparsable_old):
        d.mkdir()
    _age(mine_live, 3 * 24 * 3600)  # old but its writer lives: kept
    _age(other_old, 24 * 3600 + 60)
    _age(other_new, 24 * 3600 - 60)
    _age(unparsable_old, 2 * 24 * 3600)
    idx_old, idx_new = tmp_path / ".index.json.a1.tmp", tmp_path / ".index.json.b2.tmp"
    idx_old.write_text("{")
    idx_new.write_text("{")
    _age(idx_old, 61)
    _age(idx_new, 30)  # a live writer's
    with caplog.at_level(logging.INFO, logger="asa3d.data.cache"):
        removed = remove_stale_entries(tmp_path)
    assert sorted(removed) == sorted([mine_dead, other_old, unparsable_old, idx_old])
    assert all(not p.exists() for p in removed)
    assert mine_live.exists() and other_new.exists() and idx_new.exists()
    assert _ours(caplog, logging.INFO) == [
        f"removed 4 leftover temporary item(s) of an interrupted build in {tmp_path}"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asa3d.data.cache"):
        assert remove_stale_entries(tmp_path) == []
    assert _ours(caplog, logging.INFO) == []


def test_a_pid_of_another_user_counts_as_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(pid: int, sig: int) -> None:
        raise PermissionError

    monkeypatch.setattr(cache_mod.os, "kill", denied)
    assert cache_mod._pid_alive(1)


# --------------------------------------------------------------------------------------------
# build_cache
# --------------------------------------------------------------------------------------------
def test_build_cache_names_labels_logs_warnings_once_and_records_rejects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = [_scan(tmp_path / "d", 0), _scan(tmp_path / "d", 1, lo=0), _scan(tmp_path / "d", 2)]
    Path(items[2]["image"]).write_bytes(b"broken")
    dl = _datalist(tmp_path / "d", items)
    with caplog.at_level(logging.WARNING, logger="asa3d.data.cache"):
        idx = build_cache(dl, CFG, tmp_path / "c", skip_bad=True, with_labels=True)
    assert idx.ids == ["case0", "case1"] and (idx.built, idx.reused) == (2, 0)
    assert idx.label_names == {0: "background", 1: "class_1", 3: "class_3"}  # none listed: named by value
    assert idx.preprocess == {**CFG.contract(), "image_interp": "bilinear"}
    assert [r["id"] for r in idx.rejected] == ["case2"] and idx.rejected[0]["path"] == items[2]["image"]
    warned = _ours(caplog)
    assert warned[0] == f"skipped case2: {idx.rejected[0]['reason']}"
    assert len(warned) == 2 and "intensities do not look like Hounsfield units" in warned[1]
    assert items[1]["image"] in warned[1]  # the warning of the scan with values >= 0
    assert CacheIndex.load(tmp_path / "c", "toy").ids == idx.ids  # saved
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asa3d.data.cache"):
        again = build_cache(dl, CFG, tmp_path / "c", skip_bad=True, with_labels=True)
    assert (again.built, again.reused) == (0, 2)
    assert _ours(caplog) == [f"skipped case2: {idx.rejected[0]['reason']}"]  # not the reused scan's again
    named = build_cache(
        _datalist(tmp_path / "d", items[:1], {0: "bg", 1: "a", 3: "b"}), CFG, tmp_path / "c", with_labels=True
    )
    assert named.label_names == {0: "bg", 1: "a", 3: "b"}
    assert build_cache(_datalist(tmp_path / "d", items[:1], {0: "bg"}), CFG, tmp_path / "c").label_names == {}


def test_build_cache_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    item = _scan(tmp_path / "d", 0)
    with pytest.raises(DataError) as err:
        build_cache(_datalist(tmp_path / "d", [item]), CFG, tmp_path / "file" / "c")
    assert str(err.value).startswith(f"{tmp_path / 'file' / 'c'}: cannot create the cache folder (")
    assert str(err.value).endswith("). Set data.cache_dir / --cache-dir to a writable folder.")
    bad = _scan(tmp_path / "d", 1, label=False)
    Path(bad["image"]).write_bytes(b"broken")
    with pytest.raises(DataError) as err:
        build_cache(_datalist(tmp_path / "d", [bad]), CFG, tmp_path / "c", skip_bad=True)
    assert str(err.value).startswith(f"no usable scans in {tmp_path / 'd'}: all 1 were rejected (first: ")
    assert err.value.path == str(tmp_path / "d")
    with pytest.raises(DataError, match="all 1 were rejected"):  # labels requested, none listed
        build_cache(_datalist(tmp_path / "d", [_scan(tmp_path / "e", 2, label=False)]), CFG, tmp_path / "c",
                    skip_bad=True, with_labels=True)  # fmt: skip

    # anything a worker raises reaches the user as a DataError naming the scan
    def crash(*a):  # noqa: ANN002, ANN202
        raise ValueError("disk full")

    monkeypatch.setattr(cache_mod, "build_entry", crash)
    with pytest.raises(DataError) as err:
        build_cache(_datalist(tmp_path / "d", [_scan(tmp_path / "f", 3)]), CFG, tmp_path / "c")
    assert str(err.value) == f"{tmp_path / 'f' / 'case3.nii.gz'}: ValueError: disk full"
    assert err.value.path == str(tmp_path / "f" / "case3.nii.gz")


# --------------------------------------------------------------------------------------------
# build workers die with the process that started them
# --------------------------------------------------------------------------------------------
class _Exit(Exception):
    pass


def test_a_worker_exits_when_its_parent_dies_or_it_is_orphaned(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a build worker sets up (run here in-process, its effects recorded): the kernel's parent
    death signal, one intra-op thread, and a watchdog that ends the worker once the process that
    started the build is gone or the worker was re-parented to init."""
    import ctypes
    import signal
    import threading

    import torch

    prctl: list[tuple] = []

    class Libc:
        def prctl(self, *args: int) -> int:
            prctl.append(args)
            return 0

    started: list[threading.Thread] = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self))
    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(cache_mod.sys, "platform", "linux")
    cache_mod._init_worker(4321)
    assert prctl == [(1, signal.SIGKILL, 0, 0, 0)] and threads == [1]
    (watchdog,) = started
    assert watchdog.daemon and watchdog.name == "asa3d-parent-watchdog"

    def run_watchdog(alive_polls: int, orphaned: bool = False) -> tuple[int, list[int]]:
        polls: list[int] = []

        def alive(pid: int) -> bool:
            polls.append(pid)
            return len(polls) <= alive_polls

        def exit_(code: int) -> None:
            raise _Exit(code)

        monkeypatch.setattr(cache_mod, "_pid_alive", alive)
        monkeypatch.setattr(cache_mod.os, "getppid", lambda: 1 if orphaned else 77)
        monkeypatch.setattr(cache_mod.os, "_exit", exit_)
        naps: list[float] = []
        monkeypatch.setattr(cache_mod.time, "sleep", naps.append)
        with pytest.raises(_Exit) as ended:
            watchdog._target()  # type: ignore[attr-defined]
        assert naps and all(0 < s <= 0.5 for s in naps)  # an orphan stops within half a second
        return ended.value.args[0], polls

    assert run_watchdog(alive_polls=3) == (1, [4321] * 4)  # polls while the parent lives, then exits 1
    assert run_watchdog(alive_polls=10, orphaned=True) == (1, [4321])
    started.clear()
    prctl.clear()
    monkeypatch.setattr(cache_mod.sys, "platform", "darwin")
    cache_mod._die_with(4321)
    assert prctl == [] and len(started) == 1  # elsewhere: the watchdog alone


def test_labels_outside_the_declared_classes_are_refused(tmp_path: Path) -> None:
    item = _scan(tmp_path / "d", 0)  # label values 0, 1, 3
    dl = _datalist(tmp_path / "d", [item], {0: "background", 1: "liver"})
    with pytest.raises(DataError, match=r"label values \[3\] are not among the declared classes \[0, 1\]"):
        build_cache(dl, CFG, tmp_path / "c", with_labels=True)
    dl.label_names[3] = "kidney"
    assert build_cache(dl, CFG, tmp_path / "c", with_labels=True).cases[0].label_values == [0, 1, 3]


def test_progress_bar_counts_the_scans_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Tty()
    monkeypatch.setattr(cache_mod.sys, "stderr", term)
    items = [_scan(tmp_path / "d", i, label=False) for i in range(2)]
    build_cache(_datalist(tmp_path / "d", items), CFG, tmp_path / "c", progress=True)
    assert "caching toy: 100%" in term.getvalue() and "2/2" in term.getvalue()
    quiet = Tty()
    monkeypatch.setattr(cache_mod.sys, "stderr", quiet)
    build_cache(_datalist(tmp_path / "d", items), CFG, tmp_path / "c2")
    assert quiet.getvalue() == ""


def test_an_index_temp_file_removed_by_someone_else_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / ".index.json.a1.tmp"
    tmp.write_text("{")
    _age(tmp, 120)

    def gone(self: Path, missing_ok: bool = False) -> None:
        raise FileNotFoundError(self)

    monkeypatch.setattr(Path, "unlink", gone)  # a concurrent build removed it between glob and unlink
    assert remove_stale_entries(tmp_path) == []

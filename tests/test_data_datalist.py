"""Datalists: MSD dataset.json round trip, folders with label folders, presets on fake layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asa3d.data.datalist import load_datalist, write_datalist_json
from asa3d.data.errors import DataError
from asa3d.data.msd_json import write_dataset_json
from asa3d.data.presets import BTCV_LABELS, SPLIT_SEED


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_dataset_json_round_trip(tmp_path: Path) -> None:
    for i in range(4):
        touch(tmp_path / "imagesTr" / f"c{i}.nii.gz")
        touch(tmp_path / "labelsTr" / f"c{i}.nii.gz")
    tr = [{"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"} for i in range(3)]
    va = [{"image": "imagesTr/c3.nii.gz", "label": "labelsTr/c3.nii.gz"}]
    p = write_dataset_json(
        tmp_path / "dataset.json", "toy", {0: "background", 1: "liver"}, tr, va, test=["imagesTr/c3.nii.gz"]
    )
    train = load_datalist(p)
    assert [it["id"] for it in train.items] == ["c0", "c1", "c2"]
    assert train.label_names == {0: "background", 1: "liver"} and train.has_labels
    assert Path(train.items[0]["image"]) == (tmp_path / "imagesTr" / "c0.nii.gz").resolve()
    val = load_datalist(tmp_path, split="validation")  # a folder holding dataset.json
    test = load_datalist(p, split="test")
    assert [it["id"] for it in val.items] == ["c3"] and "label" not in test.items[0]
    assert len(load_datalist(p, split="all")) == 4

    out = tmp_path / "copy" / "dataset.json"
    write_datalist_json(out, {"training": train, "validation": val, "test": test}, "toy", train.label_names)
    again = {s: load_datalist(out, split=s) for s in ("training", "validation", "test")}
    assert again["training"].items == train.items and again["validation"].items == val.items
    assert again["test"].items == test.items and again["training"].label_names == train.label_names


def test_dataset_json_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        load_datalist(bad)
    p = write_dataset_json(tmp_path / "d.json", "x", {}, [{"image": "a.nii.gz"}])
    with pytest.raises(DataError, match=r"split 'validation' is empty"):
        load_datalist(p, split="validation")
    with pytest.raises(DataError, match="data.root"):
        load_datalist(None)


def test_folder_with_labels(tmp_path: Path) -> None:
    for name in ("a_0000.nii.gz", "b.nii.gz", "c.mhd", "c.raw", "notes.txt"):
        touch(tmp_path / "img" / name)
    touch(tmp_path / "img" / "series1" / "x.dcm")
    for name in ("a.nii.gz", "b.nii.gz", "c.nrrd", "series1.nii.gz"):
        touch(tmp_path / "lab" / name)
    dl = load_datalist(tmp_path / "img", labels=tmp_path / "lab")
    assert [it["id"] for it in dl.items] == ["a_0000", "b", "c", "series1"]
    assert [Path(it["label"]).name for it in dl.items] == ["a.nii.gz", "b.nii.gz", "c.nrrd", "series1.nii.gz"]
    assert Path(dl.items[3]["image"]).is_dir()
    (tmp_path / "lab" / "b.nii.gz").unlink()
    with pytest.raises(DataError, match=r"lab: no label map for 1 scan\(s\) \(\['b'\]"):
        load_datalist(tmp_path / "img", labels=tmp_path / "lab")
    assert len(load_datalist(tmp_path / "img")) == 4
    with pytest.raises(DataError, match="only one split"):
        load_datalist(tmp_path / "img", split="validation")


def test_btcv_preset(tmp_path: Path) -> None:
    ids = [*range(1, 11), *range(21, 41)]
    for i in ids:
        touch(tmp_path / "RawData" / "Training" / "img" / f"img{i:04d}.nii.gz")
        touch(tmp_path / "RawData" / "Training" / "label" / f"label{i:04d}.nii.gz")
    for i in range(61, 64):
        touch(tmp_path / "RawData" / "Testing" / "img" / f"img{i:04d}.nii.gz")
    tr = load_datalist(tmp_path, preset="btcv")
    te = load_datalist(tmp_path, preset="btcv", split="test")
    assert len(tr) == 24 and tr.has_labels and tr.label_names == BTCV_LABELS
    assert [it["id"] for it in te.items] == [f"img{i:04d}" for i in range(35, 41)]
    assert [it["id"] for it in load_datalist(tmp_path, preset="btcv", split="validation").items] == [
        it["id"] for it in te.items
    ]
    assert len(load_datalist(tmp_path, preset="btcv", split="unlabelled")) == 3
    assert len(load_datalist(tmp_path, preset="btcv", split="all")) == 33


def test_amos_presets(tmp_path: Path) -> None:
    root = tmp_path / "amos22"
    for folder, ids in (("Tr", [1, 5, 9, 507, 510]), ("Va", [2, 8, 508])):
        for i in ids:
            touch(root / f"images{folder}" / f"amos_{i:04d}.nii.gz")
            touch(root / f"labels{folder}" / f"amos_{i:04d}.nii.gz")
    touch(root / "imagesTs" / "amos_0003.nii.gz")
    paper = load_datalist(tmp_path, preset="amos22_paper")
    ct = load_datalist(tmp_path, preset="amos22_ct")
    assert [it["id"] for it in paper.items] == [
        "amos_0001",
        "amos_0005",
        "amos_0009",
        "amos_0507",
        "amos_0510",
    ]
    assert [it["id"] for it in ct.items] == ["amos_0001", "amos_0005", "amos_0009"]
    assert [it["id"] for it in load_datalist(tmp_path, preset="amos22_ct", split="test").items] == [
        "amos_0002",
        "amos_0008",
    ]
    assert len(paper.label_names) == 16 and any("MRI" in n for n in paper.notes)


def test_lits_preset_deterministic_split(tmp_path: Path) -> None:
    for batch, ids in (("Training Batch 1", range(0, 28)), ("Training Batch 2", range(28, 131))):
        for i in ids:
            touch(tmp_path / batch / f"volume-{i}.nii")
            touch(tmp_path / batch / f"segmentation-{i}.nii")
    tr = load_datalist(tmp_path, preset="lits")
    te = load_datalist(tmp_path, preset="lits", split="test")
    assert (len(tr), len(te)) == (95, 36) and tr.label_names == {0: "background", 1: "liver", 2: "tumor"}
    assert not {it["id"] for it in tr.items} & {it["id"] for it in te.items}
    assert te.items == load_datalist(tmp_path, preset="lits", split="test").items  # deterministic
    rec = tr.split_record
    assert rec["seed"] == SPLIT_SEED and len(rec["test"]) == 36 and "ours" in rec["provenance"]
    # the written split pins the choice: edit it and load it back
    split_file = tr.write_split(tmp_path / "splits" / "lits.json")
    doc = json.loads(split_file.read_text())
    doc["test"], doc["training"] = doc["test"][:-1], doc["training"] + doc["test"][-1:]
    split_file.write_text(json.dumps(doc))
    assert len(load_datalist(tmp_path, preset="lits", split="test", split_file=split_file)) == 35


def test_pancreas_preset_dicom_layout(tmp_path: Path) -> None:
    for i in range(1, 11):
        touch(tmp_path / "Pancreas-CT" / f"PANCREAS_{i:04d}" / "11-24-2015-Study" / "Series-1" / "1-001.dcm")
        touch(tmp_path / "TCIA_pancreas_labels-02-05-2017" / f"label{i:04d}.nii.gz")
    tr = load_datalist(tmp_path, preset="pancreas_ct")
    te = load_datalist(tmp_path, preset="pancreas_ct", split="test")
    assert (len(tr), len(te)) == (8, 2) and Path(tr.items[0]["image"]).name == "Series-1"
    assert tr.label_names == {0: "background", 1: "pancreas"}


def test_luna16_and_msd_presets(tmp_path: Path) -> None:
    for s in range(2):
        for j in range(3):
            touch(tmp_path / f"subset{s}" / f"1.3.6.1.{s}.{j}.mhd")
            touch(tmp_path / f"subset{s}" / f"1.3.6.1.{s}.{j}.raw")
    dl = load_datalist(tmp_path, preset="luna16")
    assert len(dl) == 6 and not dl.has_labels and dl.items[0]["id"] == "1.3.6.1.0.0"
    with pytest.raises(DataError, match="unknown preset"):
        load_datalist(tmp_path, preset="nope")
    with pytest.raises(DataError, match="preset 'btcv' found no"):
        load_datalist(tmp_path, preset="btcv")
    touch(tmp_path / "msd" / "imagesTr" / "x.nii.gz")
    write_dataset_json(
        tmp_path / "msd" / "dataset.json", "msd", {0: "bg", 1: "a"}, [{"image": "imagesTr/x.nii.gz"}]
    )
    assert load_datalist(tmp_path / "msd", preset="msd").items[0]["id"] == "x"

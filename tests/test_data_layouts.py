"""A user's own layout: `data index` on patient folders, nnU-Net and MSD as they come, DICOM
series recognised by content, dataset.json schema errors, `data summary` pointing to `data index`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asa3d.cli import main
from asa3d.data.datalist import load_datalist, unique_ids
from asa3d.data.errors import DataError

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def _ct(shape=(20, 18, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 800, shape).astype(np.int16)


def _mask(shape=(20, 18, 16), values=(1,)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        m[4 + 4 * i : 8 + 4 * i, 5:9, 5:9] = v
    return m


def patient_tree(root: Path, ids=("STS_002", "STS_003", "STS_008"), values=(1,)) -> Path:
    """STS_xxx/CT_image.nii.gz + CT_mask.nii.gz, as the IBSI sarcoma data ship."""
    for k, case in enumerate(ids):
        (root / case).mkdir(parents=True)
        nib.save(nib.Nifti1Image(_ct(seed=k), AFFINE), str(root / case / "CT_image.nii.gz"))
        nib.save(nib.Nifti1Image(_mask(values=values), AFFINE), str(root / case / "CT_mask.nii.gz"))
    return root


def test_index_patient_folders_then_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = patient_tree(tmp_path / "sts", values=(1, 2))
    out = tmp_path / "sts.json"
    args = ["data", "index", str(root), "--image", "*/CT_image.nii.gz", "--label", "*/CT_mask.nii.gz"]
    assert main([*args, "--out", str(out)]) == 0
    assert "3 training case(s)" in capsys.readouterr().out
    dl = load_datalist(out)
    assert [it["id"] for it in dl.items] == ["STS_002", "STS_003", "STS_008"]  # folder names
    assert all(Path(it["label"]).parent.name == it["id"] for it in dl.items)  # paired by folder
    assert dl.label_names == {0: "background", 1: "class_1", 2: "class_2"}  # read from the values
    # a rerun refuses to replace the json; --overwrite with explicit names does
    assert main([*args, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main([*args, "--out", str(out), "--overwrite", "--label-names", "0=background,1=tumour,2=edema"]) == 0
    )
    assert load_datalist(out).label_names == {0: "background", 1: "tumour", 2: "edema"}
    assert main(["data", "summary", str(out)]) == 0
    assert "3 cases, 3 usable, 0 rejected, 3 with labels" in capsys.readouterr().out


def test_index_unlabelled_images_go_to_test(tmp_path: Path) -> None:
    root = patient_tree(tmp_path / "p")
    (root / "STS_003" / "CT_mask.nii.gz").unlink()
    from asa3d.data.pattern_index import write_index

    res = write_index(root, "*/CT_image.nii.gz", tmp_path / "d.json", label="*/CT_mask.nii.gz")
    assert [c["id"] for c in res.training] == ["STS_002", "STS_008"]
    assert [c["id"] for c in res.unlabelled] == ["STS_003"]
    assert [it["id"] for it in load_datalist(tmp_path / "d.json", split="test").items] == ["STS_003"]


def test_index_refuses_bad_label_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = patient_tree(tmp_path / "p")
    rc = main(["data", "index", str(root), "--image", "*/CT_image.nii.gz", "--label-names", "tumour",
               "--out", str(tmp_path / "d.json")])  # fmt: skip
    assert rc == 2 and "INDEX=NAME" in capsys.readouterr().err


def test_summary_of_patient_folders_points_to_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = patient_tree(tmp_path / "sts")
    assert main(["data", "summary", str(root)]) == 2
    err = capsys.readouterr().err
    assert "nnU-Net" in err and "imagesTr" in err  # the layouts it understands
    assert f'asa3d data index {root} --image "*/CT_image.nii.gz" --label "*/CT_mask.nii.gz"' in err


def test_summary_exits_nonzero_when_nothing_usable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "scans"
    d.mkdir()
    for i in range(2):
        (d / f"s{i}.nii.gz").write_bytes(b"not a nifti at all")
    assert main(["data", "summary", str(d)]) == 2
    captured = capsys.readouterr()
    assert "0 usable, 2 rejected" in captured.out and "no usable case" in captured.err


def test_nnunet_v2_layout_as_it_comes(tmp_path: Path) -> None:
    root = tmp_path / "Dataset001_Sts"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for case in ("sts_001", "sts_002"):
        nib.save(nib.Nifti1Image(_ct(), AFFINE), str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(_mask(), AFFINE), str(root / "labelsTr" / f"{case}.nii.gz"))
    nib.save(nib.Nifti1Image(_ct(), AFFINE), str(root / "imagesTs" / "sts_009_0000.nii.gz"))
    doc = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "tumour": 1},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(doc))
    dl = load_datalist(root)
    assert [it["id"] for it in dl.items] == ["sts_001", "sts_002"]
    assert Path(dl.items[0]["image"]).name == "sts_001_0000.nii.gz"
    assert Path(dl.items[0]["label"]).name == "sts_001.nii.gz"
    assert dl.label_names == {0: "background", 1: "tumour"}
    assert [it["id"] for it in load_datalist(root, split="test").items] == ["sts_009"]
    # the same folder without its dataset.json: imagesTr/labelsTr matched by name
    (root / "dataset.json").unlink()
    dl = load_datalist(root)
    assert [Path(it["label"]).name for it in dl.items] == ["sts_001.nii.gz", "sts_002.nii.gz"]


def test_msd_list_naming_case_without_channel_suffix(tmp_path: Path) -> None:
    """MSD-converted nnU-Net v1 lists name imagesTr/x.nii.gz for the file imagesTr/x_0000.nii.gz."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(_ct(), AFFINE), str(tmp_path / "imagesTr" / "x_0000.nii.gz"))
    nib.save(nib.Nifti1Image(_mask(), AFFINE), str(tmp_path / "labelsTr" / "x.nii.gz"))
    doc = {"labels": {"0": "background", "1": "t"}, "training": [
        {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    (item,) = load_datalist(tmp_path).items
    assert Path(item["image"]).name == "x_0000.nii.gz" and Path(item["image"]).is_file()


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"training": "imagesTr/a.nii.gz"}, "'training' must be a list"),
        ({"training": [{"image": 3}]}, "'training'[0].image must be a path"),
        ({"training": [{"label": "a.nii.gz"}]}, "entry 0 of 'training'"),
        ({"training": [{"image": "a.nii.gz", "label": ["b"]}]}, "'training'[0].label must be a path"),
        ({"training": [{"image": "a.nii.gz"}], "labels": ["background"]}, "'labels' must map"),
    ],
)
def test_dataset_json_schema(tmp_path: Path, doc: dict, expected: str) -> None:
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="dataset.json") as exc:
        load_datalist(p)
    assert expected in str(exc.value)


def test_unique_ids_prefix_as_many_folders_as_needed() -> None:
    paths = [Path("A/x/CT.nii.gz"), Path("B/x/CT.nii.gz"), Path("C/y/MR.nii.gz")]
    assert unique_ids(paths) == ["A_x_CT", "B_x_CT", "MR"]
    assert unique_ids([Path("A/CT_image.nii.gz"), Path("B/CT_image.nii.gz")]) == ["A_CT_image", "B_CT_image"]
    # a scan at the file-system root: its id never takes the root ("/") as a folder name
    assert unique_ids([Path("/a.nii.gz"), Path("/x/a.nii.gz")]) == ["a", "x_a"]
    nested = [Path("/x/a.nii.gz"), Path("/y/x/a.nii.gz"), Path("/z/a.nii.gz")]
    assert unique_ids(nested) == ["x_a", "y_x_a", "z_a"]


def test_dicom_series_without_suffix_is_found(shared_data: Path, tmp_path: Path) -> None:
    """PACS exports name slices CT.1.3.12... with no .dcm: found by the DICM magic, read the same."""
    from asa3d.data.io import Volume, read_volume
    from test_data_io import write_dicom_series

    src = read_volume(shared_data / "ibsi_sts_ct" / "STS_002" / "CT_image.nii.gz")
    vol = Volume(src.array[60:90, 50:80, 20:26].astype(np.int16), src.affine, src.path)
    series = write_dicom_series(vol, tmp_path / "scans" / "patient1")
    for k, f in enumerate(sorted(series.iterdir())):
        f.rename(series / f"CT.1.3.12.2.1107.5.1.4.{k}")  # no suffix
    assert not any(f.suffix == ".dcm" for f in series.iterdir())
    dl = load_datalist(tmp_path / "scans")
    assert [it["id"] for it in dl.items] == ["patient1"]
    got = read_volume(dl.items[0]["image"])
    np.testing.assert_array_equal(got.array, vol.array)
    # the series folder itself is a data root too, and a predict input
    assert len(load_datalist(series).items) == 1
    from asa3d.eval.predict import resolve_inputs

    assert resolve_inputs([series]) == [{"id": "patient1", "image": str(series)}]
    assert resolve_inputs([tmp_path / "scans"])[0]["image"] == str(series)


def test_non_dicom_files_without_suffix_are_not_a_series(tmp_path: Path) -> None:
    from asa3d.data.io import is_dicom_dir

    d = tmp_path / "notes"
    d.mkdir()
    (d / "README").write_text("x" * 300)
    (d / "blob").write_bytes(bytes(range(256)) * 2)
    assert not is_dicom_dir(d)


def test_indexed_patient_folders_are_accepted_by_finetune(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = patient_tree(tmp_path / "sts", values=(1, 2))
    ds = tmp_path / "sts.json"
    args = ["data", "index", str(root), "--image", "*/CT_image.nii.gz", "--label", "*/CT_mask.nii.gz"]
    assert main([*args, "--label-names", "0=background,1=tumour,2=edema", "--out", str(ds)]) == 0
    run = tmp_path / "ft"
    over = [f"data.root={ds}", f"data.cache_dir={tmp_path / 'c'}", "train.iterations=6", "eval.split=null"]
    rc = main(["finetune", "--config", "finetune/phantom_tiny.yaml", "--out", str(run), *over])
    assert rc == 0
    info = json.loads((run / "model.json").read_text())
    assert info["n_classes"] == 3 and (run / "model_final.pt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["loss_last"] < metrics["loss_first"], metrics


def test_index_holds_out_validation_cases(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = patient_tree(tmp_path / "p")
    out = tmp_path / "d.json"
    rc = main(["data", "index", str(root), "--image", "*/CT_image.nii.gz", "--label", "*/CT_mask.nii.gz",
               "--validation", "1", "--seed", "3", "--out", str(out)])  # fmt: skip
    assert rc == 0 and "1 held out (validation)" in capsys.readouterr().out
    train = [it["id"] for it in load_datalist(out, split="training").items]
    val = [it["id"] for it in load_datalist(out, split="validation").items]
    assert len(val) == 1 and len(train) == 2 and not set(train) & set(val)
    assert sorted(train + val) == ["STS_002", "STS_003", "STS_008"]
    from asa3d.data.pattern_index import write_index

    again = write_index(root, "*/CT_image.nii.gz", tmp_path / "e.json", label="*/CT_mask.nii.gz",
                        validation=1, seed=3)  # fmt: skip
    assert [c["id"] for c in again.validation] == val  # the draw is seeded
    rc = main(["data", "index", str(root), "--image", "*/CT_image.nii.gz", "--label", "*/CT_mask.nii.gz",
               "--validation", "3", "--out", str(tmp_path / "f.json")])  # fmt: skip
    assert rc == 2 and "--validation 3 needs at least 4 labelled cases" in capsys.readouterr().err

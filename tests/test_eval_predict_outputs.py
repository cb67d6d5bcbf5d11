"""``asa3d predict`` as a user meets it: which inputs name which scans, the refusals of a bad
``--out`` or input (each message naming the path and the fix), the exact ``predictions.json``, the
inference settings a run uses, and what it logs. Tiny scans and a threshold 'model'."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import asa3d.eval.predict as predict_mod
from asa3d.config import ConfigError
from asa3d.data.errors import DataError
from asa3d.eval.predict import model_path_of, predict_files, prepare_out_dir, resolve_inputs

AFF = np.diag([4.0, 4.0, 4.0, 1.0])
INFO = {
    "preprocessing": {"orientation": "RAS", "spacing_mm": [4.0, 4.0, 4.0], "hu_window": [-175.0, 250.0]},
    "inference": {"roi_size": [16, 16, 16], "overlap": 0.25, "mode": "constant", "sw_batch_size": 2},
    "run_dir": "/runs/ft",
}


class Threshold(nn.Module):
    """Class 1 where the windowed intensity > 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


def _scan(path: Path, seed: int = 0, lo: float = -1000.0, nan: bool = False) -> Path:
    arr = np.random.default_rng(seed).uniform(lo, 0, (12, 10, 8)).astype(np.float32)
    arr[2:6, 2:6, 2:5] = 400.0  # class 1
    if nan:
        arr[0, 0, 0] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, AFF), str(path))
    return path


def _ours(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asa3d.eval.predict" and r.levelno == level]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def test_inputs_of_every_kind(tmp_path: Path) -> None:
    from asa3d.data.io import Volume
    from asa3d.data.msd_json import write_dataset_json
    from test_data_io import write_dicom_series

    single = _scan(tmp_path / "one" / "Scan.NII.GZ")  # suffixes in any case
    folder = tmp_path / "flat"
    _scan(folder / "x.nii.gz")
    _scan(folder / "y.nii.gz")
    series = write_dicom_series(Volume(np.zeros((8, 8, 3), np.int16), AFF, tmp_path), tmp_path / "series")
    slice_ = sorted(series.iterdir())[0]
    ds_root = tmp_path / "ds"
    for name in ("p", "q"):
        _scan(ds_root / "img" / f"{name}.nii.gz")
    ds = write_dataset_json(
        ds_root / "dataset.JSON",
        "toy",
        {},
        [{"image": "img/p.nii.gz"}],
        test=["img/q.nii.gz"],
    )
    got = resolve_inputs([single, folder, series, ds])
    assert got == [
        {"id": "x", "image": str(folder / "x.nii.gz")},
        {"id": "y", "image": str(folder / "y.nii.gz")},
        {"id": "p", "image": str(ds_root / "img" / "p.nii.gz")},
        {"id": "q", "image": str(ds_root / "img" / "q.nii.gz")},
        {"id": "Scan", "image": str(single)},
        {"id": "series", "image": str(series)},
    ]
    assert [c["id"] for c in resolve_inputs([ds], split="test")] == ["q"]
    # one slice of a series names the series; a scan listed twice is predicted once
    assert resolve_inputs([slice_, series, series]) == [{"id": "series", "image": str(series)}]
    # (the repeated name once made the id of every parent folder, "/" included: an output at the root)
    assert resolve_inputs([single, single.parent / ".." / "one" / single.name]) == [
        {"id": "Scan", "image": str(single)}
    ]


def test_inputs_that_name_nothing_usable(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        resolve_inputs([tmp_path / "missing.nii.gz"])
    assert str(err.value) == f"--input {tmp_path / 'missing.nii.gz'}: not found."
    assert err.value.path == str(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as err:
        resolve_inputs([tmp_path / "notes.txt"])
    assert str(err.value) == (
        f"--input {tmp_path / 'notes.txt'}: not a scan (NIfTI, MetaImage, NRRD, DICOM), a folder of scans "
        "or a dataset.json."
    )
    assert err.value.path == str(tmp_path / "notes.txt")
    with pytest.raises(DataError) as err:
        resolve_inputs([])
    assert str(err.value) == "no scans found in []."


def test_two_scans_with_one_id_are_refused(tmp_path: Path) -> None:
    a = _scan(tmp_path / "flat" / "case.nii.gz")
    b = _scan(tmp_path / "other" / "case.nii.gz")
    with pytest.raises(DataError) as err:
        resolve_inputs([tmp_path / "flat", tmp_path / "other"])
    assert str(err.value) == (
        f"case id 'case' names two different scans ({a} and {b}); both would be written to the same "
        "output. Predict them in separate runs (another --out) or give them ids in a dataset.json "
        "(`asa3d data index`)."
    )
    assert err.value.path == str(b)


# --------------------------------------------------------------------------------------------
# --out
# --------------------------------------------------------------------------------------------
def test_out_dir_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as err:
        prepare_out_dir(tmp_path / "file", [], False)
    assert str(err.value) == f"--out {tmp_path / 'file'}: is a file; give a folder for the label maps."
    with pytest.raises(ConfigError) as err:
        prepare_out_dir(tmp_path / "file" / "sub", [], False)
    assert (
        str(err.value)
        == f"--out {tmp_path / 'file' / 'sub'}: cannot create this folder (Not a directory); choose a "
        "writable one."
    )
    out = prepare_out_dir(tmp_path / "new" / "deep", ["a"], False)
    assert out == tmp_path / "new" / "deep" and out.is_dir()
    # a folder without write (or enter) permission
    for missing in (2, 1):  # os.W_OK, os.X_OK
        monkeypatch.setattr(predict_mod.os, "access", lambda p, mode, m=missing: not mode & m)
        with pytest.raises(ConfigError) as err:
            prepare_out_dir(out, ["a"], False)
        assert str(err.value) == f"--out {out}: this folder is not writable; choose another --out."


def test_existing_outputs_are_refused_by_name(tmp_path: Path) -> None:
    out = tmp_path / "pred"
    out.mkdir()
    (out / ".a_seg.nii.gz.x1.tmp").write_bytes(b"half")  # a killed run's temp file: removed
    ids = ["a", "b", "c", "d", "e"]
    for i in ids[:4]:
        (out / f"{i}_seg.nii.gz").write_bytes(b"old")
    with pytest.raises(ConfigError) as err:
        prepare_out_dir(out, ids, False)
    assert str(err.value) == (
        f"--out {out}: 4 output(s) already exist (a_seg.nii.gz, b_seg.nii.gz, c_seg.nii.gz, ...) from an "
        "earlier run that did not finish (no predictions.json). Pass --overwrite to replace them, or "
        "choose another --out."
    )
    assert not (out / ".a_seg.nii.gz.x1.tmp").exists()
    (out / "predictions.json").write_text(json.dumps({"cases": [{"output": "c_seg.nii.gz"}, "junk"]}))
    with pytest.raises(ConfigError) as err:
        prepare_out_dir(out, ["c"], False)
    assert str(err.value) == (
        f"--out {out}: 1 output(s) already exist (c_seg.nii.gz) from an earlier run. Pass --overwrite to "
        "replace them, or choose another --out."
    )
    with pytest.raises(
        ConfigError, match=r"3 output\(s\) already exist \(a_seg.nii.gz, b_seg.nii.gz, c_seg.nii.gz\) "
    ):
        prepare_out_dir(out, ids[:3], False)  # all three named: no "..."
    (out / "predictions.json").write_text(json.dumps({"cases": [{"output": "c_seg.nii.gz"}]}))
    with pytest.raises(
        ConfigError, match=r"already exist \(b_seg.nii.gz, c_seg.nii.gz\) from an earlier run that"
    ):
        prepare_out_dir(out, ["b", "c"], False)  # b is not in the list
    for bad in ("{", json.dumps([1]), json.dumps({"cases": "all"})):  # an unreadable list: not finished
        (out / "predictions.json").write_text(bad)
        with pytest.raises(ConfigError, match="did not finish"):
            prepare_out_dir(out, ["c"], False)
    assert prepare_out_dir(out, ids, True) == out


# --------------------------------------------------------------------------------------------
# a run
# --------------------------------------------------------------------------------------------
def test_manifest_inference_settings_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    scans = [_scan(tmp_path / "in" / f"{c}.nii.gz", seed=i) for i, c in enumerate("ab")]
    calls = []
    real = predict_mod.predict_volume

    def spy(model, img, roi, overlap, mode, sw_batch, dev):  # noqa: ANN001, ANN202
        calls.append((list(roi), overlap, mode, sw_batch, str(dev)))
        return real(model, img, roi, overlap, mode, sw_batch, dev)

    monkeypatch.setattr(predict_mod, "predict_volume", spy)
    report: dict = {}
    with caplog.at_level(logging.DEBUG, logger="asa3d.eval.predict"):
        written = predict_files(Threshold(), scans, tmp_path / "out", info=INFO, device="cpu", report=report)
    out = tmp_path / "out"
    assert calls == [([16, 16, 16], 0.25, "constant", 2, "cpu")] * 2
    assert written == [out / "a_seg.nii.gz", out / "b_seg.nii.gz"]
    seg = np.asarray(nib.load(str(written[0])).dataobj)
    assert seg.shape == (12, 10, 8) and seg[2:6, 2:6, 2:5].all() and seg.sum() == 4 * 4 * 3
    assert json.loads((out / "predictions.json").read_text()) == {
        "format": "asa3d-predictions/1",
        "model": "/runs/ft",
        "preprocessing": INFO["preprocessing"],
        "cases": [
            {"id": c, "image": str(s), "output": f"{c}_seg.nii.gz", "labels": [0, 1]}
            for c, s in zip("ab", scans, strict=True)
        ],
        "skipped": [],
    }
    assert report == {"written": written, "skipped": [], "manifest": out / "predictions.json"}
    assert _ours(caplog, logging.DEBUG) == [
        f"{s} -> {w} ((12, 10, 8), labels [0, 1])" for s, w in zip(scans, written, strict=True)
    ]
    assert _ours(caplog) == []
    # defaults where model.json records no inference settings; --overlap overrides model.json's
    calls.clear()
    bare = {"preprocessing": INFO["preprocessing"], "weights": "w.pt"}
    predict_files(Threshold(), scans[:1], tmp_path / "o2", info=bare, device="cpu")
    predict_files(Threshold(), scans[:1], tmp_path / "o3", info=INFO, device="cpu", overlap=0.75)
    assert calls == [([96, 96, 96], 0.5, "gaussian", 1, "cpu"), ([16, 16, 16], 0.75, "constant", 2, "cpu")]
    assert json.loads((tmp_path / "o2" / "predictions.json").read_text())["model"] == "w.pt"


def test_model_path_recorded() -> None:
    assert model_path_of({"run_dir": "/r", "weights": "w.pt"}) == "/r"
    assert model_path_of({"run_dir": "", "weights": "w.pt"}) == "w.pt"
    assert model_path_of({}) == ""


def test_a_bare_model_needs_its_model_json(tmp_path: Path) -> None:
    scan = _scan(tmp_path / "s.nii.gz")
    with pytest.raises(ConfigError) as err:
        predict_files(Threshold(), [scan], tmp_path / "out", device="cpu")
    assert str(err.value) == "predict_files: pass the run's model.json contents with a bare model"


def test_bad_scans_are_skipped_logged_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    good = _scan(tmp_path / "in" / "a.nii.gz")
    odd = _scan(tmp_path / "in" / "b.nii.gz", lo=0.0)  # no air: not HU-like, a warning only
    bad = _scan(tmp_path / "in" / "c.nii.gz", nan=True)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="asa3d.eval.predict"), warnings.catch_warnings():
        from asa3d.data.validate import IntensityWarning

        warnings.simplefilter("error", IntensityWarning)  # logged once, not also raised as a Python warning
        report: dict = {}
        written = predict_files(
            Threshold(), [good, odd, bad], out, info=INFO, device="cpu", skip_bad=True, report=report
        )
    assert [p.name for p in written] == ["a_seg.nii.gz", "b_seg.nii.gz"]
    doc = json.loads((out / "predictions.json").read_text())
    assert [c["id"] for c in doc["cases"]] == ["a", "b"]
    assert len(doc["skipped"]) == 1 and doc["skipped"] == report["skipped"]
    reason = doc["skipped"][0]["reason"]
    assert doc["skipped"][0] == {"id": "c", "image": str(bad), "reason": reason} and str(bad) in reason
    warned = _ours(caplog)
    assert len(warned) == 2 and str(odd) in warned[0] and "Hounsfield" in warned[0]
    assert warned[1] == f"skipped c: {reason}"
    # nothing usable: an error naming the first reason
    with pytest.raises(DataError) as err:
        predict_files(Threshold(), [bad], tmp_path / "o2", info=INFO, device="cpu", skip_bad=True)
    assert str(err.value) == f"no scan could be predicted: all 1 were rejected (first: {reason})."
    assert not (tmp_path / "o2" / "predictions.json").exists()


def test_a_preprocessing_failure_names_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asa3d.data.preprocess as pre

    def boom(*a):  # noqa: ANN002, ANN202
        raise RuntimeError("no such orientation")

    monkeypatch.setattr(pre, "preprocess_volumes", boom)
    scan = _scan(tmp_path / "s.nii.gz")
    with pytest.raises(DataError) as err:
        predict_files(Threshold(), [scan], tmp_path / "out", info=INFO, device="cpu")
    assert str(err.value) == f"{scan}: preprocessing failed (RuntimeError: no such orientation)."
    assert err.value.path == str(scan)


def test_earlier_cases_and_skips_stay_listed(tmp_path: Path) -> None:
    scans = [_scan(tmp_path / "in" / f"{c}.nii.gz", seed=i) for i, c in enumerate("ab")]
    bad = _scan(tmp_path / "in" / "z.nii.gz", nan=True)
    out = tmp_path / "out"
    predict_files(Threshold(), [scans[0], bad], out, info=INFO, device="cpu", skip_bad=True)
    predict_files(Threshold(), [scans[1]], out, info=INFO, device="cpu")  # another case, same --out
    doc = json.loads((out / "predictions.json").read_text())
    assert [c["id"] for c in doc["cases"]] == ["a", "b"] and doc["skipped"] == []
    # a rerun of a: its old entry is replaced, b stays; the earlier run's skip of z is kept
    predict_files(Threshold(), [scans[0], bad], out, info=INFO, device="cpu", skip_bad=True, overwrite=True)
    doc = json.loads((out / "predictions.json").read_text())
    assert [c["id"] for c in doc["cases"]] == ["b", "a"] and [s["id"] for s in doc["skipped"]] == ["z"]


def test_a_killed_rerun_keeps_the_skips_of_cases_it_does_not_touch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asa3d.data.io as dio

    scans = [_scan(tmp_path / "in" / f"{c}.nii.gz", seed=i) for i, c in enumerate("ab")]
    bad = [_scan(tmp_path / "in" / f"{c}.nii.gz", nan=True) for c in "yz"]
    out = tmp_path / "out"
    predict_files(Threshold(), [*scans, *bad], out, info=INFO, device="cpu", skip_bad=True)

    def killed(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(dio, "write_volume", killed)
    with pytest.raises(KeyboardInterrupt):  # reruns a and y
        predict_files(
            Threshold(), [scans[0], bad[0]], out, info=INFO, device="cpu", skip_bad=True, overwrite=True
        )
    doc = json.loads((out / "predictions.json").read_text())
    assert [c["id"] for c in doc["cases"]] == ["b"] and [s["id"] for s in doc["skipped"]] == ["z"]
    assert doc["format"] == "asa3d-predictions/1"  # the rest of the list is kept as it was
    # a killed run that touches none of the listed cases leaves the list as it was
    before = (out / "predictions.json").read_text()
    new = _scan(tmp_path / "in" / "c.nii.gz")
    with pytest.raises(KeyboardInterrupt):
        predict_files(Threshold(), [new], out, info=INFO, device="cpu")
    assert (out / "predictions.json").read_text() == before


def test_progress_bar_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Tty()
    monkeypatch.setattr(predict_mod.sys, "stderr", term)
    scans = [_scan(tmp_path / "in" / f"{c}.nii.gz", seed=i) for i, c in enumerate("ab")]
    predict_files(Threshold(), scans, tmp_path / "out", info=INFO, device="cpu", progress=True)
    shown = term.getvalue()
    assert "predict: 100%" in shown and "2/2" in shown and "scan/s" in shown and ", b]" in shown
    quiet = Tty()
    monkeypatch.setattr(predict_mod.sys, "stderr", quiet)
    predict_files(Threshold(), scans, tmp_path / "o2", info=INFO, device="cpu")
    assert quiet.getvalue() == ""


def test_a_split_of_a_dataset_json_or_of_a_folder_holding_one(tmp_path: Path) -> None:
    from asa3d.data.msd_json import write_dataset_json

    root = tmp_path / "ds"
    for name in ("p", "q"):
        _scan(root / "img" / f"{name}.nii.gz")
    write_dataset_json(root / "dataset.json", "toy", {}, [{"image": "img/p.nii.gz"}], test=["img/q.nii.gz"])
    assert [c["id"] for c in resolve_inputs([root], split="test")] == ["q"]
    assert [c["id"] for c in resolve_inputs([root], split="training")] == ["p"]
    written = predict_files(
        Threshold(), [root / "dataset.json"], tmp_path / "out", info=INFO, device="cpu", split="test"
    )
    assert [p.name for p in written] == ["q_seg.nii.gz"]


def test_a_list_without_skips_is_rewritten_on_a_rerun(tmp_path: Path) -> None:
    scan = _scan(tmp_path / "in" / "a.nii.gz")
    out = tmp_path / "out"
    predict_files(Threshold(), [scan], out, info=INFO, device="cpu")
    doc = json.loads((out / "predictions.json").read_text())
    del doc["skipped"]  # a list written before skips were recorded
    (out / "predictions.json").write_text(json.dumps(doc))
    predict_files(Threshold(), [scan], out, info=INFO, device="cpu", overwrite=True)
    doc = json.loads((out / "predictions.json").read_text())
    assert [c["id"] for c in doc["cases"]] == ["a"] and doc["skipped"] == []


def test_a_run_folder_is_loaded_onto_the_chosen_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[tuple[str, object]] = []

    def load(path, device="cpu"):  # noqa: ANN001, ANN202
        loaded.append((str(path), device))
        return Threshold(), INFO

    monkeypatch.setattr(predict_mod, "load_finetuned", load)
    monkeypatch.setattr(
        predict_mod, "resolve_device", lambda pref: torch.device("meta" if pref == "auto" else pref)
    )
    monkeypatch.setattr(predict_mod, "predict_volume", lambda m, img, *a: np.zeros(img.shape[1:], np.uint8))
    scan = _scan(tmp_path / "s.nii.gz")
    predict_files(tmp_path / "run", [scan], tmp_path / "out")  # device "auto" by default
    assert loaded == [(str(tmp_path / "run"), "meta")]

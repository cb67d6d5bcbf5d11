"""``asa3d predict`` writes label maps in the input's original geometry (RAS and LPS real scans)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from asa3d.eval.inference import load_finetuned
from asa3d.eval.predict import predict_files

SCANS = {
    "ras": "totalsegmentator_tests/example_ct_sm.nii.gz",  # 122x101x30, 3 mm, RAS
    "lps": "ibsi_sts_ct/STS_002/CT_image.nii.gz",  # 161x143x48, 0.98x0.98x3.27 mm, LPS
}


class Threshold(nn.Module):
    """A 'model' whose answer is known in any geometry: class 1 where the windowed intensity > 0.5
    (HU > 37.5 with the default window). Inverting the preprocessing must land it on the voxels of
    the original scan with HU > 37.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


INFO = {
    "preprocessing": {"orientation": "RAS", "spacing_mm": [2.0, 2.5, 4.0], "hu_window": [-175.0, 250.0]},
    "inference": {"roi_size": [32, 32, 64], "overlap": 0.25, "mode": "gaussian", "sw_batch_size": 4},
}


@pytest.mark.parametrize("kind", ["ras", "lps"])
def test_predict_inverts_preprocessing(shared_data, tmp_path, kind):
    src = shared_data / SCANS[kind]
    img = nib.load(str(src))
    assert ("".join(nib.aff2axcodes(img.affine)) == "RAS") == (kind == "ras")
    (out,) = predict_files(Threshold(), [src], tmp_path, info=INFO, device="cpu")
    seg = nib.load(str(out))
    assert seg.shape == img.shape
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)
    expected = np.asarray(img.dataobj) > 37.5
    got = np.asarray(seg.dataobj) == 1
    dice = 2 * (expected & got).sum() / (expected.sum() + got.sum())
    # resampling to 2-4 mm and back blurs the noisy soft-tissue edges only (measured 0.83 RAS, 0.75 LPS)
    assert dice > 0.7, dice
    flipped = 2 * (expected & got[::-1]).sum() / (expected.sum() + got.sum())
    assert flipped < 0.75 * dice, (dice, flipped)  # a wrong axis flip would be caught


def test_predict_from_a_finetuned_run_dir(shared_data, tmp_path):
    """A run dir is all predict needs: model.json (kwargs, mode, contract) + model_final.pt."""
    from asa3d.config_sections import ModelConfig
    from asa3d.eval.probe import prepare_model
    from asa3d.models.backbones import default_spec

    spec = default_spec(ModelConfig(feature_size=12), 2)
    kwargs = dict(spec.kwargs)
    net = prepare_model(spec.build(), spec, "probe")
    run = tmp_path / "run"
    run.mkdir()
    torch.save(net.state_dict(), run / "model_final.pt")
    info = dict(
        INFO,
        format="asa3d-finetune/1",
        model_kwargs=kwargs,
        mode="probe",
        n_classes=2,
        probe={"freeze_encoders": False, "stages": [0, 1, 2, 3, 4]},
        weights="model_final.pt",
    )
    info["preprocessing"] = dict(INFO["preprocessing"], spacing_mm=[4.0, 4.0, 4.0])
    (run / "model.json").write_text(json.dumps(info))
    model, _ = load_finetuned(run / "model_final.pt")
    assert not model.training
    src = shared_data / SCANS["lps"]
    from asa3d.cli import main

    assert main(["predict", "--model", str(run), "--input", str(src), "--out", str(tmp_path / "pred")]) == 0
    seg = nib.load(str(Path(tmp_path / "pred" / "CT_image_seg.nii.gz")))
    img = nib.load(str(src))
    assert seg.shape == img.shape
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)


# --------------------------------------------------------------------------------------------
# everyday use: names, overwrites, bad scans, bad --out (each input built by the test)
# --------------------------------------------------------------------------------------------
TINY_AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def _scan(path: Path, seed: int = 0, nan: bool = False) -> Path:
    arr = np.random.default_rng(seed).normal(0, 300, (20, 18, 16)).astype(np.float32)
    arr[5:12, 5:12, 4:10] = 400.0  # a bright block: the Threshold model's class 1
    if nan:
        arr[3, 3, 3] = np.nan
        arr[4, 4, 4] = np.inf
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, TINY_AFFINE), str(path))
    return path


TINY_INFO = {
    "preprocessing": {"orientation": "RAS", "spacing_mm": [4.0, 4.0, 4.0], "hu_window": [-175.0, 250.0]},
    "inference": {"roi_size": [32, 32, 64], "overlap": 0.25, "mode": "constant", "sw_batch_size": 1},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir for the CLI: SwinUNETR-12 probe (2 classes), untrained; predictions only need to exist."""
    from asa3d.config_sections import ModelConfig
    from asa3d.eval.probe import prepare_model
    from asa3d.models.backbones import default_spec

    spec = default_spec(ModelConfig(feature_size=12), 2)
    kwargs = dict(spec.kwargs)
    net = prepare_model(spec.build(), spec, "probe")
    run = tmp_path_factory.mktemp("run")
    torch.save(net.state_dict(), run / "model_final.pt")
    probe = {"freeze_encoders": False, "stages": [0, 1, 2, 3, 4]}
    info = dict(TINY_INFO, format="asa3d-finetune/1", model_kwargs=kwargs, mode="probe", n_classes=2)
    info.update(probe=probe, weights="model_final.pt")
    (run / "model.json").write_text(json.dumps(info))
    return run


def test_same_file_names_give_two_outputs_and_rerun_refuses(tmp_path):
    a = _scan(tmp_path / "A" / "CT_image.nii.gz", seed=1)
    b = _scan(tmp_path / "B" / "CT_image.nii.gz", seed=2)
    out = tmp_path / "pred"
    written = predict_files(Threshold(), [a, b], out, info=TINY_INFO, device="cpu")
    assert [p.name for p in written] == ["A_CT_image_seg.nii.gz", "B_CT_image_seg.nii.gz"]
    manifest = json.loads((out / "predictions.json").read_text())
    assert [(c["id"], c["image"]) for c in manifest["cases"]] == [
        ("A_CT_image", str(a)),
        ("B_CT_image", str(b)),
    ]
    first = {p.name: p.read_bytes() for p in written}
    from asa3d.config import ConfigError

    with pytest.raises(ConfigError, match="already exist.*--overwrite"):
        predict_files(Threshold(), [a, b], out, info=TINY_INFO, device="cpu")
    assert {p.name: p.read_bytes() for p in written} == first  # untouched
    _scan(a, seed=3)  # a changed input and --overwrite: replaced
    predict_files(Threshold(), [a, b], out, info=TINY_INFO, device="cpu", overwrite=True)
    assert (out / "A_CT_image_seg.nii.gz").read_bytes() != first["A_CT_image_seg.nii.gz"]
    assert not list(out.glob(".*.tmp"))


def test_dataset_json_and_folder_inputs_use_the_datalist_ids(tmp_path):
    from asa3d.data.pattern_index import write_index

    for case in ("P1", "P2"):
        _scan(tmp_path / "data" / case / "CT.nii.gz")
    ds = write_index(tmp_path / "data", "*/CT.nii.gz", tmp_path / "ds.json").path
    written = predict_files(Threshold(), [ds], tmp_path / "p1", info=TINY_INFO, device="cpu")
    assert [p.name for p in written] == ["P1_seg.nii.gz", "P2_seg.nii.gz"]
    _scan(tmp_path / "flat" / "x.nii.gz")
    _scan(tmp_path / "flat" / "y.nii.gz")
    written = predict_files(Threshold(), [tmp_path / "flat"], tmp_path / "p2", info=TINY_INFO, device="cpu")
    assert [p.name for p in written] == ["x_seg.nii.gz", "y_seg.nii.gz"]
    seg = np.asarray(nib.load(str(written[0])).dataobj)
    assert seg.shape == (20, 18, 16) and seg[6:11, 6:11, 5:9].all() and seg.sum() < 0.5 * seg.size


def test_cli_nan_scan_is_named_and_skip_bad_goes_on(tiny_run, tmp_path, capsys):
    from asa3d.cli import main

    good = _scan(tmp_path / "in" / "good.nii.gz")
    bad = _scan(tmp_path / "in" / "bad.nii.gz", nan=True)
    out = tmp_path / "pred"
    args = ["predict", "--model", str(tiny_run), "--input", str(tmp_path / "in"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "NaN/inf" in err and "--skip-bad" in err
    assert not (out / "good_seg.nii.gz").exists()  # the error came first (sorted input order)
    assert main([*args, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "wrote 1 label map(s)" in captured.out and "bad:" in captured.err and "NaN" in captured.err
    assert (out / "good_seg.nii.gz").is_file() and not (out / "bad_seg.nii.gz").exists()
    manifest = json.loads((out / "predictions.json").read_text())
    assert [c["id"] for c in manifest["cases"]] == ["good"]
    assert [s["image"] for s in manifest["skipped"]] == [str(bad)]
    assert good.exists()


def test_cli_rerun_refuses_then_overwrite(tiny_run, tmp_path, capsys):
    from asa3d.cli import main

    src = _scan(tmp_path / "s.nii.gz")
    args = ["predict", "--model", str(tiny_run), "--input", str(src), "--out", str(tmp_path / "p")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "s_seg.nii.gz" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_cli_invalid_out_exits_2(tiny_run, tmp_path, capsys, kind):
    from asa3d.cli import main

    src = _scan(tmp_path / "s.nii.gz")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    out = blocker if kind == "file" else blocker / "pred"
    assert main(["predict", "--model", str(tiny_run), "--input", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "asa3d predict: error:" in err and "--out" in err and str(out) in err and "Traceback" not in err


def test_cli_two_inputs_with_the_same_id_are_refused(tiny_run, tmp_path, capsys):
    """Two datalists whose case ids collide would write one output twice."""
    from asa3d.cli import main
    from asa3d.data.msd_json import write_dataset_json

    for d in ("u", "v"):
        _scan(tmp_path / d / "img" / "case.nii.gz")
        write_dataset_json(tmp_path / d / "dataset.json", d, {}, [{"image": "img/case.nii.gz"}])
    rc = main(["predict", "--model", str(tiny_run), "--input", str(tmp_path / "u" / "dataset.json"),
               str(tmp_path / "v" / "dataset.json"), "--out", str(tmp_path / "p")])  # fmt: skip
    assert rc == 2 and "names two different scans" in capsys.readouterr().err


def test_overwrite_killed_mid_run_leaves_no_list_mixing_old_and_new(tmp_path, monkeypatch):
    """predictions.json lists only outputs of finished runs: a --overwrite run killed after
    replacing one output (but not the other) lists neither, while a case of an earlier run that
    this one does not touch stays listed."""
    import asa3d.data.io as dio

    scans = [_scan(tmp_path / "in" / f"{c}.nii.gz", seed=i) for i, c in enumerate("abc")]
    out = tmp_path / "pred"
    predict_files(Threshold(), scans, out, info=TINY_INFO, device="cpu")
    first = {p.name: p.read_bytes() for p in out.glob("*_seg.nii.gz")}
    assert sorted(first) == ["a_seg.nii.gz", "b_seg.nii.gz", "c_seg.nii.gz"]

    real, calls = dio.write_volume, []

    def dies_on_the_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-run")
        return real(*args, **kwargs)

    monkeypatch.setattr(dio, "write_volume", dies_on_the_second)
    _scan(scans[0], seed=7)  # a changed input: its output will differ
    with pytest.raises(KeyboardInterrupt):
        predict_files(Threshold(), scans[:2], out, info=TINY_INFO, device="cpu", overwrite=True)
    assert (out / "a_seg.nii.gz").read_bytes() != first["a_seg.nii.gz"]  # replaced before the kill
    assert (out / "b_seg.nii.gz").read_bytes() == first["b_seg.nii.gz"]  # not reached
    listed = json.loads((out / "predictions.json").read_text())["cases"]
    assert [c["id"] for c in listed] == ["c"]  # neither the new a nor the old b
    assert all((out / c["output"]).read_bytes() == first[c["output"]] for c in listed)
    monkeypatch.setattr(dio, "write_volume", real)
    predict_files(Threshold(), scans[:2], out, info=TINY_INFO, device="cpu", overwrite=True)
    assert sorted(c["id"] for c in json.loads((out / "predictions.json").read_text())["cases"]) == [
        "a",
        "b",
        "c",
    ]

"""`asa3d data phantom | prepare | summary` through the real command-line router."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asa3d.cli import main
from asa3d.data.msd_json import write_dataset_json


def tiny_dataset(root: Path, bad: bool = False) -> Path:
    rng = np.random.default_rng(1)
    entries = []
    for i in range(3):
        (root / "img").mkdir(parents=True, exist_ok=True)
        p = root / "img" / f"s{i}.nii.gz"
        nib.save(
            nib.Nifti1Image(
                rng.integers(-1000, 1000, (16, 14, 10)).astype(np.int16), np.diag([3.0] * 3 + [1])
            ),
            str(p),
        )
        entries.append({"image": f"img/s{i}.nii.gz"})
    if bad:
        p = root / "img" / "s1.nii.gz"
        p.write_bytes(p.read_bytes()[:150])
    return write_dataset_json(root / "dataset.json", "tiny", {}, entries)


def test_prepare_with_overrides_and_skip_bad(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = tiny_dataset(tmp_path / "d", bad=True)
    args = [
        "data",
        "prepare",
        f"data.root={ds}",
        "data.preprocess.spacing=[3.0,3.0,3.0]",
        "--workers",
        "1",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(args) == 2  # the bad scan stops the build, named
    err = capsys.readouterr().err
    assert "asa3d data prepare: error:" in err and "s1.nii.gz" in err and "truncated" in err
    assert main([*args, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert (
        "2 case(s) of 'tiny'/training (1 reused, 1 built)" in out
        and "rejected (1)" in out
        and "s1.nii.gz" in out
    )
    assert (tmp_path / "c" / "index.json").is_file()


def test_prepare_folder_with_window(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = tiny_dataset(tmp_path / "d")
    (tmp_path / "d" / "dataset.json").unlink()  # a plain folder of scans
    assert (
        main(
            [
                "data",
                "prepare",
                str(ds.parent / "img"),
                "--spacing",
                "3",
                "3",
                "3",
                "--window",
                "-100",
                "200",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert '"hu_window": [-100.0, 200.0]' in out and (ds.parent / "img" / ".asa3d_cache").is_dir()
    assert main(["data", "prepare", "data.nope=1"]) == 2
    assert "unknown key(s) ['nope']" in capsys.readouterr().err


def test_summary_reports_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = tiny_dataset(tmp_path / "d", bad=True)
    assert main(["data", "summary", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "3 cases, 2 usable, 1 rejected" in out and "s1: " in out and "truncated" in out
    assert "HU  min" in out and "spacing (mm)" in out


def test_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["data", "phantom", "--help"])
    out = capsys.readouterr().out
    assert "(default: 0)" in out and "--n-validation" in out
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert "data.preprocess.window = [-175.0, 250.0]" in capsys.readouterr().out


def test_phantom_verb(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(
            [
                "data",
                "phantom",
                "--n",
                "2",
                "--out",
                str(tmp_path / "p"),
                "--shape",
                "24",
                "24",
                "16",
                "--spacing",
                "12",
                "12",
                "16",
                "--n-validation",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "p" / "dataset.json").is_file() and "dataset.json" in capsys.readouterr().out
    # what was asked for: 1 training + 1 validation case, labelled, on the requested grid
    ds = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert len(ds["training"]) == 1 and len(ds["validation"]) == 1 and len(ds["labels"]) > 1
    img = nib.load(str(tmp_path / "p" / ds["training"][0]["image"]))
    lab = np.asarray(nib.load(str(tmp_path / "p" / ds["training"][0]["label"])).dataobj)
    assert img.shape == (24, 24, 16) and np.allclose(img.header.get_zooms(), (12, 12, 16))
    assert lab.shape == img.shape and lab.max() > 0


def test_data_verbs_parse_without_heavy_imports() -> None:
    """`asa3d --help` stays fast: the data verbs' parser pulls no torch/MONAI/readers/blosc2."""
    import subprocess
    import sys

    code = (
        "import sys, argparse; import asa3d.data.commands as c; "
        "c.add_commands(argparse.ArgumentParser().add_subparsers()); "
        "heavy = ('torch', 'monai', 'nibabel', 'SimpleITK', 'blosc2', 'pydicom'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("verb", ["phantom", "index", "summary", "prepare"])
def test_every_data_verb_has_a_description_and_an_example(verb: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["data", verb, "--help"])
    out = capsys.readouterr().out
    assert "example" in out and f"asa3d data {verb} " in out.split("example", 1)[1]


def test_predict_help_has_an_example(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert "--overwrite" in out and "--skip-bad" in out and "asa3d predict --model" in out


def test_phantom_refuses_to_rewrite_without_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["data", "phantom", "--n", "1", "--out", str(tmp_path / "p"), "--shape", "16", "16", "16"]
    assert main(args) == 0
    first = (tmp_path / "p" / "dataset.json").read_bytes()
    assert main([*args[:3], "2", *args[4:]]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "p" / "dataset.json").read_bytes() == first
    assert main([*args[:3], "2", *args[4:], "--overwrite"]) == 0
    assert b"phantom_001" in (tmp_path / "p" / "dataset.json").read_bytes()

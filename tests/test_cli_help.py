"""`asa3d --help` and every verb's --help: fast (no torch), truthful defaults, examples, full verb
names in errors, closest-key suggestions."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asa3d.cli import build_parser, main
from asa3d.config import ConfigError, load_config
from asa3d.eval.config_sections import FinetuneConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
REQUIRED = {
    "data",
    "data phantom",
    "data prepare",
    "data summary",
    "pretrain",
    "plan",
    "export",
    "finetune",
    "probe",
    "evaluate",
    "predict",
    "report",
    "demo",
}


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out[prefix + name] = child
                out.update(_verbs(child, prefix + name + " "))
    return out


VERBS = _verbs(build_parser())


def test_every_listed_verb_is_registered() -> None:
    assert set(VERBS) >= REQUIRED, REQUIRED - set(VERBS)


def test_building_the_parser_imports_no_torch_or_monai() -> None:
    code = (
        "import sys; from asa3d.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('torch', 'monai', 'nibabel', 'SimpleITK', 'blosc2', 'scipy') "
        "if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("verb", ["", *sorted(VERBS)])
def test_help_is_fast_and_has_description_and_example(verb: str) -> None:
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "asa3d.cli", *verb.split(), "--help"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert took < 2.0, f"asa3d {verb} --help took {took:.2f} s"
    assert f"usage: asa3d {verb}".rstrip() in res.stdout
    if verb:
        p = VERBS[verb]
        assert p.description and len(p.description) > 20, f"{verb}: no description"
        assert "example" in res.stdout.lower(), f"{verb}: no example in --help"


def test_finetune_help_shows_the_values_of_its_default_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    # swinunetr.yaml says bf16 and log_every 100; the dataclass defaults are fp32 and 50
    assert "from finetune/swinunetr.yaml" in text
    assert "train.precision = 'bf16'" in text and "train.log_every = 100" in text
    with pytest.raises(SystemExit):
        main(["finetune", "--config", "finetune/phantom_tiny.yaml", "--help"])
    text = capsys.readouterr().out
    assert "model.feature_size = 12" in text and "train.crop_size = [32, 32, 64]" in text


def test_evaluate_help_without_config_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "no --config given" in text and "grid.fractions = [0.05, 0.1, 0.2, 0.5, 1.0]" in text


def test_errors_name_the_full_verb(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "asa3d.cli", "data", "summary"], env=ENV, capture_output=True, text=True
    )
    assert res.returncode == 2 and "asa3d data summary: error:" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "asa3d.cli", "data", "summary", str(tmp_path / "nothing_here")],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, res.stderr
    assert "asa3d data summary: error:" in res.stderr and "Traceback" not in res.stderr


def test_unknown_key_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"'iteratons' -> did you mean 'iterations'\?"):
        load_config(FinetuneConfig, "finetune/phantom_tiny.yaml", ["train.iteratons=3"])
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(FinetuneConfig, None, ["trian.iterations=3"])
    with pytest.raises(ConfigError) as err:  # nothing close: no made-up suggestion
        load_config(FinetuneConfig, None, ["train.zzzz=3"])
    assert "did you mean" not in str(err.value) and "Valid keys" in str(err.value)
    args = ["pretrain", "--config", "pretrain/asa_tiny.yaml", "--out", "x", "trian.epochs=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "asa3d pretrain: error:" in err and "did you mean 'train'" in err


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_probe_help_shows_the_mode_probe_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "probe")
    assert "  mode = 'probe'  " in text and "mode = 'finetune'" not in text
    text = _help(capsys, "probe", "--strict")
    assert "  mode = 'strict_linear'  " in text
    text = _help(capsys, "finetune", "--init", "x.pt", "model.feature_size=12")  # flags before --help apply
    assert (
        "  mode = 'finetune'  " in text
        and "init.source = 'x.pt'" in text
        and "model.feature_size = 12 " in text
    )


def test_probe_errors_name_the_verb_not_the_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asa3d.eval.finetune as ft

    def diverge(cfg, out, resume=None, overwrite=False):  # noqa: ANN001, ANN202
        assert cfg.mode == "strict_linear"
        raise ft.TrainingDiverged("loss is NaN")

    monkeypatch.setattr(ft, "run_finetune", diverge)
    assert main(["probe", "--strict", "--out", str(tmp_path / "p")]) == 3
    err = capsys.readouterr().err
    assert "asa3d probe: error: loss is NaN" in err and "strict_linear" not in err


def test_data_prepare_help_shows_one_true_default_per_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from asa3d.config_sections import DataConfig

    text = _help(capsys, "data", "prepare")
    assert "(default: None)" not in text and "(default: False)" not in text
    options = text.split("options:", 1)[1].split("examples:", 1)[0]
    for flag in ("--spacing", "--window", "--workers", "--split"):
        block = options.split(flag, 1)[1].split("\n  -", 1)[0]
        assert " ".join(block.split()).count("default") <= 1, block
    d = DataConfig()
    flat = " ".join(options.split())
    assert f"else {' '.join(map(str, d.preprocess.spacing))})" in flat  # the DataConfig default, as it is
    assert f"else {' '.join(map(str, d.preprocess.window))})" in flat
    # with --config, the keys listed are those of that run's data section
    text = _help(capsys, "data", "prepare", "--config", "finetune/phantom_tiny.yaml")
    assert "from finetune/phantom_tiny.yaml" in " ".join(text.split())
    assert "data.preprocess.spacing = [8.0, 8.0, 5.0]" in text


def test_fill_paragraphs_refills_hard_wrapped_prose() -> None:
    from asa3d.cli import fill_paragraphs

    text = (
        "examples:\n  asa3d x --a 1     # kept as written, however long it is, even past the width\n\n"
        "A paragraph written with\nhard line breaks\nin its source.\n"
        "label: a new paragraph\n- an item\n- another"
    )
    out = fill_paragraphs(text, 40).splitlines()
    assert out[0] == "examples:" and out[1].startswith("  asa3d x --a 1     # kept")
    assert "A paragraph written with hard line" in out[3]
    assert [ln for ln in out if ln.startswith(("label:", "- "))] == [
        "label: a new paragraph",
        "- an item",
        "- another",
    ]


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_prose_is_filled_as_paragraphs(
    verb: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ragged prose: in a paragraph, the next line's first word never fits on the line before
    (what filling a paragraph guarantees and wrapping each source line on its own does not)."""
    width = 80
    monkeypatch.setenv("COLUMNS", str(width))
    text = _help(capsys, *verb.split())
    lines = text.splitlines()
    prose = re.compile(r"^[^\s]")
    starts = re.compile(r"^(- |\* |[A-Za-z][\w -]{0,30}: |usage:)")
    for a, b in zip(lines, lines[1:], strict=False):
        if not (prose.match(a) and prose.match(b)) or a.endswith(":") or starts.match(b):
            continue
        first = b.split()[0]
        assert len(a) + 1 + len(first) > width - 2, f"asa3d {verb} --help: ragged break after {a!r}"

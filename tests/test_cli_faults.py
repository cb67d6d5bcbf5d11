"""Bad output paths, malicious or unreadable checkpoints and refused inits: exit 2 with a message
naming the file and the fix; never a traceback, never torch's advice to use weights_only=False."""

from __future__ import annotations

import errno
import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR

from asa3d.cli import main
from asa3d.engine.distributed import DistEnv
from asa3d.engine.trainer import Trainer
from engine_toy_method import toy_config, toy_factory

FT = "finetune/phantom_tiny.yaml"


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("faults_ckpt")
    return Trainer(toy_config(), d, DistEnv(), dataset_factory=toy_factory(2)).save_checkpoint()  # type: ignore[return-value]


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file used as a folder: no user, root included, can create anything under it."""
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return f


def _ft_args(phantom_dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--config",
        FT,
        "--out",
        str(out),
        f"data.root={phantom_dataset}",
        "data.preprocess.spacing=[12.0,12.0,6.0]",
        "train.iterations=2",
        "train.log_every=0",
        "train.num_threads=1",
        *extra,
    ]


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    return err


def test_export_to_an_invalid_out(ckpt: Path, blocker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(ckpt), "--out", str(blocker / "w.safetensors")]) == 2
    err = _err(capsys)
    assert "asa3d export: error:" in err and str(blocker) in err and "--out" in err


def test_export_to_a_read_only_folder(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root writes anyway: make the write fail as a read-only folder would
        import asa3d.atomic

        real = asa3d.atomic.atomic_write_with

        def refuse(path, writer):  # noqa: ANN001, ANN202
            if Path(path).parent == ro:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, writer)

        monkeypatch.setattr(asa3d.atomic, "atomic_write_with", refuse)
    try:
        assert main(["export", str(ckpt), "--out", str(ro / "w.safetensors")]) == 2
    finally:
        ro.chmod(0o700)
    err = _err(capsys)
    assert "w.safetensors" in err and "Permission denied" in err and "Fix:" in err
    assert not (ro / "w.safetensors").exists()


def test_export_of_a_folder_out(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(ckpt), "--out", str(tmp_path)]) == 2
    assert "is a folder" in _err(capsys)


def test_export_of_unreadable_and_malicious_checkpoints(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:5000])  # truncated
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 64)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "asa3d-checkpoint/1", "state": _Payload(str(marker))}, evil)
    for bad in (cut, garbage, evil):
        assert main(["export", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
        err = _err(capsys)
        assert bad.name in err and ("Fix:" in err or "refused to load" in err)
    assert "refused to load" in main_err(evil, tmp_path, capsys)
    assert not marker.exists()


def main_err(bad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["export", str(bad), "--out", str(tmp_path / "y.safetensors")]) == 2
    return _err(capsys)


def test_pretrain_to_an_invalid_out(blocker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["pretrain", "--config", "pretrain/asa_tiny.yaml", "--out", str(blocker / "run")])
    assert code == 2
    err = _err(capsys)
    assert "asa3d pretrain: error:" in err and str(blocker) in err


def test_finetune_to_an_invalid_out(
    phantom_dataset: Path, blocker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_ft_args(phantom_dataset, blocker / "run")) == 2
    err = _err(capsys)
    assert "asa3d finetune: error:" in err and str(blocker) in err


def test_finetune_refuses_a_malicious_init(
    phantom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_init.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload(str(marker))}, evil)
    assert main(_ft_args(phantom_dataset, tmp_path / "run", "--init", str(evil))) == 2
    err = _err(capsys)
    assert "evil_init.pt" in err and "refused to load" in err and "a Python object (getattr)" in err
    assert not marker.exists()


def test_refused_init_says_what_it_found_and_writes_transfer_json(
    phantom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wide = SwinUNETR(in_channels=1, out_channels=14, feature_size=24)  # the run is feature size 12
    src = tmp_path / "wide.pt"
    torch.save({"state_dict": wide.state_dict()}, src)
    run = tmp_path / "run"
    assert main(_ft_args(phantom_dataset, run, "--init", str(src))) == 2
    err = _err(capsys)
    assert "feature size 24, expected 12" in err
    doc = json.loads((run / "transfer.json").read_text())
    assert doc["n_shape_mismatch"] > 0 and any("feature size 24" in w for w in doc["warnings"])


def test_model_json_kwargs_build_a_plain_swinunetr(phantom_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "ft"
    assert main(_ft_args(phantom_dataset, run)) == 0
    info = json.loads((run / "model.json").read_text())
    accepted = set(inspect.signature(SwinUNETR.__init__).parameters) - {"self"}
    assert set(info["model_kwargs"]) <= accepted, set(info["model_kwargs"]) - accepted
    net = SwinUNETR(**info["model_kwargs"])
    net.load_state_dict(torch.load(run / info["weights"], weights_only=True), strict=True)


def test_an_unwrapped_weights_only_refusal_is_ours(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any loader that lets torch's UnpicklingError through still gets our message, not torch's."""
    import pickle

    import asa3d.eval.commands as ec

    advice = (
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will "
        "likely succeed ... Unsupported global: GLOBAL posix.system was not an allowed global"
    )

    def boom(args):  # noqa: ANN001, ANN202
        raise pickle.UnpicklingError(advice)

    monkeypatch.setattr(ec, "cmd_report", boom)
    import asa3d.cli

    parser = asa3d.cli.build_parser()
    monkeypatch.setattr(asa3d.cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["report"].set_defaults(func=boom)
    assert main(["report", "x"]) == 2
    err = _err(capsys)
    assert "posix.system" in err and "weights_only" not in err


# --------------------------------------------------------------------------------------------
# checkpoint arguments are read before any long work
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_long_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a verb starts building a cache or reading scans."""
    import asa3d.data.prepare
    import asa3d.eval.predict

    def long_work(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("long work started before the checkpoint argument was checked")

    monkeypatch.setattr(asa3d.data.prepare, "ensure_cache", long_work)
    monkeypatch.setattr(asa3d.eval.predict, "resolve_inputs", long_work)


def _bad_files(ckpt: Path, d: Path) -> dict[str, Path]:
    """A truncated checkpoint, garbage bytes, and a pickle that would create ``d/pwned``."""
    d.mkdir(parents=True, exist_ok=True)
    cut = d / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    garbage = d / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 64)
    evil = d / "evil.pt"
    torch.save({"format": "asa3d-checkpoint/1", "state": _Payload(str(d / "pwned"))}, evil)
    return {"truncated": cut, "garbage": garbage, "malicious": evil}


def _assert_named_refusal(err: str, bad: Path, flag: str, kind: str) -> None:
    assert f"{flag} " in err and str(bad) in err, err
    if kind == "malicious":
        assert "refused to load" in err and not (bad.parent / "pwned").exists()
    else:
        assert "not a readable checkpoint" in err and "Fix:" in err
    quoted = re.search(r"\((\w+Error)(?:: ([^()]*))?\)\. Fix:", err)
    assert quoted or kind != "truncated", err
    if quoted:  # torch's own words are quoted whole, or cut after a sentence
        with pytest.raises(Exception) as raw:
            torch.load(bad, weights_only=True)
        text = " ".join(str(raw.value).split())
        said = quoted.group(2) or ""
        assert said == text or (text.startswith(said) and said.endswith(".")), (said, text)


KINDS = ("truncated", "garbage", "malicious")


@pytest.mark.parametrize("kind", KINDS)
def test_finetune_init_is_read_before_the_cache_is_built(
    kind: str,
    ckpt: Path,
    phantom_dataset: Path,
    tmp_path: Path,
    no_long_work: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = _bad_files(ckpt, tmp_path / "bad")[kind]
    assert main(_ft_args(phantom_dataset, tmp_path / "run", "--init", str(bad))) == 2
    _assert_named_refusal(_err(capsys), bad, "--init", kind)


@pytest.mark.parametrize("kind", KINDS)
def test_pretrain_resume_is_read_before_the_cache_is_built(
    kind: str,
    ckpt: Path,
    phantom_dataset: Path,
    tmp_path: Path,
    no_long_work: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = _bad_files(ckpt, tmp_path / "bad")[kind]
    args = ["pretrain", "--config", "pretrain/asa_tiny.yaml", "--out", str(tmp_path / "run")]
    assert main([*args, "--resume", str(bad), f"data.root={phantom_dataset}"]) == 2
    _assert_named_refusal(_err(capsys), bad, "--resume", kind)


def test_pretrain_auto_resume_of_a_corrupt_last_pt_fails_at_once(
    ckpt: Path, phantom_dataset: Path, tmp_path: Path, no_long_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(ckpt.read_bytes()[:5000])  # a run killed while copying its checkpoint
    assert (
        main(
            [
                "pretrain",
                "--config",
                "pretrain/asa_tiny.yaml",
                "--out",
                str(run),
                f"data.root={phantom_dataset}",
            ]
        )
        == 2
    )
    err = _err(capsys)
    assert str(run / "last.pt") in err and f"(found in {run})" in err


def test_finetune_resume_of_another_kind_of_checkpoint(
    ckpt: Path, phantom_dataset: Path, tmp_path: Path, no_long_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pretraining checkpoint given to finetune --resume: refused by its format, at once."""
    assert main(_ft_args(phantom_dataset, tmp_path / "run", "--resume", str(ckpt))) == 2
    err = _err(capsys)
    assert "--resume" in err and str(ckpt) in err and "format 'asa3d-checkpoint/1'" in err


@pytest.fixture
def fake_run(tmp_path: Path) -> Path:
    """A fine-tune run folder as predict reads it: model.json and weights (loadable, tiny)."""
    run = tmp_path / "ft"
    run.mkdir()
    (run / "model.json").write_text(
        json.dumps(
            {
                "model_kwargs": {"in_channels": 1, "out_channels": 2},
                "n_classes": 2,
                "weights": "model_final.pt",
            }
        )
    )
    torch.save({"w": torch.zeros(2)}, run / "model_final.pt")
    return run


@pytest.mark.parametrize("kind", KINDS)
def test_predict_model_is_read_before_any_scan(
    kind: str,
    ckpt: Path,
    fake_run: Path,
    tmp_path: Path,
    no_long_work: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = _bad_files(ckpt, tmp_path / "bad")[kind]
    (fake_run / "model_final.pt").write_bytes(bad.read_bytes())
    for model in (fake_run, fake_run / "model_final.pt"):  # the run folder, or its weights file
        assert (
            main(["predict", "--model", str(model), "--input", str(tmp_path), "--out", str(tmp_path / "seg")])
            == 2
        )
        _assert_named_refusal(_err(capsys), fake_run / "model_final.pt", "--model", kind)


def test_predict_model_json_that_is_not_json(
    fake_run: Path, tmp_path: Path, no_long_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (fake_run / "model.json").write_text('{"model_kwargs": ')
    assert (
        main(["predict", "--model", str(fake_run), "--input", str(tmp_path), "--out", str(tmp_path / "s")])
        == 2
    )
    err = _err(capsys)
    assert str(fake_run / "model.json") in err and "not a readable model.json" in err


def test_an_unreadable_checkpoint_names_itself(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from asa3d.early_checks import check_init_source

    locked = tmp_path / "locked.pt"
    locked.write_bytes(ckpt.read_bytes())
    real_open = open

    def refuse(path, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202  root reads anything: simulate 0o000
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(Exception, match=r"--init .*locked\.pt: cannot be read \(Permission denied\)"):
        check_init_source(str(locked))


# --------------------------------------------------------------------------------------------
# a read-only --out fails before any long work
# --------------------------------------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder no file can be created in (as root, which writes anyway, the write test fails as a
    read-only folder's would)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:
        import asa3d.paths

        real = asa3d.paths.tempfile.mkstemp

        def refuse(*a, dir=None, **k):  # noqa: A002, ANN001, ANN002, ANN003, ANN202
            if dir is not None and Path(dir).resolve().is_relative_to(ro.resolve()):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(asa3d.paths.tempfile, "mkstemp", refuse)
    yield ro
    ro.chmod(0o700)


def _read_only_refusal(err: str, ro: Path, verb: str) -> None:
    assert f"asa3d {verb}: error:" in err and str(ro) in err and "Permission denied" in err and "Fix:" in err


def test_pretrain_to_a_read_only_folder(
    read_only: Path, phantom_dataset: Path, no_long_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "pretrain",
        "--config",
        "pretrain/asa_tiny.yaml",
        "--out",
        str(read_only),
        f"data.root={phantom_dataset}",
    ]
    assert main(args) == 2
    _read_only_refusal(_err(capsys), read_only, "pretrain")


def test_finetune_to_a_read_only_folder(
    read_only: Path, phantom_dataset: Path, no_long_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_ft_args(phantom_dataset, read_only)) == 2
    _read_only_refusal(_err(capsys), read_only, "finetune")
    assert not (read_only / "config.yaml").exists()


def test_predict_to_a_read_only_folder(
    read_only: Path, fake_run: Path, tmp_path: Path, no_long_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["predict", "--model", str(fake_run), "--input", str(tmp_path), "--out", str(read_only / "seg")])
        == 2
    )
    _read_only_refusal(_err(capsys), read_only, "predict")


# --------------------------------------------------------------------------------------------
# nothing a user made is overwritten without --overwrite
# --------------------------------------------------------------------------------------------
def test_report_out_is_not_overwritten_without_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asa3d.eval.report

    mine = tmp_path / "mine.html"
    mine.write_text("my notes")
    written = []

    def build(run_dir, out_html=None):  # noqa: ANN001, ANN202
        written.append(out_html)
        Path(out_html).write_text("report")
        return Path(out_html)

    monkeypatch.setattr(asa3d.eval.report, "build_report", build)
    assert main(["report", str(tmp_path), "--out", str(mine)]) == 2
    err = _err(capsys)
    assert "asa3d report: error:" in err and str(mine) in err and "--overwrite" in err
    assert mine.read_text() == "my notes" and not written
    assert main(["report", str(tmp_path), "--out", str(mine), "--overwrite"]) == 0
    assert mine.read_text() == "report"


def test_export_checkpoint_does_not_overwrite_by_default(ckpt: Path, tmp_path: Path) -> None:
    from asa3d.export import ExportError, export_checkpoint

    out = tmp_path / "w.safetensors"
    from safetensors import safe_open

    def content(path: Path) -> tuple[dict, dict]:  # the header's key order is not fixed: compare content
        with safe_open(str(path), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (off the mmap)

    export_checkpoint(ckpt, out)
    meta, tensors = content(out)
    out.write_bytes(b"the user's own file")
    with pytest.raises(ExportError, match="--overwrite"):
        export_checkpoint(ckpt, out)
    assert out.read_bytes() == b"the user's own file"
    export_checkpoint(ckpt, out, overwrite=True)
    meta2, tensors2 = content(out)
    assert meta2 == meta and tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors)


def test_torch_text_is_quoted_in_whole_sentences(tmp_path: Path) -> None:
    """A checkpoint cut in half: torch's long zip message is quoted up to a sentence's end."""
    from asa3d.engine.checkpoint import CheckpointError, load_checkpoint

    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.zeros(1000)}, whole)
    half = tmp_path / "half.pt"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(Exception) as raw:
        torch.load(half, weights_only=True)
    text = " ".join(str(raw.value).split())
    assert len(text) > 200  # torch's full advice, too long to quote whole
    with pytest.raises(CheckpointError) as ours:
        load_checkpoint(half)
    said = re.search(r"\(\w+Error: (.*)\)\. Fix:", str(ours.value)).group(1)
    assert text.startswith(said) and said.endswith(".") and 20 < len(said) <= 200, said


def test_evaluate_reads_every_init_before_the_first_cell(
    ckpt: Path, phantom_dataset: Path, tmp_path: Path, no_long_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A grid whose second init is garbage fails at once, not after the scratch cells have run."""
    bad = _bad_files(ckpt, tmp_path / "bad")["garbage"]
    inits = f"grid.inits=[{{name: scratch, source: scratch}}, {{name: mine, source: {bad}}}]"
    args = ["evaluate", "--config", "evaluate/phantom_tiny.yaml", "--out", str(tmp_path / "grid")]
    assert main([*args, f"data.root={phantom_dataset}", inits]) == 2
    err = _err(capsys)
    assert "grid.inits[mine].source" in err and str(bad) in err

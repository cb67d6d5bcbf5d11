"""What `asa3d export` tells the user and records: the printed summary, the sidecar's note and
method config, the refusals of an --out it cannot use, its help, and the downstream view of an
export whose sidecar is gone (only the untrained out.* left out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asa3d.cli import main as cli_main
from asa3d.engine.checkpoint import load_checkpoint
from asa3d.export import ExportError, export_checkpoint, read_export
from test_export import ckpt  # noqa: F401  the module's toy pretraining checkpoint


def test_export_prints_what_it_wrote_and_the_sidecar_says_how_to_load(
    ckpt: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "w.safetensors"
    assert cli_main(["export", str(ckpt), "--out", str(out)]) == 0
    side = json.loads(Path(f"{out}.json").read_text())
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"matched: {side['keys']['exported']} SwinUNETR backbone keys; output layer "
        "['out.conv.conv.bias', 'out.conv.conv.weight']: MONAI's initialisation (untrained; loads "
        "strict=True into SwinUNETR(**sidecar kwargs))",
        f"wrote {out} and {out}.json",
    ]
    assert side["architecture"]["note"] == (
        "out.* is MONAI's initialisation (not trained): SwinUNETR(**kwargs) loads the export with "
        "strict=True; for K classes set out_channels=K and load without out.*"
    )
    method = load_checkpoint(ckpt)["config"]["method"]
    assert method and side["method_config"] == method  # the method's own keys, for readers like eve


def test_an_out_it_cannot_use_is_refused_with_the_fix(ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ExportError) as err:
        export_checkpoint(ckpt, tmp_path)
    assert str(err.value) == (
        f"--out {tmp_path} is a folder; give a file name, e.g. {tmp_path / 'backbone.safetensors'}."
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError) as err:
        export_checkpoint(ckpt, blocker / "w.safetensors")  # its folder cannot be made
    msg = str(err.value)
    assert msg.startswith(f"cannot write the export {blocker}: ")  # the path the system refused
    assert msg.endswith("Fix: choose an --out in a folder you may write to (or fix its permissions).")


def test_export_help_names_its_input_and_output(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    raw = capsys.readouterr().out
    text = " ".join(raw.split())
    # whole phrases between their neighbours: nothing added before or after them
    assert "[--overwrite] checkpoint Write a pretraining checkpoint's" in text
    assert "See docs/export.md. positional arguments: checkpoint a pretraining checkpoint" in text
    assert "(e.g. runs/pretrain/x/last.pt) options:" in text
    assert "--out OUT output file (.safetensors recommended; .pt also works)" in text
    assert "--overwrite replace an existing --out and its sidecar" in text
    assert text.count("Write a pretraining checkpoint's transfer backbone (the EMA teacher for ASA)") == 1
    assert "plain MONAI network its method declares (SwinUNETR, ResNet;" in text
    assert "the output head initialised as MONAI does) plus a JSON sidecar with the network's kwargs" in text
    assert "preprocessing contract; verified to load with strict=True. See docs/export.md." in text
    # the examples keep their own lines (a raw description formatter), one command per line
    assert "examples:\n  asa3d export runs/asa/last.pt --out asa.safetensors\n  asa3d finetune" in raw
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    verbs = " ".join(capsys.readouterr().out.split())
    assert " export checkpoint -> plain MONAI network weights + JSON sidecar " in verbs
    with pytest.raises(SystemExit):  # --out is required
        cli_main(["export", "runs/x/last.pt"])
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_export_re_exports_the_checkpoint_helpers_lazily() -> None:
    import asa3d.export as export
    from asa3d.engine import checkpoint

    assert export.CheckpointError is checkpoint.CheckpointError
    assert export.load_checkpoint is checkpoint.load_checkpoint
    with pytest.raises(AttributeError) as err:
        export.no_such_name  # noqa: B018
    assert err.value.args == ("no_such_name",)


def test_an_export_without_its_sidecar_drops_only_the_output_layer(ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "w.safetensors"
    export_checkpoint(ckpt, out)
    full, _ = read_export(out, with_output=True)
    Path(f"{out}.json").unlink()  # an older export, or a sidecar lost on the way
    state, meta = read_export(out)
    assert meta == {}
    assert set(state) == {k for k in full if not k.startswith("out.")} and len(state) == len(full) - 2


def test_sha256_file_hashes_every_byte(tmp_path: Path) -> None:
    import hashlib

    from asa3d.export import sha256_file

    f = tmp_path / "big.bin"
    data = bytes(range(256)) * 9000  # > 2 MiB: several read chunks
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_export_into_new_folders_with_its_method_in_the_safetensors_header(
    ckpt: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from safetensors import safe_open

    out = tmp_path / "a" / "b" / "w.safetensors"  # folders that do not exist yet are made
    export_checkpoint(ckpt, out)
    with safe_open(str(out), "pt") as f:
        header = f.metadata()
    assert header == {"format": "asa3d-export/1", "method": load_checkpoint(ckpt)["method"]}
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["keys"]["output_layer"]["init"] == "MONAI default (seed 0), not trained"


def test_read_export_refusals_name_the_file(tmp_path: Path) -> None:
    from asa3d.engine.checkpoint import CheckpointError

    missing = tmp_path / "gone.safetensors"
    with pytest.raises(CheckpointError) as err:
        read_export(missing)
    assert str(err.value) == f"export {missing} does not exist."
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError) as err:
        read_export(junk)
    msg = str(err.value)
    assert msg.startswith(f"{junk}: not a readable safetensors export (")
    assert msg.endswith("); export it again with asa3d export.")


def test_verify_strict_refuses_an_incomplete_state_naming_the_network(tmp_path: Path) -> None:
    from asa3d.export import _verify_strict
    from asa3d.models.backbones.resnet import resnet_spec

    spec = resnet_spec(depth=10, spatial_dims=2, in_channels=1, num_classes=3, widths=(4, 8, 8, 8))
    state = spec.build().state_dict()
    _verify_strict(dict(state), spec, tmp_path / "w.pt")  # complete: passes
    del state["fc.bias"]
    with pytest.raises(ExportError) as err:
        _verify_strict(state, spec, tmp_path / "w.pt")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'w.pt'}: the export would not load strictly into monai.networks")
    assert "fc.bias" in msg


def test_sidecar_note_names_the_exported_network_and_its_head(tmp_path: Path) -> None:
    from asa3d.export import _metadata
    from asa3d.models.backbones.resnet import resnet_spec

    spec = resnet_spec(depth=10, spatial_dims=2, in_channels=1, num_classes=3, widths=(4, 8, 8, 8))
    src = tmp_path / "last.pt"
    src.write_bytes(b"x")
    meta = _metadata({"backbone": spec.to_dict(), "method": "adam"}, src)
    assert meta["architecture"]["note"] == (
        "fc.* is MONAI's initialisation (not trained): ResNet(**kwargs) loads the export with "
        "strict=True; for K classes set num_classes=K and load without fc.*"
    )


def test_a_transfer_state_that_does_not_fit_its_network_is_refused_naming_the_checkpoint(
    ckpt: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    import asa3d.export as export
    from asa3d.engine.checkpoint import CheckpointError

    real = export.rebuild_method

    def faulty(ck):  # noqa: ANN001, ANN202 - a method whose transfer state has a stray key
        method = real(ck)
        state = method.transfer_state_dict()
        monkeypatch.setattr(method, "transfer_state_dict", lambda: {**state, "stray.weight": torch.ones(1)})
        return method

    monkeypatch.setattr(export, "rebuild_method", faulty)
    with pytest.raises(CheckpointError) as err:
        export_checkpoint(ckpt, tmp_path / "w.safetensors")
    assert str(err.value).startswith(f"{ckpt} transfer state does not load into a plain ")
    assert "stray.weight" in str(err.value) and not (tmp_path / "w.safetensors").exists()


def test_rebuild_method_names_the_checkpoint_config_it_refuses() -> None:
    from asa3d.config import ConfigError
    from asa3d.engine.checkpoint import FORMAT
    from asa3d.export import rebuild_method

    with pytest.raises(ConfigError, match=r"^checkpoint config: unknown key\(s\) \['bogus'\]"):
        rebuild_method({"format": FORMAT, "config": {"bogus": 1}})


def test_read_export_drops_the_head_its_sidecar_names(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from asa3d.models.backbones.resnet import resnet_spec

    spec = resnet_spec(depth=10, spatial_dims=2, in_channels=1, num_classes=3, widths=(4, 8, 8, 8))
    out = tmp_path / "r.safetensors"
    save_file({k: v.contiguous() for k, v in spec.build().state_dict().items()}, str(out))
    Path(f"{out}.json").write_text(json.dumps({"backbone": spec.to_dict()}))
    state, _ = read_export(out)
    assert not any(k.startswith("fc.") for k in state) and "conv1.weight" in state  # ResNet's head: fc.*
    assert {"fc.weight", "fc.bias"} <= set(read_export(out, with_output=True)[0])
    Path(f"{out}.json").write_text(json.dumps({"backbone": {"class": "x.Net", "kwargs": {}}}))
    from asa3d.models.backbones import BackboneError

    with pytest.raises(BackboneError, match=rf"^{out}.json: backbone class 'x.Net' is not a known backbone"):
        read_export(out)


def test_sidecar_metadata_records_its_format_and_refuses_a_checkpoint_without_a_backbone(
    tmp_path: Path,
) -> None:
    from asa3d.engine.checkpoint import CheckpointError
    from asa3d.export import _metadata
    from asa3d.models.backbones.resnet import resnet_spec

    src = tmp_path / "last.pt"
    src.write_bytes(b"x")
    spec = resnet_spec(depth=10, spatial_dims=2, in_channels=1, num_classes=3, widths=(4, 8, 8, 8))
    assert _metadata({"backbone": spec.to_dict()}, src)["format"] == "asa3d-export/1"
    with pytest.raises(CheckpointError, match=rf"^{src}: no backbone record"):
        _metadata({}, src)

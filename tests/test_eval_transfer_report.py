"""What ``init`` tells the user: the exact ``transfer.json``, the refusal and warning messages, and
which loader branch reads which kind of source. A tiny 2-D MONAI ResNet (its own backbone spec)
keeps these fast; the SwinUNETR-specific paths are in test_eval_transfer.py."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from asa3d.eval.transfer import (
    InitConfig,
    TransferError,
    TransferReport,
    _split_state_meta,
    apply_key_map,
    check_contract,
    expected_keys,
    init_model,
    load_into,
    parse_key_map,
    read_source,
    spec_differences,
)
from asa3d.models.backbones.resnet import resnet_spec

WIDTHS = (4, 4, 4, 4)


def _spec(num_classes: int = 3, **extra):  # noqa: ANN003, ANN202
    return resnet_spec(depth=10, spatial_dims=2, widths=WIDTHS, num_classes=num_classes, **extra)


def _net(num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _spec(num_classes).build()


def _state(num_classes: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _net(num_classes, seed).state_dict().items()}


def _ours(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asa3d.eval.transfer"]


SUMMARY_KEYS = {
    "untrained_parts",
    "source",
    "kind",
    "n_matched",
    "n_missing",
    "n_unexpected",
    "n_shape_mismatch",
    "expected",
    "expected_matched",
    "spec_differences",
}


# --------------------------------------------------------------------------------------------
# transfer.json and the refusal of a partial load
# --------------------------------------------------------------------------------------------
def _partial_source(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """layer4 left out, a 5-class head (other shape), one key the network does not have."""
    state = {k: v for k, v in _state(num_classes=5).items() if not k.startswith("layer4.")}
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    return path, state


def _expected_message(path: Path, net: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    keys = list(net.state_dict())
    body = [k for k in keys if not k.startswith("fc.")]  # every ResNet part is an encoder part
    lacking = [k for k in body if k.startswith("layer4.")]
    n_matched = len(body) - len(lacking)
    return (
        f"{path}: only {n_matched} of {len(body)} expected keys matched "
        f"({n_matched} matched in all, 1 unexpected, 2 with another shape). "
        f"First unmatched: {lacking[:5]}. "
        "Check model.feature_size and the checkpoint, add init.key_map rules "
        "('from_prefix:to_prefix'), or pass init.allow_partial=true to accept a partial load."
    )


def test_partial_load_is_refused_and_the_refusal_is_recorded(tmp_path: Path) -> None:
    path, state = _partial_source(tmp_path)
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TransferError) as err:
        init_model(net, InitConfig(source=str(path)), run_dir=tmp_path, spec=_spec())
    msg = _expected_message(path, net, state)
    assert str(err.value) == msg
    assert err.value.report.kind == "state-dict"  # type: ignore[attr-defined]
    rec = json.loads((tmp_path / "transfer.json").read_text())
    assert rec["warnings"] == [f"refused: {msg}"]
    assert rec["n_unexpected"] == 1 and rec["n_shape_mismatch"] == 2 and rec["kind"] == "state-dict"
    # a refused load still copied what matched (the caller aborts the run; the file says what was found)
    assert torch.equal(net.state_dict()["conv1.weight"], state["conv1.weight"])
    assert torch.equal(net.state_dict()["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])


def test_without_run_dir_a_refusal_writes_nothing(tmp_path: Path) -> None:
    path, _ = _partial_source(tmp_path)
    with pytest.raises(TransferError, match="expected keys matched"):
        init_model(_net(), InitConfig(source=str(path)), spec=_spec())
    assert not (tmp_path / "transfer.json").exists()


def test_accepted_partial_load_writes_the_exact_transfer_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, state = _partial_source(tmp_path)
    net = _net()
    keys = list(net.state_dict())
    with caplog.at_level(logging.INFO, logger="asa3d.eval.transfer"):
        rep = init_model(
            net, InitConfig(source=str(path), allow_partial=True), run_dir=tmp_path, spec=_spec()
        )
    body = [k for k in keys if not k.startswith("fc.")]
    matched = sorted(k for k in body if not k.startswith("layer4."))
    missing = sorted(k for k in keys if k.startswith(("layer4.", "fc.")))
    warning = "partial load accepted (init.allow_partial): " + _expected_message(path, net, state)
    rec = json.loads((tmp_path / "transfer.json").read_text())
    assert rec == {
        "untrained_parts": [],
        "source": str(path),
        "kind": "state-dict",
        "n_matched": len(matched),
        "n_missing": len(missing),
        "n_unexpected": 1,
        "n_shape_mismatch": 2,
        "expected": len(body),
        "expected_matched": len(matched),
        "spec_differences": [],
        "matched": matched,
        "missing": missing,
        "unexpected": ["extra.weight"],
        "shape_mismatch": ["fc.weight: source (5, 4) vs model (3, 4)", "fc.bias: source (5,) vs model (3,)"],
        "warnings": [warning],
        "preprocessing": None,
    }
    assert rep.summary() == {k: rec[k] for k in SUMMARY_KEYS}
    text = (tmp_path / "transfer.json").read_text()  # one count per line: `grep n_ transfer.json` reads it
    assert f' "n_matched": {len(matched)},\n' in text and ' "n_unexpected": 1,\n' in text
    assert rep.warnings == [warning]
    ours = [r for r in caplog.records if r.name == "asa3d.eval.transfer"]
    assert [r.getMessage() for r in ours if r.levelno == logging.WARNING] == [warning]
    info = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    assert info == [f"init from {path} (state-dict): {rep.summary()}"]
    assert torch.equal(net.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_scratch_reports_every_key_missing_sorted(tmp_path: Path) -> None:
    for source in ("", "scratch", None):
        net = _net()
        rep = init_model(net, InitConfig(source=source), run_dir=tmp_path)  # type: ignore[arg-type]
        assert rep.kind == rep.source == "scratch" and rep.missing == sorted(net.state_dict())
        rec = json.loads((tmp_path / "transfer.json").read_text())
        assert rec["n_missing"] == len(net.state_dict()) and rec["n_matched"] == rec["expected"] == 0
        assert rec["source"] == "scratch" and rec["warnings"] == []


def test_transfer_json_is_written_when_metadata_holds_values_json_cannot_encode(tmp_path: Path) -> None:
    rep = TransferReport(source="s", kind="state-dict", metadata={"preprocessing": {"spacing": Path("1.5")}})
    out = rep.write(tmp_path)
    assert out == tmp_path / "transfer.json"
    assert json.loads(out.read_text())["preprocessing"] == {"spacing": "1.5"}


# --------------------------------------------------------------------------------------------
# what must match
# --------------------------------------------------------------------------------------------
SWIN_KEYS = [
    "swinViT.patch_embed.proj.weight",
    "swinViT.layers1.0.blocks.0.norm1.weight",
    "swinViT.layers4.0.downsample.reduction.weight",
    "encoder1.layer.conv1.conv.weight",
    "decoder5.transp_conv.conv.weight",
    "out.conv.conv.weight",
]
SWIN_ENCODER = SWIN_KEYS[:3]
SWIN_ALL = SWIN_KEYS[:5]  # every part but the head


@pytest.mark.parametrize(
    ("kind", "expect", "want"),
    [
        ("asa3d-checkpoint", "auto", SWIN_ALL),
        ("asa3d-export", "auto", SWIN_ALL),
        ("asa3d-finetune", "auto", SWIN_ALL),
        ("state-dict", "auto", SWIN_ENCODER),
        ("monai-swinvit-ssl", "auto", SWIN_ENCODER),
        ("state-dict", "all", SWIN_ALL),
        ("asa3d-export", "encoder", SWIN_ENCODER),
    ],
)
def test_expected_keys_by_source_kind(kind: str, expect: str, want: list[str]) -> None:
    # no spec given: the model: section's default (SwinUNETR) decides the parts
    assert expected_keys(SWIN_KEYS, kind, expect) == want
    if expect == "auto":
        assert expected_keys(SWIN_KEYS, kind) == want  # auto is the default


# --------------------------------------------------------------------------------------------
# key maps
# --------------------------------------------------------------------------------------------
def test_key_map_rules() -> None:
    assert parse_key_map(["backbone.:", "a:b:c"]) == [("backbone.", ""), ("a", "b:c")]
    with pytest.raises(TransferError) as err:
        parse_key_map(["backbone."])
    assert (
        str(err.value) == "key_map rule 'backbone.' must look like 'from_prefix:to_prefix' (to may be empty)"
    )
    t = torch.zeros(1)
    rules = parse_key_map(["enc.stem.:conv1.", "enc.:", "enc.stem.:never."])
    got = apply_key_map({"enc.stem.w": t, "enc.layer1.w": t, "head.w": t}, rules)
    assert list(got) == ["conv1.w", "layer1.w", "head.w"]  # the first matching rule wins
    assert apply_key_map({"a.w": t}, []) == {"a.w": t}


# --------------------------------------------------------------------------------------------
# reading a source: one test per branch of the loader
# --------------------------------------------------------------------------------------------
def test_missing_source_names_it_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        read_source(str(tmp_path / "nope.pt"))
    assert str(err.value) == (
        f"init source {str(tmp_path / 'nope.pt')!r} not found (use init.source=scratch or a file path)"
    )


def test_unreadable_checkpoint_is_a_transfer_error_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TransferError) as err:
        read_source(str(bad))
    assert str(err.value).startswith(f"init.source: {bad}: not a readable checkpoint")


def test_folder_sources(tmp_path: Path) -> None:
    state = _state()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(TransferError) as err:
        read_source(str(empty))
    assert str(err.value) == f"{empty}: a folder without model_final.pt or a .safetensors export"
    # any .safetensors export: the first by name
    exports = tmp_path / "exports"
    exports.mkdir()
    save_file({"conv1.weight": state["conv1.weight"]}, str(exports / "b.safetensors"))
    save_file({"bn1.weight": state["bn1.weight"]}, str(exports / "a.safetensors"))
    got, kind, _ = read_source(str(exports))
    assert kind == "asa3d-export" and list(got) == ["bn1.weight"]
    # teacher.safetensors before any other export
    save_file({"layer1.0.bn1.bias": state["layer1.0.bn1.bias"]}, str(exports / "teacher.safetensors"))
    got, kind, _ = read_source(str(exports))
    assert kind == "asa3d-export" and list(got) == ["layer1.0.bn1.bias"]
    # a fine-tuned run's model_final.pt before anything else
    torch.save({"format": "asa3d-finetune-1", "state_dict": state}, exports / "model_final.pt")
    got, kind, _ = read_source(str(exports))
    assert kind == "asa3d-finetune" and set(got) == set(state)


def test_export_with_sidecar_pt_or_safetensors(tmp_path: Path) -> None:
    state = {k: v for k, v in _state().items() if not k.startswith("fc.")}
    side = {"preprocessing": {"spacing_mm": [1.5, 1.5, 2.0]}, "transfer_parts": {"layer4": False}}
    torch.save(state, tmp_path / "w.pt")
    (tmp_path / "w.pt.json").write_text(json.dumps(side))
    save_file(state, str(tmp_path / "w.safetensors"))  # no sidecar: still an export
    for name, meta_want in (("w.pt", side), ("w.safetensors", {})):
        got, kind, meta = read_source(str(tmp_path / name), ["layer1.:stage1."])
        assert kind == "asa3d-export" and meta == meta_want
        assert "stage1.0.conv1.weight" in got and not any(k.startswith("layer1.") for k in got)
        assert torch.equal(got["conv1.weight"], state["conv1.weight"])


def test_finetune_checkpoint_carries_its_metadata(tmp_path: Path) -> None:
    state = _state()
    meta = {"backbone": _spec().to_dict(), "preprocessing": {"orientation": "RAS"}}
    torch.save({"format": "asa3d-finetune-2", "state_dict": state, "metadata": meta}, tmp_path / "f.pt")
    got, kind, got_meta = read_source(str(tmp_path / "f.pt"), ["fc.:head."])
    assert kind == "asa3d-finetune" and got_meta == meta
    assert set(got) == {k.replace("fc.", "head.") for k in state}
    torch.save({"format": "asa3d-finetune-2", "state_dict": state}, tmp_path / "g.pt")
    assert read_source(str(tmp_path / "g.pt"))[2] == {}


def test_finetuned_run_weights_read_backbone_and_preprocessing_from_model_json(tmp_path: Path) -> None:
    state = _state()
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "model_best.pt")
    torch.save(state, run / "weights.pt")
    info = {"backbone": _spec().to_dict(), "preprocessing": {"hu_window": [-175, 250]}, "n_classes": 3}
    (run / "model.json").write_text(json.dumps(info))
    got, kind, meta = read_source(str(run / "model_best.pt"), ["conv1.:stem."])
    assert kind == "state-dict" and meta == {
        "backbone": info["backbone"],
        "preprocessing": info["preprocessing"],
    }
    assert "stem.weight" in got and "conv1.weight" not in got
    # only weights named like a run's model_*.pt read model.json
    assert read_source(str(run / "weights.pt"))[2] == {}
    (run / "model.json").write_text(json.dumps({"n_classes": 3}))
    assert read_source(str(run / "model_best.pt"))[2] == {}


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "state"])
def test_wrapped_state_dicts_keep_only_tensors(tmp_path: Path, wrapper: str) -> None:
    inner = {"conv1.weight": torch.ones(2), "step": 7}
    torch.save({wrapper: inner, "epoch": 3, "bn1.weight": torch.zeros(1)}, tmp_path / "w.pt")
    got, kind, meta = read_source(str(tmp_path / "w.pt"))
    assert kind == "state-dict" and meta == {} and list(got) == ["conv1.weight"]


def test_wrapper_order_and_non_mapping_wrappers(tmp_path: Path) -> None:
    a, b = torch.ones(1), torch.zeros(1)
    torch.save({"state_dict": {"a": a}, "model": {"b": b}, "state": {"c": b}}, tmp_path / "1.pt")
    assert list(read_source(str(tmp_path / "1.pt"))[0]) == ["a"]
    torch.save({"model": {"b": b}, "state": {"c": b}}, tmp_path / "2.pt")
    assert list(read_source(str(tmp_path / "2.pt"))[0]) == ["b"]
    # a tensor called state_dict is a weight, not a wrapper
    torch.save({"state_dict": a, "w": b}, tmp_path / "3.pt")
    assert list(read_source(str(tmp_path / "3.pt"))[0]) == ["state_dict", "w"]


def test_key_map_replaces_foreign_layout_detection(tmp_path: Path) -> None:
    from asa3d.models.backbones.swinunetr import PATCH_EMBED_KEY

    w = torch.zeros(12, 1, 2, 2, 2)
    release = {
        "module.patch_embed.proj.weight": w,
        "module.layers1.0.blocks.0.mlp.fc1.weight": torch.zeros(2),
        "module.rotation_head.weight": torch.zeros(4, 8),
    }
    torch.save({"state_dict": release}, tmp_path / "model_swinvit.pt")
    got, kind, _ = read_source(str(tmp_path / "model_swinvit.pt"))
    assert kind == "monai-swinvit-ssl" and PATCH_EMBED_KEY in got
    assert "swinViT.layers1.0.blocks.0.mlp.linear1.weight" in got
    assert "<unmapped>module.rotation_head.weight" in got  # kept, reported as unexpected on load
    # explicit rules: the user's renaming, not the detected layout
    got, kind, _ = read_source(str(tmp_path / "model_swinvit.pt"), ["module.:swinViT."])
    assert kind == "state-dict"
    assert set(got) == {
        PATCH_EMBED_KEY,
        "swinViT.layers1.0.blocks.0.mlp.fc1.weight",
        "swinViT.rotation_head.weight",
    }


def test_export_payloads_in_either_shape() -> None:
    t = torch.ones(1)
    assert _split_state_meta(({"a": t}, None)) == ({"a": t}, {})
    assert _split_state_meta(({"a": t}, {"m": 1})) == ({"a": t}, {"m": 1})
    assert _split_state_meta({"state_dict": {"a": t}, "metadata": {"m": 1}}) == ({"a": t}, {"m": 1})
    assert _split_state_meta({"state_dict": {"a": t}, "metadata": None}) == ({"a": t}, {})
    assert _split_state_meta({"state_dict": {"a": t}}) == ({"a": t}, {})
    assert _split_state_meta({"a": t, "note": "x"}) == ({"a": t}, {})
    with pytest.raises(TransferError, match=r"^unexpected export/checkpoint payload list$"):
        _split_state_meta([t])


# --------------------------------------------------------------------------------------------
# the source's recorded network, untrained parts, preprocessing contract
# --------------------------------------------------------------------------------------------
def test_spec_differences_name_what_differs() -> None:
    target = _spec()
    other = _spec(conv1_t_stride=2)
    assert spec_differences({}, target) == []
    assert spec_differences({"backbone": other.to_dict()}, None) == []
    assert spec_differences({"backbone": _spec(num_classes=7).to_dict()}, target) == []  # head size aside
    assert spec_differences({"backbone": other.to_dict()}, target) == ["conv1_t_stride 2 vs 1"]
    assert spec_differences({"backbone": {"class": "foo.Bar"}}, target) == [
        "the source records a backbone this asa3d cannot read "
        "(init source: backbone class 'foo.Bar' is not a known backbone)"
    ]


def test_recorded_network_and_untrained_parts_are_warned_and_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _state()
    meta = {
        "backbone": _spec(conv1_t_stride=2, act="elu").to_dict(),  # same shapes, another network
        "transfer_parts": {"stem": True, "layer1": True, "layer2": True, "layer3": False, "layer4": False},
        "preprocessing": {"spacing_mm": [1.5, 1.5, 2.0], "orientation": "RAS"},
    }
    src = tmp_path / "f.pt"
    torch.save({"format": "asa3d-finetune-1", "state_dict": state, "metadata": meta}, src)
    with caplog.at_level(logging.WARNING, logger="asa3d.eval.transfer"):
        rep = init_model(
            _net(),
            InitConfig(source=str(src)),
            run_dir=tmp_path,
            contract={"spacing_mm": [1.5, 1.5, 1.5], "orientation": "RAS"},
            spec=_spec(),
        )
    want = [
        "preprocessing mismatch: checkpoint spacing_mm=[1.5, 1.5, 2.0] but fine-tuning uses [1.5, 1.5, 1.5]",
        f"{src}: its recorded network differs from this one (source vs target): act elu vs (unset); "
        "conv1_t_stride 2 vs 1",
        f"{src}: parts ['layer3', 'layer4'] were not trained by its method (random)",
    ]
    assert rep.warnings == want and _ours(caplog) == want
    rec = json.loads((tmp_path / "transfer.json").read_text())
    assert rec["warnings"] == want and rec["kind"] == "asa3d-finetune"
    assert rec["untrained_parts"] == ["layer3", "layer4"]
    assert rec["spec_differences"] == ["act elu vs (unset)", "conv1_t_stride 2 vs 1"]
    assert rec["preprocessing"] == meta["preprocessing"]
    assert rec["n_matched"] == len(state) and rec["expected_matched"] == rec["expected"] == len(state) - 2


def test_a_refusal_names_the_network_the_source_was_pretrained_on(tmp_path: Path) -> None:
    state = {k: v for k, v in _state().items() if not k.startswith(("layer4.", "fc."))}
    meta = {"backbone": _spec(conv1_t_stride=2, act="elu").to_dict()}
    torch.save({"format": "asa3d-finetune-1", "state_dict": state, "metadata": meta}, tmp_path / "f.pt")
    with pytest.raises(TransferError) as err:
        init_model(_net(), InitConfig(source=str(tmp_path / "f.pt")), spec=_spec())
    assert (
        f"{tmp_path / 'f.pt'}: only {len(state)} of 75 expected keys matched ({len(state)} matched in all, "
        "0 unexpected, 0 with another shape). The source was pretrained on another network: "
        "act elu vs (unset); conv1_t_stride 2 vs 1. First unmatched: ['layer4.0.conv1.weight', "
    ) in str(err.value)


def test_untrained_parts_without_a_record_are_none() -> None:
    assert TransferReport("s", "k").untrained_parts == []
    assert TransferReport("s", "k", metadata={"transfer_parts": None}).untrained_parts == []


def test_preprocessing_contract(caplog: pytest.LogCaptureFixture) -> None:
    pre = {"spacing_mm": [1.5, 1.5, 2.0], "hu_window": [-175, 250], "orientation": "RAS"}

    def check(contract):  # noqa: ANN001, ANN202
        return check_contract(TransferReport("s", "k", metadata={"preprocessing": pre}), contract)

    same = {"spacing_mm": (1.50004, 1.5, 2.0), "hu_window": [-175.0, 250.0], "orientation": "RAS"}
    assert check(same) == []  # rounding noise and list vs tuple are no difference
    assert check({"spacing_mm": None, "hu_window": None}) == []  # unset: nothing to compare
    assert check({}) == [] and check(None) == []
    assert check_contract(TransferReport("s", "k"), same) == []
    rep = TransferReport("s", "k", metadata={"preprocessing": pre})
    with caplog.at_level(logging.WARNING, logger="asa3d.eval.transfer"):
        got = check_contract(
            rep, {"spacing_mm": [1.5, 1.5, 2.0001], "hu_window": [-160, 240], "orientation": "LPS"}
        )
    assert got == [
        "preprocessing mismatch: checkpoint spacing_mm=[1.5, 1.5, 2.0] but fine-tuning uses "
        "[1.5, 1.5, 2.0001]",
        "preprocessing mismatch: checkpoint hu_window=[-175, 250] but fine-tuning uses [-160, 240]",
        "preprocessing mismatch: checkpoint orientation=RAS but fine-tuning uses LPS",
    ]
    assert rep.warnings == got and _ours(caplog) == got
    assert check_contract(
        TransferReport("s", "k", metadata={"preprocessing": {"hu_window": [0, 1]}}), pre
    ) == ["preprocessing mismatch: checkpoint hu_window=[0, 1] but fine-tuning uses [-175, 250]"]


def test_load_into_counts_keys_without_a_spec_against_the_default_network() -> None:
    """No spec: SwinUNETR's parts decide what is expected, and a refusal explains the mismatch."""
    from asa3d.config_sections import ModelConfig
    from asa3d.models.backbones import default_spec

    net = default_spec(ModelConfig(feature_size=12), 2).build()
    src = default_spec(ModelConfig(feature_size=24), 2).build().state_dict()
    with pytest.raises(TransferError) as err:
        load_into(net, src, source="fs24", kind="asa3d-export")
    assert re.search(
        r"^fs24: only \d+ of \d+ expected keys matched \(\d+ matched in all, 0 unexpected, \d+ with another "
        r"shape\)\. The source has feature size 24, expected 12 \(model\.feature_size\)\. First unmatched: ",
        str(err.value),
    )


def test_asa3d_checkpoint_gives_its_teacher_backbone_and_the_exports_metadata(tmp_path: Path) -> None:
    from asa3d.engine.checkpoint import load_checkpoint
    from asa3d.engine.distributed import DistEnv
    from asa3d.engine.trainer import Trainer
    from asa3d.export import export_checkpoint
    from engine_toy_method import toy_config, toy_factory

    ckpt = Trainer(
        toy_config(), tmp_path / "pre", DistEnv(), dataset_factory=toy_factory(2)
    ).save_checkpoint()
    state, kind, meta = read_source(str(ckpt), ["swinViT.:vit."])
    assert kind == "asa3d-checkpoint" and state and not any(k.startswith("out.") for k in state)
    assert all(not k.startswith("swinViT.") for k in state) and "vit.patch_embed.proj.weight" in state
    assert meta["preprocessing"] == load_checkpoint(ckpt)["preprocessing"] and meta["preprocessing"]
    # init from the checkpoint or from its export: the same record of where the weights came from
    _, exported = export_checkpoint(ckpt, tmp_path / "e.safetensors")
    assert set(meta) == set(exported)


def test_load_into_defaults_and_the_expect_setting(tmp_path: Path) -> None:
    import dataclasses

    spec = dataclasses.replace(_spec(), encoder=("stem", "layer1"))  # a backbone whose encoder is the stem
    state = {k: v for k, v in _state().items() if not k.startswith("layer4.")}
    rep = load_into(_net(), state, spec=spec)  # a plain state dict: only the encoder must match
    assert (rep.source, rep.kind) == ("<state dict>", "state-dict") and rep.expected_matched == rep.expected
    with pytest.raises(TransferError, match=r"^<state dict>: only \d+ of \d+ expected keys matched"):
        load_into(_net(), state, spec=dataclasses.replace(spec, encoder=("layer4",)))
    torch.save(state, tmp_path / "w.pt")
    assert init_model(_net(), InitConfig(source=str(tmp_path / "w.pt")), spec=spec).kind == "state-dict"
    with pytest.raises(TransferError, match="expected keys matched"):  # init.expect=all: every part
        init_model(_net(), InitConfig(source=str(tmp_path / "w.pt"), expect="all"), spec=spec)

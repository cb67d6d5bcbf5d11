"""Initialise a segmentation model from pretrained weights, counting every key.

What the network is (its parts, its encoder, its head, foreign layouts it reads) comes from the
backbone spec (``asa3d.models.backbones``); this module only moves and counts tensors.

Sources (``init.source``):
- ``scratch``: MONAI's random initialisation;
- an asa3d checkpoint ``*.pt`` (``format: asa3d-checkpoint/...``), via
  ``asa3d.export.transfer_state_from_checkpoint`` (teacher backbone, ``out.*`` dropped);
- an asa3d export ``*.safetensors`` (+ JSON sidecar), via ``asa3d.export.read_export``;
- a foreign layout a backbone family registers (e.g. MONAI's released self-supervised encoder
  weights, see ``asa3d.models.backbones``);
- any other state dict (``{"state_dict"|"model"|"state": ...}`` or a bare dict), renamed by
  ``init.key_map`` rules ``"from_prefix:to_prefix"`` (first matching rule wins).

Every load is counted: matched / missing / unexpected / shape-mismatched keys go to
``transfer.json``. A load that leaves any key of the *expected* set unmatched (the spec's encoder
parts; for asa3d sources every part but the head) raises ``TransferError`` unless
``init.allow_partial`` is set: no silent ``strict=False``. Parts the source's method did not train
(its recorded ``transfer_parts``) are listed as ``untrained_parts``: their weights are random.
Where the source recorded its backbone spec (asa3d checkpoints, exports, fine-tuned runs), it is
compared with the target's and every difference is named (``spec_differences``), in the refusal
message too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.utils import copy_model_state

from asa3d.config_sections import ModelConfig
from asa3d.eval.config_sections import InitConfig  # noqa: F401  re-exported (schema in a light module)
from asa3d.models.backbones import (
    DEFAULT_BACKBONE,
    BackboneError,
    BackboneSpec,
    convert_known_layout,
    default_spec,
)

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """Pretrained weights do not fit the model (the message lists what did not match)."""


@dataclass
class TransferReport:
    source: str
    kind: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys left at their initial value
    unexpected: list[str] = field(default_factory=list)  # source keys with no model key
    shape_mismatch: list[str] = field(default_factory=list)
    expected: int = 0
    expected_matched: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    spec_differences: list[str] = field(default_factory=list)  # source's recorded spec vs the target's

    @property
    def untrained_parts(self) -> list[str]:
        """Parts the pretraining method never trained (random weights, however well they load)."""
        parts = self.metadata.get("transfer_parts") or {}
        return sorted(p for p, trained in parts.items() if not trained)

    def summary(self) -> dict[str, Any]:
        return {
            "untrained_parts": self.untrained_parts,
            "source": self.source,
            "kind": self.kind,
            "n_matched": len(self.matched),
            "n_missing": len(self.missing),
            "n_unexpected": len(self.unexpected),
            "n_shape_mismatch": len(self.shape_mismatch),
            "expected": self.expected,
            "expected_matched": self.expected_matched,
            "spec_differences": self.spec_differences,
        }

    def to_json(self) -> dict[str, Any]:
        d = self.summary()
        d.update(
            matched=self.matched,
            missing=self.missing,
            unexpected=self.unexpected,
            shape_mismatch=self.shape_mismatch,
            warnings=self.warnings,
            preprocessing=self.metadata.get("preprocessing"),
        )
        return d

    def write(self, run_dir: str | Path) -> Path:
        import json

        from asa3d.atomic import atomic_write_text

        return atomic_write_text(
            Path(run_dir) / "transfer.json", json.dumps(self.to_json(), indent=1, default=str)
        )


# --------------------------------------------------------------------------------------------
# reading a source
# --------------------------------------------------------------------------------------------
def parse_key_map(rules: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for r in rules:
        if ":" not in r:
            raise TransferError(
                f"key_map rule {r!r} must look like 'from_prefix:to_prefix' (to may be empty)"
            )
        a, b = r.split(":", 1)
        out.append((a, b))
    return out


def apply_key_map(
    state: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    if not rules:
        return dict(state)
    out = {}
    for k, v in state.items():
        for a, b in rules:
            if k.startswith(a):
                k = b + k[len(a) :]
                break
        out[k] = v
    return out


def read_source(
    source: str, key_map: Sequence[str] = ()
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Load ``source`` -> (state dict in the network's own keys, kind, metadata). Safe loading only
    (``weights_only=True``; safetensors for exports). A fine-tuned run's weights carry the
    ``backbone`` spec and preprocessing its ``model.json`` records."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"init source {source!r} not found (use init.source=scratch or a file path)")
    rules = parse_key_map(key_map)
    if path.is_dir():
        for name in ("model_final.pt", "teacher.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            sts = sorted(path.glob("*.safetensors"))
            if not sts:
                raise TransferError(f"{path}: a folder without model_final.pt or a .safetensors export")
            path = sts[0]
    if path.suffix == ".safetensors" or path.with_name(path.name + ".json").is_file():  # export + sidecar
        from asa3d.export import read_export

        state, meta = _split_state_meta(read_export(path))
        return apply_key_map(state, rules), "asa3d-export", meta
    from asa3d.engine.checkpoint import CheckpointError, load_checkpoint

    try:
        obj = load_checkpoint(path)  # weights_only=True, with our own refusal message
    except CheckpointError as exc:
        raise TransferError(f"init.source: {exc}") from None
    if not isinstance(obj, Mapping):
        raise TransferError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    if str(obj.get("format", "")).startswith("asa3d-checkpoint"):
        from asa3d.export import transfer_state_from_checkpoint

        state, meta = _split_state_meta(transfer_state_from_checkpoint(path))
        meta.setdefault("preprocessing", obj.get("preprocessing"))
        return apply_key_map(state, rules), "asa3d-checkpoint", meta
    if str(obj.get("format", "")).startswith("asa3d-finetune"):
        return apply_key_map(obj["state_dict"], rules), "asa3d-finetune", dict(obj.get("metadata", {}))
    run_info = path.parent / "model.json"
    if path.name.startswith("model_") and run_info.is_file():  # a fine-tuned run's weights
        import json

        info = json.loads(run_info.read_text())
        meta = {k: info[k] for k in ("backbone", "preprocessing") if k in info}
        return apply_key_map(dict(obj), rules), "state-dict", meta
    inner = obj
    for k in ("state_dict", "model", "state"):
        if k in obj and isinstance(obj[k], Mapping):
            inner = obj[k]
            break
    tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    known = None if rules else convert_known_layout(tensors)
    if known is not None:  # e.g. MONAI's released self-supervised encoder weights
        return known[0], known[1], {}
    return apply_key_map(tensors, rules), "state-dict", {}


def _split_state_meta(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The export API returns (state, metadata) or a dict holding both; accept either."""
    if isinstance(obj, tuple) and len(obj) == 2:
        return dict(obj[0]), dict(obj[1] or {})
    if isinstance(obj, Mapping) and "state_dict" in obj:
        return dict(obj["state_dict"]), dict(obj.get("metadata", {}) or {})
    if isinstance(obj, Mapping):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    raise TransferError(f"unexpected export/checkpoint payload {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# loading into a model
# --------------------------------------------------------------------------------------------
def expected_keys(
    model_keys: Sequence[str], kind: str, expect: str = "auto", spec: BackboneSpec | None = None
) -> list[str]:
    """Model keys that must all be matched: the encoder parts of the backbone spec, or every part
    (all but the head) for asa3d's own sources."""
    spec = spec or default_spec(ModelConfig(), 1)
    if expect == "auto":
        expect = "all" if kind in ("asa3d-checkpoint", "asa3d-export", "asa3d-finetune") else "encoder"
    prefixes = spec.encoder_prefixes() if expect == "encoder" else spec.prefixes()
    return [k for k in model_keys if k.startswith(prefixes)]


def load_into(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    kind: str = "state-dict",
    expect: str = "auto",
    allow_partial: bool = False,
    metadata: Mapping[str, Any] | None = None,
    spec: BackboneSpec | None = None,
) -> TransferReport:
    """Copy the matching tensors of ``state`` into ``model`` and count what matched."""
    dst = model.state_dict()
    report = TransferReport(source=source, kind=kind, metadata=dict(metadata or {}))
    report.spec_differences = spec_differences(report.metadata, spec)
    shape_ok = {}
    for k, v in state.items():
        if k in dst:
            if tuple(dst[k].shape) == tuple(v.shape):
                shape_ok[k] = v
            else:
                report.shape_mismatch.append(f"{k}: source {tuple(v.shape)} vs model {tuple(dst[k].shape)}")
        else:
            report.unexpected.append(k.replace("<unmapped>", ""))
    if shape_ok:
        # MONAI's copier does the in-place copy; its own key accounting ignores shapes, so ours is used.
        _, updated, _ = copy_model_state(model, shape_ok, inplace=True)
        report.matched = sorted(updated)
    report.missing = sorted(k for k in dst if k not in shape_ok)
    exp = expected_keys(list(dst), kind, expect, spec)
    report.expected = len(exp)
    report.expected_matched = sum(k in shape_ok for k in exp)
    if report.expected_matched < report.expected:
        lacking = [k for k in exp if k not in shape_ok]
        msg = (
            f"{source}: only {report.expected_matched} of {report.expected} expected keys matched "
            f"({len(report.matched)} matched in all, {len(report.unexpected)} unexpected, "
            f"{len(report.shape_mismatch)} with another shape). "
            f"{(spec or default_spec(ModelConfig(), 1)).explain_mismatch(state, dst)}"
            + (
                f"The source was pretrained on another network: {'; '.join(report.spec_differences)}. "
                if report.spec_differences
                else ""
            )
            + f"First unmatched: {lacking[:5]}. "
            "Check model.feature_size and the checkpoint, add init.key_map rules "
            "('from_prefix:to_prefix'), or pass init.allow_partial=true to accept a partial load."
        )
        if not allow_partial:
            err = TransferError(msg)
            err.report = report  # type: ignore[attr-defined]  # init_model writes it to transfer.json
            raise err
        report.warnings.append("partial load accepted (init.allow_partial): " + msg)
        log.warning(report.warnings[-1])
    return report


def spec_differences(metadata: Mapping[str, Any], spec: BackboneSpec | None) -> list[str]:
    """How the backbone a source recorded differs from the target's (head size aside)."""
    recorded = metadata.get("backbone")
    if not recorded or spec is None:
        return []
    try:
        source_spec = BackboneSpec.from_dict(recorded, where="init source")
    except BackboneError as exc:
        return [f"the source records a backbone this asa3d cannot read ({exc})"]
    return spec.differences(source_spec)


def check_contract(report: TransferReport, contract: Mapping[str, Any] | None) -> list[str]:
    """Warn when the checkpoint's preprocessing (spacing / HU window) differs from the fine-tuning
    config's: the encoder saw other intensities or voxel sizes than it will see now."""
    pre = report.metadata.get("preprocessing")
    if not pre or not contract:
        return []
    msgs = []
    for key in ("spacing_mm", "hu_window", "orientation"):
        a, b = pre.get(key), contract.get(key)
        if a is not None and b is not None and _norm(a) != _norm(b):
            msgs.append(f"preprocessing mismatch: checkpoint {key}={a} but fine-tuning uses {b}")
    for m in msgs:
        log.warning(m)
    report.warnings.extend(msgs)
    return msgs


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(round(float(x), 4) for x in v)
    return v


def build_model(model_kwargs: Mapping[str, Any], backbone: str = DEFAULT_BACKBONE) -> torch.nn.Module:
    """The network of the ``backbone`` family from ``model_kwargs``, key names adapted to the
    installed MONAI by the backbone module."""
    return BackboneSpec.create(backbone, model_kwargs).build()


def init_model(
    model: torch.nn.Module,
    init: InitConfig,
    run_dir: str | Path | None = None,
    contract: Mapping[str, Any] | None = None,
    spec: BackboneSpec | None = None,
) -> TransferReport:
    """Apply ``init`` to ``model`` (the network of ``spec``) in place; write ``run_dir/transfer.json``."""
    if init.source in ("", "scratch", None):
        report = TransferReport(source="scratch", kind="scratch", missing=sorted(model.state_dict()))
    else:
        state, kind, meta = read_source(init.source, init.key_map)
        expect = init.expect
        if spec is not None and spec.adopts(meta.get("backbone")):
            # the source is the family this network embeds as its encoder: its keys moved there,
            # its head dropped, and only the encoder can (and must) match
            state = spec.adopt(state, meta.get("backbone"))
            expect = "encoder" if expect == "auto" else expect
        try:
            report = load_into(
                model,
                state,
                source=str(init.source),
                kind=kind,
                expect=expect,
                allow_partial=init.allow_partial,
                metadata=meta,
                spec=spec,
            )
        except TransferError as exc:  # the refusal is recorded too: transfer.json says what was found
            refused = getattr(exc, "report", None)
            if run_dir is not None and refused is not None:
                refused.warnings.append(f"refused: {exc}")
                refused.write(run_dir)
            raise
        check_contract(report, contract)
        if report.spec_differences:
            differs = "; ".join(report.spec_differences)
            msg = f"{init.source}: its recorded network differs from this one (source vs target): {differs}"
            log.warning(msg)
            report.warnings.append(msg)
        if report.untrained_parts:
            msg = f"{init.source}: parts {report.untrained_parts} were not trained by its method (random)"
            log.warning(msg)
            report.warnings.append(msg)
        log.info("init from %s (%s): %s", init.source, kind, report.summary())
    if run_dir is not None:
        report.write(run_dir)
    return report

"""Initialise a MONAI SwinUNETR segmentation model from pretrained weights, counting every key.

Sources (``init.source``):
- ``scratch``: MONAI's random initialisation;
- an asa3d checkpoint ``*.pt`` (``format: asa3d-checkpoint/...``), via
  ``asa3d.export.transfer_state_from_checkpoint`` (teacher backbone, ``out.*`` dropped);
- an asa3d export ``*.safetensors`` (+ JSON sidecar), via ``asa3d.export.read_export``;
- MONAI's Swin UNETR self-supervised release ``model_swinvit.pt`` (``{"state_dict": {"module.*"}}``,
  the layout ``SwinUNETR.load_from`` reads: encoder only, ``mlp.fc1/fc2`` names);
- any other state dict (``{"state_dict"|"model"|"state": ...}`` or a bare dict), renamed by
  ``init.key_map`` rules ``"from_prefix:to_prefix"`` (first matching rule wins).

Every load is counted: matched / missing / unexpected / shape-mismatched keys go to
``transfer.json``. A load that leaves any key of the *expected* set unmatched (all of
``swinViT.*``; for asa3d sources also encoder1-4, encoder10 and decoder1-5) raises
``TransferError`` unless ``init.allow_partial`` is set: no silent ``strict=False``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from monai.networks.nets import SwinUNETR
from monai.networks.utils import copy_model_state

log = logging.getLogger(__name__)

ASA_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.", "decoder")


class TransferError(RuntimeError):
    """Pretrained weights do not fit the model (the message lists what did not match)."""


@dataclass
class InitConfig:
    """Where the segmentation model's initial weights come from."""

    source: str = "scratch"  # scratch | path to .pt checkpoint / .safetensors export / state dict
    key_map: list[str] = field(default_factory=list)  # "from_prefix:to_prefix" rename rules
    expect: Literal["auto", "encoder", "all"] = "auto"  # keys that must all match (auto: by source)
    allow_partial: bool = False  # accept a load that leaves expected keys unmatched


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

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "n_matched": len(self.matched),
            "n_missing": len(self.missing),
            "n_unexpected": len(self.unexpected),
            "n_shape_mismatch": len(self.shape_mismatch),
            "expected": self.expected,
            "expected_matched": self.expected_matched,
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
        p = Path(run_dir) / "transfer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json(), indent=1, default=str))
        return p


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


def _swinvit_release_rename(key: str) -> str | None:
    """``model_swinvit.pt`` key -> MONAI SwinUNETR key (the mapping ``SwinUNETR.load_from`` applies:
    ``module.X`` -> ``swinViT.X`` and ``mlp.fc1/fc2`` -> ``mlp.linear1/linear2``). Other keys
    (rotation / contrastive / reconstruction heads) have no counterpart: None."""
    if not key.startswith("module."):
        return None
    rest = key[len("module.") :]
    if not (rest.startswith("patch_embed.") or rest.startswith("layers")):
        return None
    rest = rest.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
    return "swinViT." + rest


def read_source(
    source: str, key_map: Sequence[str] = ()
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Load ``source`` -> (state dict in MONAI SwinUNETR keys, kind, metadata). Safe loading only
    (``weights_only=True``; safetensors for exports)."""
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
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise TransferError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    if str(obj.get("format", "")).startswith("asa3d-checkpoint"):
        from asa3d.export import transfer_state_from_checkpoint

        state, meta = _split_state_meta(transfer_state_from_checkpoint(path))
        meta.setdefault("preprocessing", obj.get("preprocessing"))
        return apply_key_map(state, rules), "asa3d-checkpoint", meta
    if str(obj.get("format", "")).startswith("asa3d-finetune"):
        return apply_key_map(obj["state_dict"], rules), "asa3d-finetune", dict(obj.get("metadata", {}))
    inner = obj
    for k in ("state_dict", "model", "state"):
        if k in obj and isinstance(obj[k], Mapping):
            inner = obj[k]
            break
    tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    if not rules and any(k.startswith("module.layers") for k in tensors):
        renamed = {}
        for k, v in tensors.items():
            nk = _swinvit_release_rename(k)
            renamed[nk if nk else f"<unmapped>{k}"] = v
        return renamed, "monai-swinvit-ssl", {}
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
def expected_keys(model_keys: Sequence[str], kind: str, expect: str = "auto") -> list[str]:
    if expect == "auto":
        expect = "all" if kind in ("asa3d-checkpoint", "asa3d-export", "asa3d-finetune") else "encoder"
    if expect == "encoder":
        return [k for k in model_keys if k.startswith("swinViT.")]
    return [k for k in model_keys if k.startswith(ASA_PREFIXES)]


def load_into(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    kind: str = "state-dict",
    expect: str = "auto",
    allow_partial: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> TransferReport:
    """Copy the matching tensors of ``state`` into ``model`` and count what matched."""
    dst = model.state_dict()
    report = TransferReport(source=source, kind=kind, metadata=dict(metadata or {}))
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
    exp = expected_keys(list(dst), kind, expect)
    report.expected = len(exp)
    report.expected_matched = sum(k in shape_ok for k in exp)
    if report.expected_matched < report.expected:
        lacking = [k for k in exp if k not in shape_ok]
        msg = (
            f"{source}: only {report.expected_matched} of {report.expected} expected keys matched "
            f"({len(report.matched)} matched in all, {len(report.unexpected)} unexpected, "
            f"{len(report.shape_mismatch)} with another shape). First unmatched: {lacking[:5]}. "
            "Check model.feature_size and the checkpoint, add init.key_map rules "
            "('from_prefix:to_prefix'), or pass init.allow_partial=true to accept a partial load."
        )
        if not allow_partial:
            raise TransferError(msg)
        report.warnings.append("partial load accepted (init.allow_partial): " + msg)
        log.warning(report.warnings[-1])
    return report


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


def build_model(model_kwargs: Mapping[str, Any]) -> SwinUNETR:
    """``SwinUNETR(**kwargs)``, key names adapted to the installed MONAI by the backbone module."""
    from asa3d.models.backbone import monai_swinunetr_kwargs

    return SwinUNETR(**monai_swinunetr_kwargs(dict(model_kwargs)))


def init_model(
    model: torch.nn.Module,
    init: InitConfig,
    run_dir: str | Path | None = None,
    contract: Mapping[str, Any] | None = None,
) -> TransferReport:
    """Apply ``init`` to ``model`` in place; write ``run_dir/transfer.json``."""
    if init.source in ("", "scratch", None):
        report = TransferReport(source="scratch", kind="scratch", missing=sorted(model.state_dict()))
    else:
        state, kind, meta = read_source(init.source, init.key_map)
        report = load_into(
            model,
            state,
            source=str(init.source),
            kind=kind,
            expect=init.expect,
            allow_partial=init.allow_partial,
            metadata=meta,
        )
        check_contract(report, contract)
        log.info("init from %s (%s): %s", init.source, kind, report.summary())
    if run_dir is not None:
        report.write(run_dir)
    return report

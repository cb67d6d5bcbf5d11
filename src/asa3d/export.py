"""Checkpoint -> plain MONAI SwinUNETR weights (+ JSON sidecar), verified before writing.

The export holds the method's ``transfer_state_dict()`` (the teacher for student-teacher
methods) without the output layer, so ``SwinUNETR(in_channels=1, out_channels=K,
feature_size=F).load_state_dict(state, strict=False)`` leaves exactly ``out.*`` missing.

Helpers for downstream code: ``load_checkpoint``, ``rebuild_method``,
``transfer_state_from_checkpoint``, ``read_export``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from asa3d import __version__
from asa3d.engine.checkpoint import (
    CheckpointError,
    check_format,
    check_swinunetr_transfer,
    is_output_key,
    load_checkpoint,
    monai_kwargs,
)

log = logging.getLogger(__name__)

EXPORT_FORMAT = "asa3d-export/1"

__all__ = [
    "CheckpointError",
    "export_checkpoint",
    "load_checkpoint",
    "read_export",
    "rebuild_method",
    "transfer_state_from_checkpoint",
]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rebuild_method(ckpt: dict[str, Any] | str | Path) -> Any:
    """The ``PretrainMethod`` a checkpoint was written by, built from its recorded config, with its
    state (student, teacher, heads) loaded. The method must be registered (built-ins are)."""
    from asa3d.config import from_dict
    from asa3d.config_sections import PretrainConfig
    from asa3d.methods.base import build_method

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    check_format(ckpt)
    cfg = from_dict(PretrainConfig, ckpt["config"], where="checkpoint config")
    method = build_method(cfg.method, cfg.model)
    method.load_state_dict(ckpt["state"]["method"])
    return method.eval()


def _metadata(ckpt: dict[str, Any], source: Path) -> dict[str, Any]:
    kwargs = dict(ckpt["backbone"]["kwargs"])
    return {
        "format": EXPORT_FORMAT,
        "architecture": {
            "class": ckpt["backbone"]["class"],
            "kwargs": kwargs,
            "note": "out_channels is the pretraining head's; set yours, out.* is not exported",
        },
        "preprocessing": ckpt.get("preprocessing"),
        "method": ckpt.get("method"),
        "transfer_parts": ckpt.get("transfer_parts"),
        "source_checkpoint": str(source),
        "source_sha256": sha256_file(source),
        "progress": {k: ckpt.get("progress", {}).get(k) for k in ("round", "global_iter", "total_iters")},
        "pretrain_version": ckpt.get("version"),
        "asa3d_version": __version__,
    }


def transfer_state_from_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict keyed like SwinUNETR without ``out.*``, sidecar-like metadata), verified to
    load into a fresh SwinUNETR with only ``out.*`` unmatched."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    check_format(ckpt, path)
    method = rebuild_method(ckpt)
    full = {k: v.detach().cpu().contiguous() for k, v in method.transfer_state_dict().items()}
    kwargs = monai_kwargs(ckpt["backbone"]["kwargs"])
    state = {k: v.clone() for k, v in full.items() if not is_output_key(k)}
    report = check_swinunetr_transfer(state, kwargs, source=f"{path} transfer state")
    meta = _metadata(ckpt, path)
    meta["keys"] = {
        "exported": len(state),
        "dropped_output": sorted(k for k in full if is_output_key(k)),
        "unmatched_in_swinunetr": report["missing"],  # only out.*: set your out_channels
    }
    return state, meta


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> tuple[Path, dict[str, Any]]:
    """Write ``out`` (.safetensors, or .pt) and ``out.json``. Refuses (CheckpointError) when any
    backbone key would be dropped or a SwinUNETR key would be missing (other than out.*)."""
    state, meta = transfer_state_from_checkpoint(ckpt_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out), metadata={"format": EXPORT_FORMAT, "method": str(meta["method"])})
    else:
        torch.save(state, out)
    _sidecar(out).write_text(json.dumps(meta, indent=2, default=str))
    return out, meta


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state, metadata) of an export written by ``export_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"export {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_checkpoint(path)
    side = _sidecar(path)
    meta = json.loads(side.read_text()) if side.is_file() else {}
    return state, meta


def _cmd_export(args: argparse.Namespace) -> int:
    out, meta = export_checkpoint(args.checkpoint, args.out)
    keys = meta["keys"]
    print(
        f"matched: {keys['exported']} SwinUNETR keys; not exported: {keys['dropped_output']} (output layer); "
        f"unmatched in a fresh SwinUNETR: {keys['unmatched_in_swinunetr']} (set out_channels for your task)"
    )
    print(f"wrote {out} and {_sidecar(out)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="checkpoint -> plain MONAI SwinUNETR weights + JSON sidecar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a pretraining checkpoint (e.g. runs/pretrain/x/last.pt)")
    p.add_argument("--out", required=True, help="output file (.safetensors recommended; .pt also works)")
    p.set_defaults(func=_cmd_export)

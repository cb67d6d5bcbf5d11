"""Checkpoint -> plain MONAI SwinUNETR weights (+ JSON sidecar), verified before writing.

The export is a complete ``SwinUNETR`` state dict: the method's ``transfer_state_dict()`` (the
teacher for student-teacher methods) plus an output layer ``out.*`` initialised as MONAI
initialises it (pretraining trains no segmentation head). So, with no asa3d installed::

    net = SwinUNETR(**json.load(open("w.safetensors.json"))["architecture"]["kwargs"])
    net.load_state_dict(safetensors.torch.load_file("w.safetensors"), strict=True)

For another number of classes, build ``SwinUNETR(..., out_channels=K)`` and load the state
without ``out.*`` (``strict=False`` then leaves exactly ``out.*`` missing).

Helpers for downstream code: ``load_checkpoint``, ``rebuild_method``,
``transfer_state_from_checkpoint``, ``read_export``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asa3d import __version__

if TYPE_CHECKING:
    import torch

    from asa3d.models.backbones import BackboneSpec

log = logging.getLogger(__name__)

EXPORT_FORMAT = "asa3d-export/1"

__all__ = [  # plus CheckpointError and load_checkpoint, re-exported lazily (see __getattr__)
    "ExportError",
    "export_checkpoint",
    "read_export",
    "rebuild_method",
    "transfer_state_from_checkpoint",
]


class ExportError(Exception):
    """An export cannot be written or read; the message names the file and the fix."""


def __getattr__(name: str) -> Any:
    # the checkpoint helpers import torch: re-exported lazily so `asa3d --help` stays light
    if name in {"CheckpointError", "load_checkpoint"}:
        from asa3d.engine import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)


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
    from asa3d.engine.checkpoint import check_format, load_checkpoint
    from asa3d.methods.base import build_method

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    check_format(ckpt)
    cfg = from_dict(PretrainConfig, ckpt["config"], where="checkpoint config")
    method = build_method(cfg.method, cfg.model)
    method.load_state_dict(ckpt["state"]["method"])
    return method.eval()


def _class_name(network: str) -> str:
    """``monai.networks.nets.SwinUNETR`` -> ``SwinUNETR``: the name a reader calls."""
    return network.rpartition(".")[2]


def _metadata(ckpt: dict[str, Any], source: Path) -> dict[str, Any]:
    from asa3d.engine.checkpoint import backbone_spec

    spec = backbone_spec(ckpt, source)
    cls, head = _class_name(spec.network), ", ".join(f"{h}*" for h in spec.head)
    return {
        "format": EXPORT_FORMAT,
        "backbone": spec.to_dict(),  # read back by BackboneSpec.from_dict
        "architecture": {
            "class": spec.network,
            "kwargs": dict(spec.kwargs),
            "note": f"{head} is MONAI's initialisation (not trained): {cls}(**kwargs) loads the "
            f"export with strict=True; for K classes set {spec.out_key}=K and load without {head}",
        },
        "preprocessing": ckpt.get("preprocessing"),
        "method": ckpt.get("method"),
        # the method's own keys (input normalisation, view and volume sizes) for readers that feed
        # the network as it was trained, e.g. `asa3d eve`
        "method_config": (ckpt.get("config") or {}).get("method"),
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
    from asa3d.engine.checkpoint import backbone_spec, check_format, check_transfer, load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path)
    check_format(ckpt, path)
    method = rebuild_method(ckpt)
    full = {k: v.detach().cpu().contiguous() for k, v in method.transfer_state_dict().items()}
    spec = backbone_spec(ckpt, path)
    state = {k: v.clone() for k, v in full.items() if not spec.is_head_key(k)}
    report = check_transfer(state, spec, source=f"{path} transfer state")
    meta = _metadata(ckpt, path)
    meta["keys"] = {
        "exported": len(state),
        "dropped_output": sorted(k for k in full if spec.is_head_key(k)),
        "unmatched_in_swinunetr": report["missing"],  # only out.*: set your out_channels
    }
    return state, meta


def fresh_output_layer(spec: BackboneSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """The head (``out.*`` of a SwinUNETR) of the spec's network as MONAI initialises it (seeded,
    so an export is reproducible), so the export is a complete state dict."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = spec.build()
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items() if spec.is_head_key(k)}


def _verify_strict(state: dict[str, torch.Tensor], spec: BackboneSpec, out: Path) -> None:
    """The promise of the file: the plain network (``Class(**kwargs)``) loads it with strict=True."""
    try:
        spec.build().load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise ExportError(
            f"{out}: the export would not load strictly into {spec.network}({dict(spec.kwargs)}): {exc}"
        ) from None


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def export_checkpoint(
    ckpt_path: str | Path, out: str | Path, overwrite: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Write ``out`` (.safetensors, or .pt) and ``out.json``, both atomically; an existing ``out``
    (or sidecar) is replaced only with ``overwrite``. Refuses
    (CheckpointError) when any backbone key would be dropped or a SwinUNETR key would be missing
    (other than out.*), and (ExportError) when ``out`` cannot be written."""
    from asa3d.atomic import atomic_write_text, atomic_write_with

    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name, e.g. {out / 'backbone.safetensors'}.")
    if out.suffix not in (".safetensors", ".pt"):
        raise ExportError(f"--out {out}: use a .safetensors (recommended) or .pt file name.")
    if not overwrite and (out.exists() or _sidecar(out).exists()):
        raise ExportError(f"--out {out} exists; pass --overwrite to replace it, or choose another file name.")
    from asa3d.models.backbones import BackboneSpec

    state, meta = transfer_state_from_checkpoint(ckpt_path)
    spec = BackboneSpec.from_dict(meta["backbone"])
    head = fresh_output_layer(spec)
    state = {**state, **head}
    meta["keys"]["output_layer"] = {"keys": sorted(head), "init": "MONAI default (seed 0), not trained"}
    _verify_strict(state, spec, out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            from safetensors.torch import save

            blob = save(state, metadata={"format": EXPORT_FORMAT, "method": str(meta["method"])})
            atomic_write_with(out, lambda f: f.write(blob))
        else:
            import torch

            atomic_write_with(out, lambda f: torch.save(state, f))
        atomic_write_text(_sidecar(out), json.dumps(meta, indent=2, default=str))
    except OSError as exc:
        raise ExportError(
            f"cannot write the export {exc.filename or out}: {exc.strerror or exc}. "
            "Fix: choose an --out in a folder you may write to (or fix its permissions)."
        ) from None
    return out, meta


def read_export(
    path: str | Path, with_output: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state, metadata) of an export written by ``export_checkpoint``. The untrained ``out.*``
    is left out unless ``with_output`` (a fine-tune builds its own output layer)."""
    from asa3d.engine.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"export {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{path}: not a readable safetensors export ({exc}); export it again with asa3d export."
            ) from None
    else:
        state = load_checkpoint(path)
    side = _sidecar(path)
    meta = json.loads(side.read_text()) if side.is_file() else {}
    if not with_output:
        from asa3d.models.backbones import BackboneSpec

        # the head named by the recorded spec (older sidecars without one: SwinUNETR's out.*)
        if meta.get("backbone"):
            spec = BackboneSpec.from_dict(meta["backbone"], where=str(side))
            state = {k: v for k, v in state.items() if not spec.is_head_key(k)}
        else:
            state = {k: v for k, v in state.items() if not (k == "out" or k.startswith("out."))}
    return state, meta


def _cmd_export(args: argparse.Namespace) -> int:
    out, meta = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    keys = meta["keys"]
    cls = _class_name(meta["architecture"]["class"])
    print(
        f"matched: {keys['exported']} {cls} backbone keys; output layer {keys['output_layer']['keys']}: "
        f"MONAI's initialisation (untrained; loads strict=True into {cls}(**sidecar kwargs))"
    )
    print(f"wrote {out} and {_sidecar(out)}")
    return 0


EXPORT_EPILOG = """examples:
  asa3d export runs/asa/last.pt --out asa.safetensors
  asa3d finetune --config finetune/phantom_tiny.yaml --init asa.safetensors --out runs/ft data.root=...
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="checkpoint -> plain MONAI network weights + JSON sidecar",
        description="Write a pretraining checkpoint's transfer backbone (the EMA teacher for ASA) as the "
        "complete state dict of the plain MONAI network its method declares (SwinUNETR, ResNet; the "
        "output head initialised as MONAI does) plus a JSON sidecar with the network's kwargs and the "
        "preprocessing contract; verified to load with strict=True. See docs/export.md.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a pretraining checkpoint (e.g. runs/pretrain/x/last.pt)")
    p.add_argument("--out", required=True, help="output file (.safetensors recommended; .pt also works)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its sidecar")
    p.set_defaults(func=_cmd_export)

"""A pretraining checkpoint or an export -> the ``EveEncoder`` that reads it as it was trained.

Sources: an asa3d pretraining checkpoint (``.pt``, read with ``weights_only=True``; the method is
rebuilt from its recorded config and its ``transfer_state_dict()`` loaded into the network its
backbone spec describes), or an export (``.safetensors`` or ``.pt`` with its JSON sidecar, see
``asa3d.export``). Anything else is refused with a ``CheckpointError`` naming the file and the fix.

From the recorded method config (the checkpoint's, or the sidecar's ``method_config``):
- input normalisation: Adam-2D's ImageNet mean / std (one channel: 0.449 / 0.226), none otherwise;
- crop input size: the method's view size (Adam ``view_size``, VoCo ``crop_out_size``), else 224
  (2D) / 64 (3D);
- the 3D frame: volumes are resized to the cube the method trained on (Adam ``volume_size``, ASA
  and SimMIM ``input_size``), 128 otherwise;
- the pooled stage: SwinUNETR's deepest Swin stage the method trained (``transfer_parts``), so an
  untrained ``layers4`` (ASA without appearance recovery) is never what Eve reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asa3d.eve.embed import EveEncoder

__all__ = ["LoadedEncoder", "load_encoder", "normalisation_of"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.449,), (0.226,)  # ImageNet's grey mean and std (Adam, one channel)
EVE_BACKBONES = ("resnet", "swinunetr")


@dataclass
class LoadedEncoder:
    encoder: EveEncoder
    method: str | None
    method_config: dict[str, Any]
    preprocessing: dict[str, Any] | None  # the 3D preprocessing contract (spacing, HU window)
    volume_size: int  # 3D: the cube side volumes are resized to
    source: Path


def _error(msg: str) -> Exception:
    from asa3d.engine.checkpoint import CheckpointError

    return CheckpointError(msg)


def normalisation_of(
    method: str | None, cfg: Mapping[str, Any], spatial_dims: int, in_channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]] | tuple[None, None]:
    """(mean, std) per input channel the method normalised its views with, or (None, None)."""
    if method != "adam":
        return None, None
    norm = cfg.get("normalize")
    if norm is None:
        norm = "none" if spatial_dims == 3 else "imagenet"
    if norm != "imagenet":
        return None, None
    return (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (GREY_MEAN, GREY_STD)


def _deepest_trained_stage(parts: Mapping[str, bool] | None) -> int:
    if not parts:
        return 4
    trained = [k for k in range(1, 5) if parts.get(f"layers{k}", parts.get("swinViT", False))]
    if not trained:
        return 0
    return max(trained)


def _cube_side(cfg: Mapping[str, Any]) -> int:
    for key in ("volume_size", "input_size"):  # Adam-3D; ASA and SimMIM (VoCo's is a box: not a cube)
        v = cfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return 128


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone state, metadata with backbone / method / method_config / transfer_parts / preprocessing)."""
    from asa3d.engine.checkpoint import FORMAT, load_checkpoint

    if not path.exists():
        raise _error(
            f"{path}: no such checkpoint. Fix: check the path (a pretraining run's last.pt, or an export)."
        )
    if path.is_dir():
        hint = path / "last.pt"
        raise _error(
            f"{path} is a folder. Fix: give the checkpoint file"
            + (f", e.g. {hint}" if hint.is_file() else " (a run's last.pt, or an exported .safetensors)")
            + "."
        )
    if path.suffix == ".safetensors":
        from asa3d.export import read_export

        state, meta = read_export(path)
        if not meta:
            raise _error(
                f"{path}: its sidecar {path.name}.json is missing, so the network cannot be rebuilt. "
                "Fix: keep the .json written by `asa3d export` beside it, or pass the run's last.pt."
            )
        return state, {**meta, "method_config": meta.get("method_config") or {}}
    ckpt = load_checkpoint(path)  # weights_only=True; refuses code-carrying pickles
    if ckpt.get("format") == FORMAT:
        from asa3d.engine.checkpoint import backbone_spec
        from asa3d.export import rebuild_method

        try:
            method = rebuild_method(ckpt)
        except Exception as exc:  # an unknown method, a config this asa3d cannot read
            raise _error(
                f"{path}: cannot rebuild the method that wrote it ({type(exc).__name__}: {exc}). "
                "Fix: use the asa3d version that wrote it, or an export of it (asa3d export)."
            ) from None
        state = {k: v.detach().cpu() for k, v in method.transfer_state_dict().items()}
        cfg = ckpt.get("config") or {}
        return state, {
            "backbone": backbone_spec(ckpt, path).to_dict(),
            "method": ckpt.get("method"),
            "method_config": dict(cfg.get("method") or {}),
            "transfer_parts": ckpt.get("transfer_parts"),
            "preprocessing": ckpt.get("preprocessing"),
        }
    side = path.with_name(path.name + ".json")
    if side.is_file():  # a .pt export
        from asa3d.export import read_export

        state, meta = read_export(path)
        return state, {**meta, "method_config": meta.get("method_config") or {}}
    raise _error(
        f"{path}: neither an asa3d pretraining checkpoint (format {FORMAT!r}) nor an export with a "
        "JSON sidecar. Fix: pass a pretraining run's last.pt or the output of `asa3d export`; a "
        "fine-tuned model has no pretraining encoder to embed with."
    )


def load_encoder(
    path: str | Path,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    volume_size: int | None = None,
) -> LoadedEncoder:
    """Build the network the checkpoint's backbone spec describes, load its backbone strictly
    (only the task head may be missing) and wrap it for Eve."""
    from asa3d.models.backbones import BackboneError, BackboneSpec

    path = Path(path).expanduser()
    state, meta = _read(path)
    if not meta.get("backbone"):
        raise _error(f"{path}: no backbone record. Fix: export it again with this asa3d (asa3d export).")
    try:
        spec = BackboneSpec.from_dict(meta["backbone"], where=str(path))
    except BackboneError as exc:
        raise _error(str(exc)) from None
    method = meta.get("method")
    if spec.name not in EVE_BACKBONES:
        raise _error(
            f"{path}: its backbone is {spec.name!r}; Eve reads dense features of a ResNet or SwinUNETR "
            f"encoder ({', '.join(EVE_BACKBONES)}). Fix: use a checkpoint of one of those."
        )
    net = spec.build()
    try:
        spec.check_transfer(state, source=str(path))
    except BackboneError as exc:
        raise _error(f"{exc} Fix: pass the checkpoint or export as asa3d wrote it.") from None
    net.load_state_dict({k: v for k, v in state.items() if not spec.is_head_key(k)}, strict=False)
    cfg = dict(meta.get("method_config") or {})
    dims = spec.spatial_dims
    if spec.name == "swinunetr":
        pool = _deepest_trained_stage(meta.get("transfer_parts"))
        if pool == 0:
            raise _error(
                f"{path}: method {method!r} trained none of the Swin stages (transfer_parts "
                f"{meta.get('transfer_parts')}), so it has no dense features to embed with: they would "
                "be random. Fix: use a checkpoint of a method that trains the encoder."
            )
        dense = min(3, pool)
    else:
        pool, dense = 4, 4
    size = input_size or int(cfg.get("view_size") or cfg.get("crop_out_size") or (224 if dims == 2 else 64))
    if spec.name == "swinunetr" and size % 32:
        raise _error(f"--input-size {size}: SwinUNETR needs a multiple of 32 (e.g. 32, 64, 96).")
    enc = EveEncoder(
        net.to(device).eval(), spec.name, dims, pool_stage=pool, dense_stage=dense, input_size=size
    )
    mean, std = normalisation_of(method, cfg, dims, enc.in_channels)
    enc.mean, enc.std = mean, std
    enc.info = {"method": method, "source": str(path)}
    vsize = volume_size or _cube_side(cfg)
    return LoadedEncoder(enc, method, cfg, meta.get("preprocessing"), vsize, path)


def describe_source(loaded: LoadedEncoder) -> dict[str, Any]:
    return json.loads(json.dumps({"method": loaded.method, **loaded.encoder.describe()}, default=str))

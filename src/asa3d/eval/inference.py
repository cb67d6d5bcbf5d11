"""Inference with a trained downstream model: sliding windows over a preprocessed volume, labels
back in a scan's original geometry, and the trained model rebuilt from its run folder.

- :func:`predict_volume`: argmax labels of one preprocessed volume
  (``monai.inferers.sliding_window_inference``, Gaussian or constant weighting).
- :func:`labels_to_source`: nearest-neighbour resampling of a label map from the preprocessed
  grid back onto the source grid (MONAI ``SpatialResample`` from the preprocessed affine to the
  source affine and shape; exact for any orientation, RAS or LPS, because both affines are in the
  same RAS world).
- :func:`load_finetuned`: a fine-tune/probe run folder -> the network its ``model.json`` records
  (the backbone spec), prepared for its mode, with its weights (``weights_only=True``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample

from asa3d.config import ConfigError
from asa3d.config_sections import PreprocessConfig
from asa3d.engine.precision import autocast
from asa3d.models.backbones import DEFAULT_BACKBONE, BackboneSpec


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    roi: Sequence[int],
    overlap: float = 0.5,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> np.ndarray:
    """Label map (argmax) of one preprocessed volume (X, Y, Z) with sliding windows."""
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None, None].to(device)
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    with autocast(precision, dev):
        logits = sliding_window_inference(
            x, tuple(int(r) for r in roi), sw_batch_size, model, overlap=overlap, mode=mode
        )
    model.train(was_training)
    return logits.float().argmax(1)[0].to(torch.uint8 if logits.shape[1] < 256 else torch.int16).cpu().numpy()


def labels_to_source(
    labels: np.ndarray, pre_affine: np.ndarray, src_affine: np.ndarray, src_shape: Sequence[int]
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map from the preprocessed grid to the source grid."""
    mt = MetaTensor(torch.as_tensor(labels.astype(np.float32))[None], affine=torch.as_tensor(pre_affine))
    out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float64)(
        mt,
        dst_affine=torch.as_tensor(np.asarray(src_affine, dtype=np.float64)),
        spatial_size=tuple(int(s) for s in src_shape),
    )
    arr = np.rint(np.asarray(out.as_tensor() if hasattr(out, "as_tensor") else out)[0])
    return arr.astype(labels.dtype)


def to_native(pred: np.ndarray, case: Any) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A cached case's prediction on its source grid + the source label map + source spacing."""
    from asa3d.data.io import read_volume

    if not getattr(case, "label_source", None):
        raise ConfigError(f"eval.grid=native: case {case.id} records no label source file")
    gt_vol = read_volume(case.label_source)
    native = labels_to_source(pred, case.affine, case.source_affine, case.source_shape)
    return native, np.rint(gt_vol.array).astype(np.int16), gt_vol.spacing


def preprocess_config_from_contract(contract: Mapping[str, Any]) -> PreprocessConfig:
    return PreprocessConfig(
        orientation=contract.get("orientation", "RAS"),
        spacing=tuple(float(s) for s in contract["spacing_mm"]),  # type: ignore[arg-type]
        window=tuple(float(w) for w in contract["hu_window"]),
    )  # type: ignore[arg-type]


def recorded_spec(info: Mapping[str, Any], where: str) -> BackboneSpec:
    """The backbone spec a run's ``model.json`` records (``backbone``). Runs written before the
    spec was recorded there name the class and its kwargs (the class identifies the registered
    family), or, older still, only the kwargs of the default family."""
    if info.get("backbone"):
        return BackboneSpec.from_dict(info["backbone"], where=where)
    if "model_kwargs" not in info:
        raise ConfigError(f"{where}: records no network (neither 'backbone' nor 'model_kwargs')")
    if info.get("model_class"):
        return BackboneSpec.from_dict({"class": info["model_class"], "kwargs": info["model_kwargs"]}, where)
    return BackboneSpec.create(DEFAULT_BACKBONE, info["model_kwargs"])


def load_finetuned(model_path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fine-tuned run dir (or its ``model_final.pt``/``model_best.pt``) -> (model in eval mode,
    model.json). The network is rebuilt from the recorded backbone spec; weights are read with
    ``weights_only=True``."""
    from asa3d.engine.checkpoint import load_checkpoint
    from asa3d.eval.probe import prepare_model

    p = Path(model_path).expanduser()
    run = p if p.is_dir() else p.parent
    info_path = run / "model.json"
    if not info_path.exists():
        raise ConfigError(
            f"{info_path} not found: --model must be a fine-tune/probe run dir or a model file in one"
        )
    info = json.loads(info_path.read_text())
    info.setdefault("run_dir", str(run.resolve()))
    weights = p if p.is_file() else run / info.get("weights", "model_final.pt")
    if not weights.exists():
        raise FileNotFoundError(
            f"{weights}: the run has no weights (evaluate grids drop them unless grid.keep_models=true)"
        )
    spec = recorded_spec(info, str(info_path))
    probe = info.get("probe", {})
    net = prepare_model(
        spec.build(),
        spec,
        info.get("mode", "finetune"),
        bool(probe.get("freeze_encoders", False)),
        probe.get("stages", [0, 1, 2, 3, 4]),
    )
    state = load_checkpoint(weights)  # weights_only=True; a refused pickle names the file
    net.load_state_dict(state, strict=True)
    net.to(device).eval()
    return net, info

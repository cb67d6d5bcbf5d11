"""``asa3d predict``: apply a fine-tuned model to new scans; write label maps in each scan's
ORIGINAL geometry (same shape and affine as the input, NIfTI).

Per scan: read (``asa3d.data.io.read_volume``) -> the canonical preprocessing recorded in the
run's ``model.json`` (``asa3d.data.preprocess.preprocess_volumes``: RAS, spacing, HU window) ->
sliding-window inference -> argmax -> nearest-neighbour resampling of the labels from the
preprocessed grid back onto the source grid (MONAI ``SpatialResample`` from the preprocessed
affine to the source affine and shape; exact for any orientation, RAS or LPS, because both
affines are in the same RAS world).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from asa3d.config import ConfigError
from asa3d.config_sections import PreprocessConfig
from asa3d.engine.distributed import resolve_device
from asa3d.eval.finetune import predict_volume
from asa3d.eval.probe import prepare_model
from asa3d.eval.transfer import build_model

log = logging.getLogger(__name__)


def load_finetuned(model_path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fine-tuned run dir (or its ``model_final.pt``/``model_best.pt``) -> (model in eval mode,
    model.json). Weights are read with ``weights_only=True``."""
    p = Path(model_path).expanduser()
    run = p if p.is_dir() else p.parent
    info_path = run / "model.json"
    if not info_path.exists():
        raise ConfigError(
            f"{info_path} not found: --model must be a fine-tune/probe run dir or a model file in one"
        )
    info = json.loads(info_path.read_text())
    weights = p if p.is_file() else run / info.get("weights", "model_final.pt")
    if not weights.exists():
        raise FileNotFoundError(
            f"{weights}: the run has no weights (evaluate grids drop them unless grid.keep_models=true)"
        )
    base = build_model(info["model_kwargs"])
    probe = info.get("probe", {})
    net = prepare_model(
        base,
        info.get("mode", "finetune"),
        int(info["n_classes"]),
        bool(probe.get("freeze_encoders", False)),
        probe.get("stages", [0, 1, 2, 3, 4]),
    )
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.to(device).eval()
    return net, info


def preprocess_config_from_contract(contract: Mapping[str, Any]) -> PreprocessConfig:
    return PreprocessConfig(
        orientation=contract.get("orientation", "RAS"),
        spacing=tuple(float(s) for s in contract["spacing_mm"]),  # type: ignore[arg-type]
        window=tuple(float(w) for w in contract["hu_window"]),
    )  # type: ignore[arg-type]


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


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    from asa3d.data.io import IMAGE_SUFFIXES

    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir() and not any(f.suffix == ".dcm" for f in p.iterdir()):
            found += sorted(f for f in p.iterdir() if f.name.lower().endswith(IMAGE_SUFFIXES))
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"input {p} not found")
    if not found:
        raise FileNotFoundError(f"no scans found in {list(map(str, inputs))}")
    return found


def predict_files(
    model: torch.nn.Module | str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    info: Mapping[str, Any] | None = None,
    device: str = "auto",
    overlap: float | None = None,
) -> list[Path]:
    """Segment every input scan; returns the written ``<id>_seg.nii.gz`` paths."""
    from asa3d.data.io import case_id_from_path, read_volume, write_volume
    from asa3d.data.preprocess import preprocess_volumes

    dev = resolve_device(device)
    if not isinstance(model, torch.nn.Module):
        model, info = load_finetuned(model, str(dev))
    if info is None:
        raise ConfigError("predict_files: pass the run's model.json contents with a bare model")
    pre_cfg = preprocess_config_from_contract(info["preprocessing"])
    inf = info.get("inference", {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in find_inputs(inputs):
        vol = read_volume(path)
        img, _, pre_affine = preprocess_volumes(vol, None, pre_cfg)
        pred = predict_volume(
            model,
            img,
            inf.get("roi_size", [96, 96, 96]),
            inf.get("overlap", 0.5) if overlap is None else overlap,
            inf.get("mode", "gaussian"),
            int(inf.get("sw_batch_size", 1)),
            dev,
        )
        seg = labels_to_source(pred, pre_affine, vol.affine, vol.shape)
        dst = out / f"{case_id_from_path(path)}_seg.nii.gz"
        write_volume(seg, dst, affine=vol.affine)
        log.info("%s -> %s (%s, labels %s)", path, dst, seg.shape, np.unique(seg).tolist())
        written.append(dst)
    return written

"""Results of one downstream run: per-case scores on a labelled split, their summary, and the
files that hold them (``per_case.csv``, ``train_log.csv``, saved predictions), all written
through ``asa3d.atomic``.

A per-case row is ``{"id": case id, metric: {class name: value}}`` (foreground classes only,
plus the merged regions of ``eval.merged_classes``); docs/evaluation.md, "What each number means".
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asa3d.atomic import atomic_open, atomic_write_bytes
from asa3d.config import ConfigError
from asa3d.eval.config_sections import FinetuneConfig
from asa3d.eval.inference import predict_volume, to_native
from asa3d.eval.metrics import case_metrics, json_safe, mean_over_classes, nanmean


def score_cases(
    model: torch.nn.Module,
    index: Any,
    cfg: FinetuneConfig,
    n_classes: int,
    device: torch.device,
    pred_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Per-case rows ``{id, metric: {class_name: value}}`` on ``eval.grid``; with ``pred_dir`` each
    prediction (resampled grid, uint8) is also saved as ``<id>.npz``."""
    names = {int(k): str(v) for k, v in index.label_names.items()}
    roi = cfg.eval.roi_size or cfg.train.crop_size
    rows = []
    cases = list(index.cases)[: cfg.eval.max_cases] if cfg.eval.max_cases else list(index.cases)
    for case in cases:
        gt = case.label()
        if gt is None:
            raise ConfigError(f"case {case.id} has no label: the test split must be labelled")
        pred = predict_volume(
            model,
            case.image(),
            roi,
            cfg.eval.overlap,
            cfg.eval.mode,
            cfg.eval.sw_batch_size,
            device,
            cfg.train.precision,
        )
        spacing = case.spacing
        scored = pred
        if cfg.eval.grid == "native":
            scored, gt, spacing = to_native(pred, case)
        m = case_metrics(
            scored,
            gt,
            n_classes,
            spacing=spacing,
            metrics=cfg.eval.metrics,
            nsd_tolerance_mm=cfg.eval.nsd_tolerance_mm,
        )
        row: dict[str, Any] = {"id": case.id}
        for metric, vals in m.items():
            row[metric] = {
                names.get(c, f"class{c}"): v for c, v in zip(range(1, n_classes), vals, strict=True)
            }
        for name, ids in cfg.eval.merged_classes.items():
            region = case_metrics(
                np.isin(scored, ids).astype(np.uint8),
                np.isin(gt, ids).astype(np.uint8),
                2,
                spacing=spacing,
                metrics=cfg.eval.metrics,
                nsd_tolerance_mm=cfg.eval.nsd_tolerance_mm,
            )
            for metric, vals in region.items():
                if name in row[metric]:
                    raise ConfigError(f"eval.merged_classes: {name!r} is already a class name")
                row[metric][name] = vals[0]
        rows.append(row)
        if pred_dir is not None:
            save_prediction(pred_dir / f"{case.id}.npz", pred)
    return rows


def save_prediction(path: Path, pred: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, pred=pred)  # into memory, then one atomic write
    return atomic_write_bytes(path, buf.getvalue())


def summarise(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], exclude: Collection[str] = ()
) -> dict[str, Any]:
    """Mean per class over cases (NaN-excluded) and the overall mean of those class means
    (``exclude``: merged regions, reported per class but left out of the mean)."""
    out: dict[str, Any] = {}
    for metric in metrics:
        classes = list(rows[0][metric]) if rows else []
        per_class = {c: nanmean([r[metric][c] for r in rows]) for c in classes}
        out[metric] = {"per_class": per_class, "mean": mean_over_classes(per_class, exclude)}
    return out


def write_csv(path: Path, header: Sequence[str], rows: Any) -> Path:
    """One CSV file, written atomically."""
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(header))
        w.writerows(rows)
    return Path(path)


def write_per_case_csv(
    path: Path, rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None
) -> Path:
    """Long format: one line per (case, metric, class)."""
    keys = list(extra or {})
    lines = (
        [extra[k] for k in keys] + [r["id"], metric, cls, v]  # type: ignore[index]
        for r in rows
        for metric, vals in r.items()
        if metric != "id"
        for cls, v in vals.items()
    )
    return write_csv(path, keys + ["case", "metric", "class", "value"], lines)


def json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def json_text(doc: Any) -> str:
    """JSON as asa3d writes results: NaN as null, numpy scalars and paths as plain values."""
    return json.dumps(json_safe(doc), indent=1, default=json_default)

"""``asa3d data summary``: what is in a datalist, and which files cannot be used and why."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from asa3d.data.datalist import Datalist
from asa3d.data.errors import DataError

log = logging.getLogger(__name__)


def summarize(datalist: Datalist, progress: bool = False) -> dict[str, Any]:
    """Read and validate every case (image and label). Returns ``{"cases": [...], "rejected": [...],
    "label_names", "name", "split"}``; a case dict holds shape, spacing, orientation, dtype, HU stats
    and warnings."""
    from asa3d.data.io import read_volume
    from asa3d.data.validate import check_finite, hu_warning, validate_label

    classes = sorted(datalist.label_names) if datalist.label_names else None
    import sys

    from tqdm.auto import tqdm

    cases, rejected = [], []
    # a bar with ETA on a terminal only (disable=None); quiet in logs and tests
    bar = tqdm(
        datalist.items, desc="reading", unit="scan", file=sys.stderr, disable=None if progress else True
    )
    for it in bar:
        try:
            vol = read_volume(it["image"])
            check_finite(vol)  # the HU check is listed in the report below, not logged
            a = vol.array
            lo, hi = float(a.min()), float(a.max())
            rec: dict[str, Any] = {
                "id": it["id"], "image": it["image"], "shape": list(vol.shape),
                "spacing": [round(s, 4) for s in vol.spacing], "orientation": vol.orientation,
                "dtype": str(a.dtype), "min": lo, "max": hi, "mean": float(a.mean()),
                "p01": float(np.percentile(a, 1)), "p99": float(np.percentile(a, 99)),
                "warnings": [w for w in [hu_warning(vol, lo, hi)] if w],
            }  # fmt: skip
            if it.get("label"):
                lab = read_volume(it["label"])
                validate_label(lab, vol, classes)
                rec["label"] = it["label"]
                rec["label_values"] = [int(v) for v in np.unique(lab.array)]
            cases.append(rec)
        except DataError as exc:
            rejected.append({"id": it["id"], "path": it["image"], "reason": str(exc)})
    return {
        "name": datalist.name,
        "split": datalist.split,
        "source": datalist.source,
        "label_names": datalist.label_names,
        "cases": cases,
        "rejected": rejected,
        "notes": datalist.notes,
    }


def format_summary(rep: dict[str, Any]) -> str:
    cases, rej = rep["cases"], rep["rejected"]
    lines = [
        f"dataset {rep['name']!r} ({rep['source']}), split {rep['split']!r}: "
        f"{len(cases) + len(rej)} cases, {len(cases)} usable, {len(rej)} rejected, "
        f"{sum(1 for c in cases if 'label' in c)} with labels"
    ]
    if rep["label_names"]:
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in rep["label_names"].items()))
    if cases:
        shapes = np.array([c["shape"] for c in cases])
        sp = np.array([c["spacing"] for c in cases])
        lines.append(
            f"shape  min {shapes.min(0).tolist()}  median {np.median(shapes, 0).astype(int).tolist()}"
            f"  max {shapes.max(0).tolist()}"
        )
        lines.append(
            f"spacing (mm) min {sp.min(0).round(3).tolist()}  median {np.median(sp, 0).round(3).tolist()}"
            f"  max {sp.max(0).round(3).tolist()}"
        )
        orients: dict[str, int] = {}
        for c in cases:
            orients[c["orientation"]] = orients.get(c["orientation"], 0) + 1
        lines.append("orientation " + ", ".join(f"{k}: {v}" for k, v in sorted(orients.items())))
        lines.append(
            f"HU  min {min(c['min'] for c in cases):.0f}  max {max(c['max'] for c in cases):.0f}  "
            f"mean of means {np.mean([c['mean'] for c in cases]):.1f}  median p01 "
            f"{np.median([c['p01'] for c in cases]):.0f}  "
            f"median p99 {np.median([c['p99'] for c in cases]):.0f}"
        )
        lines.append("")
        w = max(len(c["id"]) for c in cases)
        lines.append(
            f"{'id':<{w}}  {'shape':<16} {'spacing (mm)':<22} orient dtype    {'HU min..max':<14} mean"
        )
        for c in cases:
            shape = "x".join(map(str, c["shape"]))
            spacing = "x".join(f"{v:.3g}" for v in c["spacing"])
            hu = f"{c['min']:.0f}..{c['max']:.0f}"
            lines.append(
                f"{c['id']:<{w}}  {shape:<16} {spacing:<22} {c['orientation']:<6} {c['dtype']:<8} {hu:<14} "
                f"{c['mean']:.0f}"
            )
    warned = [(c["id"], w) for c in cases for w in c["warnings"]]
    if warned:
        lines.append("")
        lines.append(f"warnings ({len(warned)}):")
        lines += [f"  {i}: {w}" for i, w in warned]
    if rej:
        lines.append("")
        lines.append(f"rejected ({len(rej)}):")
        lines += [f"  {r['id']}: {r['reason']}" for r in rej]
    for n in rep.get("notes") or []:
        lines.append(f"note: {n}")
    return "\n".join(lines)

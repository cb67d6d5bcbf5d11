"""Tables of an evaluation grid: the per-case results of every cell aggregated over seeds
(``per_case.csv``/``.json``, ``summary.json``'s groups), the markdown tables (``table.md``, and
``table_btcv12.md`` in the ASA paper's 12 BTCV columns), the paired statistics against the
reference (``stats.json``/``.md``, computed by ``asa3d.eval.stats``) and the plots. Every file is
written through ``asa3d.atomic``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asa3d.atomic import atomic_write_text
from asa3d.config import to_dict
from asa3d.eval.config_sections import EvaluateConfig, GridConfig
from asa3d.eval.metrics import btcv_paper_columns, json_safe, mean_over_classes, nanmean
from asa3d.eval.results import write_csv
from asa3d.eval.stats import compare_grid, compare_grid_auc, write_stats_md
from asa3d.eval.tasks2d import summarise_auc


def _atomic_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(doc), indent=1))


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan"), 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)


def _is_btcv(classes: Sequence[str]) -> bool:
    keys = {"".join(ch for ch in c.lower() if ch.isalnum()) for c in classes}
    return len(classes) == 13 and any("adrenal" in k for k in keys) and any("spleen" in k for k in keys)


def aggregate(
    results: Sequence[Mapping[str, Any]],
    cfg: EvaluateConfig,
    out: Path,
    label_names: Mapping[int, str],
    test_index: Any = None,
) -> dict[str, Any]:
    """Write per_case.csv/json, table.md, stats.json/md and plots; return the summary document."""
    g = cfg.grid
    metrics = list(cfg.eval.metrics)
    # per_case.csv: long format (classification: each image's probability and target per finding)
    columns = ["prob", "target"] if cfg.task == "classification" else metrics
    write_csv(
        out / "per_case.csv",
        ["init", "mode", "fraction", "seed", "case", "metric", "class", "value"],
        (
            [r["init"], r["mode"], r["fraction"], r["seed"], row["id"], metric, cls, "" if v is None else v]
            for r in results
            for row in r["per_case"]
            for metric in columns
            for cls, v in row.get(metric, {}).items()
        ),
    )
    _atomic_json(
        out / "per_case.json",
        [{k: r[k] for k in ("cell", "init", "mode", "fraction", "seed", "per_case")} for r in results],
    )
    groups: dict[tuple[str, str, float], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["init"], r["mode"], float(r["fraction"])), []).append(r)
    summary: dict[str, Any] = {
        "metrics": metrics,
        "groups": [],
        "grid": to_dict(g),
        "transfer": transfer_summary(results, g),
    }
    for (init, mode, frac), rs in groups.items():
        entry: dict[str, Any] = {"init": init, "mode": mode, "fraction": frac, "n_seeds": len(rs)}
        for metric in metrics:
            # per seed: mean over cases per class, then mean/sd of those over seeds (paper: sd over runs)
            per_seed_class: list[dict[str, float]] = []
            for r in rs:
                rows = r["per_case"]
                if metric == "auc":  # a property of the test set: per seed, over its images
                    per_seed_class.append(summarise_auc(rows)["auc"]["per_class"])
                    continue
                classes = list(rows[0].get(metric, {})) if rows else []
                per_seed_class.append(
                    {
                        c: nanmean([np.nan if x[metric][c] is None else x[metric][c] for x in rows])
                        for c in classes
                    }
                )
            classes = list(per_seed_class[0]) if per_seed_class else []
            cls_stats = {c: _mean_std([p[c] for p in per_seed_class]) for c in classes}
            avg = _mean_std([mean_over_classes(p, cfg.eval.merged_classes) for p in per_seed_class])
            entry[metric] = {
                "per_class": {c: {"mean": m, "std": s} for c, (m, s, _) in cls_stats.items()},
                "avg": {"mean": avg[0], "std": avg[1]},
            }
            if metric == "dice" and (
                g.table_style == "btcv" or (g.table_style == "auto" and _is_btcv(classes))
            ):
                cols = [btcv_paper_columns(p) for p in per_seed_class]
                entry["dice_btcv12"] = {
                    k: dict(zip(("mean", "std"), _mean_std([c[k] for c in cols])[:2], strict=True))
                    for k in cols[0]
                }
        summary["groups"].append(entry)
    summary["groups"].sort(key=lambda e: (_order(g, e["init"]), e["mode"], e["fraction"]))
    write_tables(summary, out)
    if cfg.task == "classification":
        fr = g.fractions
        stats = compare_grid_auc(results, g.reference, [i.name for i in g.inits], g.modes, fr, g.n_boot)
    else:
        stats = compare_inits(results, g, metrics, exclude=cfg.eval.merged_classes)
    _atomic_json(out / "stats.json", stats)
    write_stats_md(stats, out / "stats.md")
    summary["stats"] = "stats.json"
    if g.plots:
        from asa3d.eval import plots

        plots.make_all(summary, results, out, label_names, test_index)
    return summary


def _order(g: GridConfig, init: str) -> int:
    names = [i.name for i in g.inits]
    return names.index(init) if init in names else len(names)


def _fmt(ms: Mapping[str, float], scale: float, n_seeds: int = 2) -> str:
    m, s = ms.get("mean"), ms.get("std")
    if m is None or np.isnan(m):
        return "–"
    if n_seeds < 2 or s is None:  # one seed has no spread: never "± 0.00"
        return f"{m * scale:.2f} ± n/a"
    return f"{m * scale:.2f} ± {s * scale:.2f}"


def write_tables(summary: Mapping[str, Any], out: Path) -> None:
    """table.md: rows = init x mode x fraction, columns = classes + Avg (Dice in %, like Table 1)."""
    lines = []
    for metric in summary["metrics"]:
        scale = 100.0 if metric in ("dice", "nsd", "auc") else 1.0
        unit = "%" if scale == 100.0 else "mm"
        groups = summary["groups"]
        if not groups:
            continue
        classes = list(groups[0][metric]["per_class"])
        lines.append(f"### {metric} ({unit}, mean ± sd over seeds)\n")
        lines.append("| init | mode | fraction | " + " | ".join(classes) + " | Avg |")
        lines.append("|" + "---|" * (len(classes) + 4))
        for e in groups:
            n = int(e.get("n_seeds", 2))
            cells = [_fmt(e[metric]["per_class"][c], scale, n) for c in classes]
            lines.append(
                f"| {e['init']} | {e['mode']} | {e['fraction'] * 100:g}% | "
                + " | ".join(cells)
                + f" | {_fmt(e[metric]['avg'], scale, n)} |"
            )
        lines.append("")
    lines += transfer_lines(summary.get("transfer", {}))
    atomic_write_text(out / "table.md", "\n".join(lines))
    if summary["groups"] and "dice_btcv12" in summary["groups"][0]:
        cols = list(summary["groups"][0]["dice_btcv12"])
        bl = [
            "### BTCV Dice (%), the paper's 12 columns (AG = mean of adrenals)\n",
            "| init | mode | fraction | " + " | ".join(cols) + " |",
            "|" + "---|" * (len(cols) + 3),
        ]
        for e in summary["groups"]:
            bl.append(
                f"| {e['init']} | {e['mode']} | {e['fraction'] * 100:g}% | "
                + " | ".join(_fmt(e["dice_btcv12"][c], 100.0, int(e.get("n_seeds", 2))) for c in cols)
                + " |"
            )
        atomic_write_text(out / "table_btcv12.md", "\n".join(bl) + "\n")


def compare_inits(
    results: Sequence[Mapping[str, Any]],
    g: GridConfig,
    metrics: Sequence[str],
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """Paired tests of every init against ``grid.reference`` per mode and fraction, the test case
    as the unit (asa3d.eval.stats.compare_grid); a case's value is its mean over classes (NaN
    classes and the merged regions in ``exclude`` left out)."""
    return compare_grid(
        results,
        g.reference,
        [i.name for i in g.inits],
        g.modes,
        g.fractions,
        metrics,
        lambda row, metric: mean_over_classes(row[metric], exclude),
        n_boot=g.n_boot,
    )


def transfer_summary(results: Sequence[Mapping[str, Any]], g: GridConfig) -> dict[str, dict[str, Any]]:
    """Per init: what its first cell loaded (the same source in every cell of an init), untrained
    parts included, in grid order."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: _order(g, r["init"])):
        if r["init"] not in out and r.get("transfer"):
            out[r["init"]] = dict(r["transfer"])
    return out


def transfer_lines(transfer: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """table.md's weight-transfer section: an untrained part holds random weights however well it
    loads, and a probe that froze it would measure random features."""
    if not transfer:
        return []
    lines = [
        "### weight transfer (untrained: parts the init's pretraining never trained, random weights)\n",
        "| init | kind | expected matched | untrained parts |",
        "|---|---|---|---|",
    ]
    for name, t in transfer.items():
        untrained = ", ".join(t.get("untrained_parts") or []) or "none"
        lines.append(
            f"| {name} | {t.get('kind', '–')} | {t.get('expected_matched', '–')}/{t.get('expected', '–')} "
            f"| {untrained} |"
        )
    return lines + [""]

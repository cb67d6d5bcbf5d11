"""``asa3d evaluate``: initialisations x {finetune, probe} x label fractions x seeds -> tables,
statistics, plots and an HTML report.

Each cell (init, mode, fraction, seed) fine-tunes one model on the seed's nested label subset and
scores the test split; its result is written atomically to ``OUT/cells/<cell>/result.json``. A
rerun skips every cell that has one, so an interrupted grid resumes where it stopped.

Outputs in OUT: ``subsets.json``, ``per_case.csv`` + ``per_case.json``, ``summary.json``,
``table.md`` (+ ``table_btcv12.md`` for BTCV), ``stats.json`` + ``stats.md``, ``plots/*.png``,
``report.html``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from asa3d.config import ConfigError, save_config, to_dict
from asa3d.eval.finetune import FinetuneConfig, load_index, run_finetune
from asa3d.eval.metrics import btcv_paper_columns, json_safe, mean_over_classes, nanmean
from asa3d.eval.splits import fraction_tag, nested_subsets, save_subsets
from asa3d.eval.stats import paired_test
from asa3d.eval.transfer import InitConfig

log = logging.getLogger(__name__)


@dataclass
class InitSpec:
    """One named initialisation of the grid."""

    name: str = "scratch"
    source: str = "scratch"  # scratch | checkpoint / export / state-dict path
    pretrain_config: str | None = (
        None  # run `asa3d pretrain` with this config first (source = its checkpoint)
    )
    pretrain_overrides: list[str] = field(default_factory=list)
    key_map: list[str] = field(default_factory=list)
    expect: Literal["auto", "encoder", "all"] = "auto"
    allow_partial: bool = False


@dataclass
class GridConfig:
    inits: list[InitSpec] = field(default_factory=lambda: [InitSpec()])
    modes: list[Literal["finetune", "probe", "strict_linear"]] = field(
        default_factory=lambda: ["finetune", "probe"]
    )
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    reference: str = "scratch"  # the init every other init is compared with in stats
    table_style: Literal["auto", "plain", "btcv"] = "auto"  # btcv: also the paper's 12 columns
    keep_models: bool = False  # keep each cell's model_final.pt (large at paper scale)
    n_boot: int = 10000
    # when data.root is unset: write a phantom data set into OUT/phantom first, with these
    # write_phantom_dataset arguments (n, n_validation, shape, spacing, seed); lets one command run
    # from a fresh clone
    phantom: dict[str, Any] | None = None
    plots: bool = True
    report: bool = True

    def validate(self) -> None:
        names = [i.name for i in self.inits]
        if len(set(names)) != len(names):
            raise ConfigError(f"grid.inits: names must be unique, got {names}")
        if not self.inits:
            raise ConfigError("grid.inits: at least one initialisation")
        for f in self.fractions:
            if not 0 < f <= 1:
                raise ConfigError(f"grid.fractions: {f} is not in (0, 1]")


@dataclass
class EvaluateConfig(FinetuneConfig):
    """Every key of ``asa3d finetune`` (the per-cell recipe) plus ``grid``."""

    grid: GridConfig = field(default_factory=GridConfig)


def cell_name(init: str, mode: str, fraction: float, seed: int) -> str:
    return f"{init}__{mode}__{fraction_tag(fraction)}__s{seed}"


def _atomic_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(doc), indent=1))
    os.replace(tmp, path)


def resolve_init(spec: InitSpec, out: Path, cfg: EvaluateConfig) -> str:
    """The weights file of ``spec``; runs its pretraining first when ``pretrain_config`` is set."""
    if not spec.pretrain_config:
        return spec.source
    run = out / "pretrain" / spec.name
    done = run / "DONE"
    if not done.exists():
        overrides = [f"data.root={cfg.data.root}"] if cfg.data.root else []
        if cfg.data.cache_dir:
            overrides.append(f"data.cache_dir={cfg.data.cache_dir}")
        cmd = [
            sys.executable,
            "-m",
            "asa3d.cli",
            "pretrain",
            "--config",
            spec.pretrain_config,
            "--out",
            str(run),
            *overrides,
            *spec.pretrain_overrides,
        ]
        log.info("pretraining init %s: %s", spec.name, " ".join(cmd))
        subprocess.run(cmd, check=True)
        done.write_text("ok\n")
    from asa3d.engine.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ConfigError(f"pretraining of init {spec.name} in {run} left no checkpoint")
    return str(ckpt)


def make_phantom(out: Path, spec: Mapping[str, Any]) -> Path:
    """OUT/phantom/dataset.json, written once (the phantom is deterministic per seed)."""
    from asa3d.data.phantom import write_phantom_dataset

    target = out / "phantom" / "dataset.json"
    if target.exists():
        return target
    kw = dict(spec)
    for k in ("shape", "spacing"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return Path(write_phantom_dataset(out / "phantom", **kw))


CellRunner = Callable[[FinetuneConfig, Path, Sequence[str], Any, Any], dict[str, Any]]


def _default_runner(
    cfg: FinetuneConfig, run_dir: Path, ids: Sequence[str], train_index: Any, test_index: Any
) -> dict[str, Any]:
    return run_finetune(cfg, run_dir, train_ids=ids, train_index=train_index, test_index=test_index)


def run_grid(cfg: EvaluateConfig, out_dir: str | Path, runner: CellRunner | None = None) -> dict[str, Any]:
    """Run (or resume) the grid, then aggregate. ``runner`` is replaceable for tests."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runner = runner or _default_runner
    g = cfg.grid
    if cfg.eval.split is None:
        raise ConfigError("evaluate needs eval.split (the labelled test section, e.g. validation)")
    if cfg.data.root is None and g.phantom is not None:
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, root=str(make_phantom(out, g.phantom)))
        )
    save_config(cfg, out / "config.yaml")
    train_index = load_index(cfg.data)
    test_index = load_index(cfg.data, cfg.eval.split)
    ids = [c.id for c in train_index.cases]
    subsets = {s: nested_subsets(ids, g.fractions, s) for s in g.seeds}
    save_subsets(out / "subsets.json", subsets)
    sources = {spec.name: resolve_init(spec, out, cfg) for spec in g.inits}

    t0 = time.time()
    ran = 0
    results = []
    cells = [(spec, mode, f, s) for spec in g.inits for mode in g.modes for f in g.fractions for s in g.seeds]
    for i, (spec, mode, frac, seed) in enumerate(cells):
        name = cell_name(spec.name, mode, frac, seed)
        cdir = out / "cells" / name
        res_path = cdir / "result.json"
        if res_path.exists():
            results.append(json.loads(res_path.read_text()))
            continue
        init = InitConfig(
            source=sources[spec.name],
            key_map=list(spec.key_map),
            expect=spec.expect,
            allow_partial=spec.allow_partial,
        )
        keep_pred = seed == g.seeds[0] and frac == max(g.fractions)
        cell_cfg = dataclasses.replace(
            cfg,
            mode=mode,
            init=init,
            train=dataclasses.replace(cfg.train, seed=seed),
            eval=dataclasses.replace(cfg.eval, save_predictions=keep_pred),
        )
        base = FinetuneConfig(
            **{f.name: getattr(cell_cfg, f.name) for f in dataclasses.fields(FinetuneConfig)}
        )
        log.info("cell %d/%d %s (%d training cases)", i + 1, len(cells), name, len(subsets[seed][frac]))
        run_dir = cdir / "run"
        if run_dir.exists():  # a crash mid-cell: start that cell again from scratch
            shutil.rmtree(run_dir)
        doc = runner(base, run_dir, subsets[seed][frac], train_index, test_index)
        if not g.keep_models:
            for p in run_dir.glob("model_*.pt"):
                p.unlink()
        result = {
            "cell": name,
            "init": spec.name,
            "init_source": sources[spec.name],
            "mode": mode,
            "fraction": frac,
            "seed": seed,
            "train_ids": list(subsets[seed][frac]),
            "per_case": doc.get("per_case", []),
            "summary": doc.get("summary", {}),
            "loss_first": doc.get("loss_first"),
            "loss_last": doc.get("loss_last"),
            "seconds": doc.get("seconds"),
            "transfer": doc.get("transfer"),
            "predictions": str(run_dir / "predictions") if keep_pred else None,
        }
        _atomic_json(res_path, result)
        results.append(json.loads(res_path.read_text()))
        ran += 1
    log.info("grid: %d cells run, %d resumed, %.0f s", ran, len(cells) - ran, time.time() - t0)
    label_names = {int(k): v for k, v in train_index.label_names.items()}
    summary = aggregate(results, cfg, out, label_names, test_index)
    summary["cells_run"], summary["cells_resumed"] = ran, len(cells) - ran
    _atomic_json(out / "summary.json", summary)
    if g.report:
        from asa3d.eval.report import build_report

        build_report(out)
    return summary


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
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
    # per_case.csv: long format
    with open(out / "per_case.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["init", "mode", "fraction", "seed", "case", "metric", "class", "value"])
        for r in results:
            for row in r["per_case"]:
                for metric in metrics:
                    for cls, v in row.get(metric, {}).items():
                        w.writerow(
                            [
                                r["init"],
                                r["mode"],
                                r["fraction"],
                                r["seed"],
                                row["id"],
                                metric,
                                cls,
                                "" if v is None else v,
                            ]
                        )
    _atomic_json(
        out / "per_case.json",
        [{k: r[k] for k in ("cell", "init", "mode", "fraction", "seed", "per_case")} for r in results],
    )
    groups: dict[tuple[str, str, float], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["init"], r["mode"], float(r["fraction"])), []).append(r)
    summary: dict[str, Any] = {"metrics": metrics, "groups": [], "grid": to_dict(g)}
    for (init, mode, frac), rs in groups.items():
        entry: dict[str, Any] = {"init": init, "mode": mode, "fraction": frac, "n_seeds": len(rs)}
        for metric in metrics:
            # per seed: mean over cases per class, then mean/sd of those over seeds (paper: sd over runs)
            per_seed_class: list[dict[str, float]] = []
            for r in rs:
                rows = r["per_case"]
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


def _fmt(ms: Mapping[str, float], scale: float) -> str:
    m, s = ms.get("mean"), ms.get("std")
    if m is None or np.isnan(m):
        return "–"
    return f"{m * scale:.2f} ± {s * scale:.2f}"


def write_tables(summary: Mapping[str, Any], out: Path) -> None:
    """table.md: rows = init x mode x fraction, columns = classes + Avg (Dice in %, like Table 1)."""
    lines = []
    for metric in summary["metrics"]:
        scale = 100.0 if metric in ("dice", "nsd") else 1.0
        unit = "%" if scale == 100.0 else "mm"
        groups = summary["groups"]
        if not groups:
            continue
        classes = list(groups[0][metric]["per_class"])
        lines.append(f"### {metric} ({unit}, mean ± sd over seeds)\n")
        lines.append("| init | mode | fraction | " + " | ".join(classes) + " | Avg |")
        lines.append("|" + "---|" * (len(classes) + 4))
        for e in groups:
            cells = [_fmt(e[metric]["per_class"][c], scale) for c in classes]
            lines.append(
                f"| {e['init']} | {e['mode']} | {e['fraction'] * 100:g}% | "
                + " | ".join(cells)
                + f" | {_fmt(e[metric]['avg'], scale)} |"
            )
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))
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
                + " | ".join(_fmt(e["dice_btcv12"][c], 100.0) for c in cols)
                + " |"
            )
        (out / "table_btcv12.md").write_text("\n".join(bl) + "\n")


def compare_inits(
    results: Sequence[Mapping[str, Any]],
    g: GridConfig,
    metrics: Sequence[str],
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """Paired tests of every init against ``grid.reference`` per mode and fraction; pairs are
    (case, seed) and the value is the case's mean over classes (NaN classes and the merged
    regions in ``exclude`` left out)."""
    by_key: dict[tuple[str, str, float, int], Mapping[str, Any]] = {
        (r["init"], r["mode"], float(r["fraction"]), int(r["seed"])): r for r in results
    }
    comps = []
    others = [i.name for i in g.inits if i.name != g.reference]
    for metric in metrics:
        for name in others:
            for mode in g.modes:
                for frac in g.fractions:
                    a, b, pairs = [], [], []
                    for seed in g.seeds:
                        ra, rb = (
                            by_key.get((name, mode, float(frac), seed)),
                            by_key.get((g.reference, mode, float(frac), seed)),
                        )
                        if ra is None or rb is None:
                            continue
                        cb = {row["id"]: row for row in rb["per_case"]}
                        for row in ra["per_case"]:
                            if row["id"] in cb:
                                a.append(mean_over_classes(row[metric], exclude))
                                b.append(mean_over_classes(cb[row["id"]][metric], exclude))
                                pairs.append([row["id"], seed])
                    if not a:
                        continue
                    res = paired_test(a, b, n_boot=g.n_boot, seed=0)
                    res.update(metric=metric, init=name, reference=g.reference, mode=mode, fraction=frac)
                    comps.append(res)
    return {
        "test": "Wilcoxon signed-rank (two-sided, scipy) over (case, seed) pairs; "
        "mean difference = init - reference with a 95% percentile bootstrap CI",
        "comparisons": comps,
    }


def write_stats_md(stats: Mapping[str, Any], path: Path) -> None:
    lines = [
        f"{stats['test']}\n",
        "| metric | init vs reference | mode | fraction | n | mean diff | 95% CI | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in stats["comparisons"]:
        md = "–" if c["mean_diff"] is None else f"{c['mean_diff']:+.4f}"
        ci = "–" if c["ci95"][0] is None else f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
        p = "–" if c["p_value"] is None else f"{c['p_value']:.3g}"
        lines.append(
            f"| {c['metric']} | {c['init']} vs {c['reference']} | {c['mode']} | "
            f"{c['fraction'] * 100:g}% | {c['n']} | {md} | {ci} | {p} |"
        )
    path.write_text("\n".join(lines) + "\n")

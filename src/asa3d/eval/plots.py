"""Figures of an evaluation grid (matplotlib, Agg): label-efficiency curve (the paper's Fig. 4),
per-organ bars, and slice montages of the best and worst test case.

Saved at print resolution (``DPI``). Each chart also writes ``<name>.json`` beside its PNG with
what the drawn figure really has (axis scale, tick labels, whether the legend stays clear of the
bars), read back from the matplotlib objects; the report shows it and the tests check it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from asa3d.atomic import atomic_path, atomic_write_text  # noqa: E402
from asa3d.eval.metrics import nanmean  # noqa: E402

log = logging.getLogger(__name__)

DPI = 150  # print resolution


def _save(fig: Any, ax: Any, out_png: Path, legend: Any = None) -> Path:
    """Save at ``DPI`` (legend kept inside the image) and write the figure's facts beside it."""
    fig.canvas.draw()
    facts: dict[str, Any] = {
        "xscale": ax.get_xscale(),
        "yscale": ax.get_yscale(),
        "xticklabels": [tl.get_text() for tl in ax.get_xticklabels()],
        "xlabel": ax.get_xlabel(),
        "dpi": DPI,
    }
    if legend is not None:
        renderer = fig.canvas.get_renderer()
        lb, ab = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        facts["legend_outside_axes"] = bool(
            lb.x0 >= ab.x1 or lb.x1 <= ab.x0 or lb.y0 >= ab.y1 or lb.y1 <= ab.y0
        )
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_text(out_png.with_suffix(".json"), json.dumps(facts, indent=1))
    return out_png


def labelled_cases(results: Sequence[Mapping[str, Any]]) -> dict[float, int]:
    """Number of labelled training cases at each label fraction (the subsets are nested and the
    same size for every seed)."""
    out: dict[float, int] = {}
    for r in results:
        if r.get("train_ids") is not None:
            out[float(r["fraction"])] = len(r["train_ids"])
    return out


def label_efficiency(
    summary: Mapping[str, Any],
    out_png: Path,
    metric: str = "dice",
    n_cases: Mapping[float, int] | None = None,
) -> Path:
    """Mean metric (over classes) vs the number of labelled training cases, on a log axis, one
    line per (init, mode), sd band over seeds (none for a single seed)."""
    n_cases = dict(n_cases or {})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lines: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
    for e in summary["groups"]:
        a = e[metric]["avg"]
        std = a["std"] if a["std"] is not None else float("nan")
        lines.setdefault((e["init"], e["mode"]), []).append(
            (float(e["fraction"]), a["mean"], std, int(e.get("n_seeds", 1)))
        )
    fracs = sorted({p[0] for pts in lines.values() for p in pts})

    def xpos(f: float) -> float:  # labelled cases when known, else the percentage
        return float(n_cases.get(f, f * 100))

    for (init, mode), pts in lines.items():
        pts.sort()
        x = np.array([xpos(p[0]) for p in pts])
        m = np.array([np.nan if p[1] is None else p[1] for p in pts], dtype=float) * 100
        s = np.array([p[2] for p in pts], dtype=float) * 100
        style = "-" if mode == "finetune" else "--"
        (ln,) = ax.plot(x, m, style, marker="o", label=f"{init} ({mode})")
        if all(p[3] > 1 for p in pts):
            ax.fill_between(x, m - s, m + s, color=ln.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks([xpos(f) for f in fracs])
    ax.set_xticklabels([f"{n_cases[f]}\n({f * 100:g}%)" if f in n_cases else f"{f * 100:g}%" for f in fracs])
    ax.minorticks_off()
    ax.set_xlabel("labelled training cases (log scale)" if n_cases else "labelled fraction (log scale)")
    ax.set_ylabel(f"mean {metric} (%)")
    ax.grid(alpha=0.3)
    leg = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("Label efficiency")
    return _save(fig, ax, out_png, leg)


def per_organ_bars(summary: Mapping[str, Any], out_png: Path, metric: str = "dice") -> Path:
    """Per-class mean +- sd at the largest fraction, one bar per (init, mode)."""
    groups = summary["groups"]
    fmax = max(e["fraction"] for e in groups)
    sel = [e for e in groups if e["fraction"] == fmax]
    classes = list(sel[0][metric]["per_class"]) + ["Avg"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) * max(1, len(sel)) / 2), 4))
    width = 0.8 / len(sel)
    x = np.arange(len(classes))
    for i, e in enumerate(sel):
        vals = [e[metric]["per_class"][c] for c in classes[:-1]] + [e[metric]["avg"]]
        m = np.array([np.nan if v["mean"] is None else v["mean"] for v in vals], dtype=float) * 100
        s = np.array([0 if v["std"] is None else v["std"] for v in vals], dtype=float) * 100
        single = int(e.get("n_seeds", 1)) < 2  # no sd from one seed: no error bar
        ax.bar(
            x + i * width - 0.4 + width / 2,
            m,
            width,
            yerr=None if single else s,
            label=f"{e['init']} ({e['mode']})",
            capsize=2,
        )
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"Per class at {fmax * 100:g}% labels")
    leg = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, ax, out_png, leg)


def best_worst_montage(
    results: Sequence[Mapping[str, Any]], out_dir: Path, label_names: Mapping[int, str], test_index: Any
) -> list[Path]:
    """Prediction vs ground truth of the best and worst test case (mean Dice) of the first cell
    that kept its predictions (first seed, largest fraction; a non-scratch fine-tune if any)."""
    from asa3d.data.montage import MontageRow, render_rows

    kept = [r for r in results if r.get("predictions") and Path(r["predictions"]).is_dir()]
    if not kept or test_index is None:
        return []
    kept.sort(key=lambda r: (r["mode"] != "finetune", r["init"] == "scratch"))
    r = kept[0]
    scores = [(nanmean(list(row["dice"].values())), row["id"]) for row in r["per_case"]]
    scores = [s for s in scores if not np.isnan(s[0])]
    if not scores:
        return []
    scores.sort()
    cases = {c.id: c for c in test_index.cases}
    paths = []
    for tag, (score, cid) in (("best", scores[-1]), ("worst", scores[0])):
        pred_file = Path(r["predictions"]) / f"{cid}.npz"
        if cid not in cases or not pred_file.exists():
            continue
        case = cases[cid]
        img, gt = case.image(), case.label()
        pred = np.load(pred_file)["pred"]
        rows = [
            MontageRow(
                image=img, label=gt, spacing=case.spacing, title=f"{cid}: ground truth", center="label"
            ),
            MontageRow(
                image=img,
                label=pred,
                spacing=case.spacing,
                title=f"{cid}: {r['init']} {r['mode']} (Dice {score * 100:.1f}%)",
                center="label",
            ),
        ]
        # center "label" uses each row's own label; use the ground truth's centre for both rows
        c = _centroid(gt)
        for row in rows:
            row.center = c
        out = out_dir / f"montage_{tag}.png"
        render_rows(rows, out, window=None, label_names=label_names, suptitle=f"{tag} case: {cid}", dpi=DPI)
        paths.append(out)
    return paths


def _centroid(label: np.ndarray) -> tuple[int, int, int]:
    idx = np.argwhere(label > 0)
    if idx.size == 0:
        return tuple(int(s) // 2 for s in label.shape)  # type: ignore[return-value]
    return tuple(int(v) for v in idx.mean(0).round())  # type: ignore[return-value]


def make_all(
    summary: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    out: Path,
    label_names: Mapping[int, str],
    test_index: Any = None,
) -> list[Path]:
    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made = []
    n_cases = labelled_cases(results)
    for metric in summary["metrics"]:
        made.append(label_efficiency(summary, pdir / f"label_efficiency_{metric}.png", metric, n_cases))
        made.append(per_organ_bars(summary, pdir / f"per_class_{metric}.png", metric))
    try:
        made += best_worst_montage(results, pdir, label_names, test_index)
    except Exception as exc:  # a figure must never lose the numbers the grid computed
        log.warning("montage skipped: %s", exc)
    return made

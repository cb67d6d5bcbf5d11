"""``asa3d report RUN_DIR``: one self-contained static HTML page (PNG embedded as base64) for an
evaluation grid (``summary.json``) or a single fine-tune/probe run (``metrics.json``).
No external assets, no JavaScript: it opens offline and archives as one file.

Tables are built from the run's JSON (not re-parsed from its markdown files) as markdown and
rendered by the ``markdown`` package (tables extension). Every page opens with a provenance block:
asa3d version, git commit, config hash, data fingerprint, date and device, as the run recorded
them in ``provenance.json`` when it ended (``asa3d.provenance``; refreshed when the folder's
``config.yaml`` no longer matches the record).
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import markdown

from asa3d.atomic import atomic_path

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px;display:block;overflow-x:auto}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#eee;white-space:normal}td:first-child,th:first-child{text-align:left}
.kv td{text-align:left}td.note{text-align:left;white-space:normal;color:#8a4b00}
.provenance table{font-size:12px}.provenance td,.provenance th{text-align:left}
.caption{color:#555;font-size:13px}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}code{background:#f4f4f4;padding:1px 3px}"""

MIN_PAIRS = 6  # test cases; below this a two-sided Wilcoxon signed-rank test cannot reach p < 0.05
SMALL_N_NOTE = (
    f"fewer than {MIN_PAIRS} test cases: the Wilcoxon test cannot reach p < 0.05 at this n; "
    "read the difference as descriptive"
)


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def md_to_html(md: str) -> str:
    """Markdown (pipe tables, emphasis, paragraphs) -> HTML with the ``markdown`` package; raw
    HTML in the input is escaped first (run names and paths come from users)."""
    return markdown.markdown(html.escape(md, quote=False), extensions=["tables"], output_format="html")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown pipe table (``|`` inside cells escaped)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def mean_sd(ms: Mapping[str, Any] | None, scale: float, n_seeds: int) -> str:
    """``mean ± sd`` over seeds; a single seed has no sd: ``n/a`` (never ``± 0.00``)."""
    if not ms or ms.get("mean") is None or ms["mean"] != ms["mean"]:
        return "–"
    m = f"{float(ms['mean']) * scale:.2f}"
    if n_seeds < 2 or ms.get("std") is None:
        return f"{m} ± n/a"
    return f"{m} ± {float(ms['std']) * scale:.2f}"


def _num(v: Any, scale: float) -> str:
    if v is None or v != v:
        return "–"
    return f"{float(v) * scale:.2f}"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    facts_file = path.with_suffix(".json")
    attrs = ""
    if facts_file.is_file():  # what the drawn figure has (plots.py reads it off the axes)
        facts = json.loads(facts_file.read_text())
        attrs = "".join(
            f' data-{k.replace("_", "-")}="{html.escape(str(facts[k]).lower())}"'
            for k in ("xscale", "dpi", "legend_outside_axes")
            if k in facts
        )
        if facts.get("xscale") == "log":
            caption += " The x axis is logarithmic."
    return (
        f'<figure{attrs}><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"/>'
        f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>'
    )


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------
def provenance(run: Path) -> dict[str, str]:
    """The run's provenance (``asa3d.provenance``): recorded at the end of the run, recorded anew
    (and marked so) when missing or made for another ``config.yaml``."""
    from asa3d import provenance as prov

    return prov.read(run)


def _provenance_html(doc: Mapping[str, str]) -> str:
    rows = [[k, v] for k, v in doc.items()]
    return (
        '<section class="provenance" id="provenance"><h2>Provenance</h2>'
        + md_to_html(md_table(["record", "value"], rows))
        + "</section>"
    )


# --------------------------------------------------------------------------------------------
# grid report
# --------------------------------------------------------------------------------------------
def _labelled_cases(run: Path) -> dict[float, int]:
    sub = run / "subsets.json"
    if not sub.is_file():
        return {}
    doc = json.loads(sub.read_text())
    first = next(iter(doc.values()), {})
    return {float(f): len(ids) for f, ids in first.items()}


def _frac_label(f: float, n_cases: Mapping[float, int]) -> str:
    if f not in n_cases:
        return f"{f * 100:g}%"
    n = n_cases[f]
    return f"{f * 100:g}% ({n} case{'' if n == 1 else 's'})"


def grid_tables(summary: Mapping[str, Any], n_cases: Mapping[float, int]) -> str:
    parts = []
    groups = summary.get("groups", [])
    for metric in summary.get("metrics", []):
        if not groups:
            continue
        scale = 100.0 if metric in ("dice", "nsd") else 1.0
        unit = "%" if scale == 100.0 else "mm"
        classes = list(groups[0][metric]["per_class"])
        rows = []
        for e in groups:
            n = int(e.get("n_seeds", 1))
            cells = [mean_sd(e[metric]["per_class"][c], scale, n) for c in classes]
            rows.append(
                [e["init"], e["mode"], _frac_label(float(e["fraction"]), n_cases), n, *cells]
                + [f"**{mean_sd(e[metric]['avg'], scale, n)}**"]
            )
        parts.append(
            f"<h2>{html.escape(metric.upper() if metric != 'dice' else 'Dice')} per class ({unit})</h2>"
            f'<p class="caption">Mean ± sd over seeds of the per-seed mean over test cases; '
            "“n/a”: a single seed, no spread to report. Avg: mean over the foreground classes.</p>"
            + md_to_html(md_table(["init", "mode", "labelled", "seeds", *classes, "Avg"], rows))
        )
    if groups and "dice_btcv12" in groups[0]:
        cols = list(groups[0]["dice_btcv12"])
        rows = [
            [e["init"], e["mode"], _frac_label(float(e["fraction"]), n_cases)]
            + [mean_sd(e["dice_btcv12"][c], 100.0, int(e.get("n_seeds", 1))) for c in cols]
            for e in groups
        ]
        parts.append(
            "<h2>BTCV Dice (%) in the ASA paper's 12 columns</h2>"
            '<p class="caption">AG is the mean of the two adrenal glands, as in the paper.</p>'
            + md_to_html(md_table(["init", "mode", "labelled", *cols], rows))
        )
    return "\n".join(parts)


def stats_table(stats: Mapping[str, Any], n_cases: Mapping[float, int]) -> str:
    rows = []
    for c in stats.get("comparisons", []):
        md = "–" if c.get("mean_diff") is None else f"{c['mean_diff']:+.4f}"
        ci = c.get("ci95") or [None, None]
        ci_s = "–" if ci[0] is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
        p = "–" if c.get("p_value") is None else f"{c['p_value']:.3g}"
        p_holm = "–" if c.get("p_holm") is None else f"{c['p_holm']:.3g}"
        sd = "–" if c.get("seed_sd") is None else f"{c['seed_sd']:.4f}"
        note = SMALL_N_NOTE if int(c.get("n", 0)) < MIN_PAIRS else ""
        rows.append(
            [
                c["metric"],
                f"{c['init']} vs {c['reference']}",
                c["mode"],
                _frac_label(float(c["fraction"]), n_cases),
                c["n"],
                c.get("n_seeds", "–"),
                md,
                ci_s,
                sd,
                p,
                p_holm,
                note,
            ]
        )
    body = md_to_html(
        md_table(
            [
                "metric",
                "comparison",
                "mode",
                "labelled",
                "cases",
                "seeds",
                "mean diff",
                "95% CI",
                "seed sd",
                "p",
                "p (Holm)",
                "note",
            ],
            rows,
        )
    )
    # the caveat column reads as a note, not as a number
    body = body.replace(
        f"<td>{html.escape(SMALL_N_NOTE, quote=False)}</td>", f'<td class="note">{SMALL_N_NOTE}</td>'
    )
    return (
        f'<h2>Paired statistics</h2><p class="caption">{html.escape(str(stats.get("test", "")))}.</p>' + body
    )


UNTRAINED_NOTE = (
    "Untrained parts: parts of the network the source's pretraining method never trained (their "
    "weights are random however well they load); a probe that froze them would measure random features."
)


def transfer_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """What each initialisation loaded (``transfer.json`` summaries), untrained parts included."""
    body = [
        [
            name,
            t.get("source", "–"),
            t.get("kind", "–"),
            t.get("n_matched", "–"),
            t.get("n_missing", "–"),
            t.get("n_unexpected", "–"),
            f"{t.get('expected_matched', '–')}/{t.get('expected', '–')}",
            ", ".join(t.get("untrained_parts") or []) or "none",
        ]
        for name, t in rows
    ]
    header = [
        "init",
        "source",
        "kind",
        "matched",
        "missing",
        "unexpected",
        "expected matched",
        "untrained parts",
    ]
    return (
        "<h2>Weight transfer</h2>"
        + md_to_html(md_table(header, body))
        + f'<p class="caption">{html.escape(UNTRAINED_NOTE)}</p>'
    )


FIGURE_CAPTIONS = {
    "label_efficiency": "Label efficiency: mean {metric} over the foreground classes against the "
    "number of labelled training cases; solid lines fine-tuning, dashed probing, bands ± sd over seeds.",
    "per_class": "{metric} per class at the largest label fraction (± sd over seeds).",
    "montage_best": "Best test case of the first kept cell: ground truth (top) and prediction (bottom).",
    "montage_worst": "Worst test case of the first kept cell: ground truth (top) and prediction (bottom).",
    "loss": "Training loss per logged iteration.",
}


def _caption(png: Path) -> str:
    stem = png.stem
    for key, text in FIGURE_CAPTIONS.items():
        if stem == key or stem.startswith(key + "_"):
            metric = stem[len(key) + 1 :] or "dice"
            return text.format(metric=metric.upper() if metric != "dice" else "Dice")
    return stem.replace("_", " ")


# --------------------------------------------------------------------------------------------
# single-run report
# --------------------------------------------------------------------------------------------
def _run_plots(run: Path) -> list[Path]:
    """Loss curve of a single run (made here so a plain finetune dir also gets a figure)."""
    log_csv = run / "train_log.csv"
    if not log_csv.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from asa3d.eval.plots import DPI

    with open(log_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([int(r["iteration"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run / "plots" / "loss.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    return [out]


def _run_table(doc: Mapping[str, Any]) -> str:
    parts = []
    split = f"'{doc['test_split']}'" if doc.get("test_split") else "(test)"
    for metric, s in doc.get("summary", {}).items():
        classes = list(s["per_class"])
        scale = 100.0 if metric in ("dice", "nsd") else 1.0
        rows = []
        for row in doc.get("per_case", []):
            vals = [row[metric][c] for c in classes]
            good = [v for v in vals if v is not None]
            mean = sum(good) / len(good) if good else None
            rows.append([row["id"], *(_num(v, scale) for v in vals), _num(mean, scale)])
        rows.append(["**mean**", *(_num(s["per_class"][c], scale) for c in classes), _num(s["mean"], scale)])
        name = metric.upper() if metric != "dice" else "Dice"
        parts.append(
            f"<h2>{name} on the held-out split {html.escape(split)} ({'%' if scale == 100 else 'mm'})</h2>"
            + md_to_html(md_table(["case", *classes, "mean"], rows))
        )
    return "\n".join(parts)


def _transfer_html(t: Mapping[str, Any]) -> str:
    """A scratch init (nothing loaded), in one sentence."""
    return "<p>None: the model starts from MONAI's random initialisation (init scratch).</p>"


def build_report(run_dir: str | Path, out_html: str | Path | None = None) -> Path:
    """Write ``report.html`` in ``run_dir`` (or ``out_html``) and return its path."""
    from asa3d.atomic import atomic_write_text

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run directory")
    prov = provenance(run)
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
        n_cases = _labelled_cases(run)
        g = summary.get("grid", {})
        parts = [
            "<h1>asa3d evaluation report</h1>",
            f"<p>Run folder <code>{html.escape(str(run.resolve()))}</code>.</p>",
            _provenance_html(prov),
            "<h2>Grid</h2>",
            md_to_html(
                md_table(
                    ["setting", "value"],
                    [
                        ["initialisations", ", ".join(str(i.get("name")) for i in g.get("inits", []))],
                        ["modes", ", ".join(g.get("modes", []))],
                        [
                            "labelled",
                            ", ".join(_frac_label(float(f), n_cases) for f in g.get("fractions", [])),
                        ],
                        ["seeds", ", ".join(str(s) for s in g.get("seeds", []))],
                        ["reference", str(g.get("reference"))],
                    ],
                )
            ),
            grid_tables(summary, n_cases),
        ]
        if (run / "stats.json").exists():
            parts.append(stats_table(json.loads((run / "stats.json").read_text()), n_cases))
        if summary.get("transfer"):
            parts.append(transfer_table(list(summary["transfer"].items())))
        pngs = sorted((run / "plots").glob("*.png")) if (run / "plots").is_dir() else []
    elif (run / "metrics.json").exists():
        doc = json.loads((run / "metrics.json").read_text())
        parts = [
            f"<h1>asa3d {html.escape(str(doc.get('mode', 'run')))} report</h1>",
            f"<p>Run folder <code>{html.escape(str(run.resolve()))}</code>.</p>",
            _provenance_html(prov),
            "<h2>Run</h2>",
            md_to_html(
                md_table(
                    ["setting", "value"],
                    [
                        ["mode", doc.get("mode")],
                        ["init", doc.get("init")],
                        ["iterations", doc.get("iterations")],
                        ["training cases", doc.get("train_cases")],
                        ["model selected", doc.get("selected")],
                        [
                            "loss (first → last)",
                            f"{doc.get('loss_first', 0):.4f} → {doc.get('loss_last', 0):.4f}",
                        ],
                    ],
                )
            ),
            _run_table(doc),
        ]
        if (run / "transfer.json").exists():
            t = json.loads((run / "transfer.json").read_text())
            if t.get("kind") == "scratch":  # nothing loaded: one sentence, not a table of zeros
                parts.append("<h2>Weight transfer</h2>" + _transfer_html(t))
            else:
                parts.append(transfer_table([(str(doc.get("init", t["source"])), t)]))
        pngs = _run_plots(run)
    else:
        raise FileNotFoundError(f"{run}: neither summary.json (evaluate) nor metrics.json (finetune/probe)")
    if pngs:
        parts.append("<h2>Figures</h2>" + "\n".join(_img(p, _caption(p)) for p in pngs))
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>asa3d report</title>"
        f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    out = Path(out_html) if out_html else run / "report.html"
    atomic_write_text(out, page)
    return out

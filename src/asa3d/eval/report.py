"""``asa3d report RUN_DIR``: one self-contained static HTML page (PNG embedded as base64, tables as
HTML) for an evaluation grid (``summary.json``) or a single fine-tune/probe run (``metrics.json``).
No external assets, no JavaScript: it opens offline and archives as one file."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px;display:block;overflow-x:auto}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#eee;white-space:normal}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}code{background:#f4f4f4;padding:1px 3px}"""


def md_table_to_html(md: str) -> str:
    """Our own pipe-table converter (the tables are ours, a markdown dependency is not needed):
    '### ' lines become headings, '|'-rows become a table, the separator row is skipped."""
    out, rows = [], []

    def flush() -> None:
        if rows:
            head, *body = rows
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
            )
            for r in body:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
            out.append("</tbody></table>")
            rows.clear()

    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            rows.append(cells)
            continue
        flush()
        if s.startswith("#"):
            level = min(4, len(s) - len(s.lstrip("#")) + 1)
            out.append(f"<h{level}>{html.escape(s.lstrip('#').strip())}</h{level}>")
        elif s:
            out.append(f"<p>{html.escape(s)}</p>")
    flush()
    return "\n".join(out)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"/>'
        f"<figcaption>{html.escape(path.name)}</figcaption></figure>"
    )


def _run_plots(run: Path) -> list[Path]:
    """Loss curve of a single run (made here so a plain finetune dir also gets a figure)."""
    log_csv = run / "train_log.csv"
    if not log_csv.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([int(r["iteration"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    (run / "plots").mkdir(exist_ok=True)
    out = run / "plots" / "loss.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return [out]


def _run_table(doc: dict[str, Any]) -> str:
    lines = []
    for metric, s in doc.get("summary", {}).items():
        classes = list(s["per_class"])
        scale = 100.0 if metric in ("dice", "nsd") else 1.0
        lines.append(f"### {metric} on the test split ({'%' if scale == 100 else 'mm'})")
        lines.append("| case | " + " | ".join(classes) + " | mean |")
        lines.append("|" + "---|" * (len(classes) + 2))
        for row in doc.get("per_case", []):
            vals = [row[metric][c] for c in classes]
            good = [v for v in vals if v is not None]
            mean = sum(good) / len(good) if good else None
            lines.append(
                f"| {row['id']} | " + " | ".join(_num(v, scale) for v in vals) + f" | {_num(mean, scale)} |"
            )
        pc = [s["per_class"][c] for c in classes]
        lines.append(
            "| **mean** | " + " | ".join(_num(v, scale) for v in pc) + f" | {_num(s['mean'], scale)} |"
        )
        lines.append("")
    return md_table_to_html("\n".join(lines))


def _num(v: Any, scale: float) -> str:
    if v is None or v != v:
        return "–"
    return f"{float(v) * scale:.2f}"


def build_report(run_dir: str | Path, out_html: str | Path | None = None) -> Path:
    """Write ``report.html`` in ``run_dir`` (or ``out_html``) and return its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run directory")
    parts = [f"<h1>asa3d report: {html.escape(run.name)}</h1>"]
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
        g = summary.get("grid", {})
        parts.append(
            f"<p>Grid: inits {[i.get('name') for i in g.get('inits', [])]}, modes {g.get('modes')}, "
            f"fractions {g.get('fractions')}, seeds {g.get('seeds')}. Dice per foreground class "
            "on the resampled grid, mean ± sd over seeds (see docs/evaluation.md).</p>"
        )
        for name in ("table.md", "table_btcv12.md"):
            if (run / name).exists():
                parts.append(f"<h2>{name}</h2>" + md_table_to_html((run / name).read_text()))
        if (run / "stats.md").exists():
            parts.append("<h2>Paired statistics</h2>" + md_table_to_html((run / "stats.md").read_text()))
        pngs = sorted((run / "plots").glob("*.png")) if (run / "plots").is_dir() else []
    elif (run / "metrics.json").exists():
        doc = json.loads((run / "metrics.json").read_text())
        parts.append(
            f"<p>mode <code>{html.escape(str(doc.get('mode')))}</code>, init "
            f"<code>{html.escape(str(doc.get('init')))}</code>, {doc.get('iterations')} iterations on "
            f"{doc.get('train_cases')} cases, selected: {html.escape(str(doc.get('selected')))}; "
            f"loss {doc.get('loss_first', 0):.4f} → {doc.get('loss_last', 0):.4f}.</p>"
        )
        parts.append(_run_table(doc))
        if (run / "transfer.json").exists():
            t = json.loads((run / "transfer.json").read_text())
            parts.append(
                "<h2>Weight transfer</h2>"
                + md_table_to_html(
                    "| source | kind | matched | missing | unexpected | expected matched |\n"
                    "|---|---|---|---|---|---|\n"
                    f"| {t['source']} | {t['kind']} | {t['n_matched']} | {t['n_missing']} | "
                    f"{t['n_unexpected']} | {t['expected_matched']}/{t['expected']} |"
                )
            )
        pngs = _run_plots(run)
    else:
        raise FileNotFoundError(f"{run}: neither summary.json (evaluate) nor metrics.json (finetune/probe)")
    if pngs:
        parts.append("<h2>Figures</h2>" + "\n".join(_img(p) for p in pngs))
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>asa3d report</title>"
        f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    out = Path(out_html) if out_html else run / "report.html"
    out.write_text(page, encoding="utf-8")
    return out

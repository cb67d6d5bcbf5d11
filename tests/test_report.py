"""The report as a researcher reads it: provenance, log-scale label-efficiency axis with case
counts, n/a for one seed, small-n caveats, legends clear of the bars, print resolution, real
table rendering; rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asa3d.config_sections import DataConfig, ModelConfig, PreprocessConfig
from asa3d.eval.config_sections import (
    EvaluateConfig,
    FinetuneTrainConfig,
    GridConfig,
    InferenceConfig,
    InitSpec,
)
from asa3d.eval.report import SMALL_N_NOTE, build_report, md_to_html, mean_sd
from chromium_dom import chromium_dom, chromium_screenshot

PROVENANCE_KEYS = ("asa3d version", "git commit", "config hash", "data fingerprint", "date", "device")


def fake_runner(cfg, run_dir, ids, train_index, test_index, progress=None):  # noqa: ANN001, ANN201
    """Stands in for run_finetune: Dice grows with the labelled cases, deterministic per cell."""
    rng = np.random.default_rng([len(ids), cfg.train.seed, cfg.init.source != "scratch"])
    names = [v for k, v in sorted(test_index.label_names.items()) if k > 0]
    base = 0.4 + 0.1 * np.log2(len(ids) + 1)
    rows = [
        {"id": c.id, "dice": {n: float(np.clip(base + rng.normal(0, 0.05), 0, 1)) for n in names}}
        for c in test_index.cases
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    return {"per_case": rows, "summary": {}, "loss_first": 1.0, "loss_last": 0.5, "seconds": 0.0}


@pytest.fixture(scope="module")
def grid_dir(phantom_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from asa3d.eval.evaluate import run_grid

    out = tmp_path_factory.mktemp("report") / "grid"
    other = out.parent / "other.pt"  # the fake runner never reads it; the grid fingerprints its bytes
    other.write_bytes(b"other weights")
    cfg = EvaluateConfig(
        model=ModelConfig(feature_size=12, drop_path_rate=0.0),
        data=DataConfig(
            root=str(phantom_dataset), num_workers=0, preprocess=PreprocessConfig(spacing=(12.0, 12.0, 6.0))
        ),
        train=FinetuneTrainConfig(iterations=2, crop_size=(32, 32, 64), log_every=0),
        eval=InferenceConfig(split="validation", overlap=0.25),
        grid=GridConfig(
            inits=[InitSpec("scratch"), InitSpec("other", source=str(other))],
            modes=["finetune"],
            fractions=[0.25, 0.5, 1.0],
            seeds=[0],  # one seed: no sd to show
            n_boot=200,
        ),
    )
    run_grid(cfg, out, runner=fake_runner)
    return out


def test_label_efficiency_axis_is_log_with_case_counts(grid_dir: Path) -> None:
    facts = json.loads((grid_dir / "plots" / "label_efficiency_dice.json").read_text())
    assert facts["xscale"] == "log"  # read off the drawn axes by plots.py
    assert facts["xticklabels"] == ["1\n(25%)", "2\n(50%)", "4\n(100%)"]  # 4 training phantoms
    assert "labelled training cases" in facts["xlabel"]
    bars = json.loads((grid_dir / "plots" / "per_class_dice.json").read_text())
    assert bars["legend_outside_axes"] is True
    for png in (grid_dir / "plots").glob("*.png"):
        dpi = Image.open(png).info["dpi"]
        assert min(dpi) >= 149, (png.name, dpi)


def test_report_html_content(grid_dir: Path) -> None:
    page = (grid_dir / "report.html").read_text()
    assert 'id="provenance"' in page
    for key in PROVENANCE_KEYS:
        assert f"<td>{key}</td>" in page, key
    prov = json.loads((grid_dir / "provenance.json").read_text())
    assert prov["config hash"].startswith("sha256 ") and "dataset.json" in prov["data fingerprint"]
    assert "± 0.00" not in page and "± n/a" in page
    assert SMALL_N_NOTE in page  # 2 test cases per comparison
    assert "<th>p (Holm)</th>" in page and "<th>seed sd</th>" in page
    assert "**" not in page and "<table>" in page and "<strong>" in page
    assert not re.search(r"<h\d>[^<]*\.(md|json|png|csv)\s*</h\d>", page), "a file name as a heading"
    assert 'data-xscale="log"' in page


def test_mean_sd_and_renderer() -> None:
    assert mean_sd({"mean": 0.8123, "std": 0.0}, 100, n_seeds=1) == "81.23 ± n/a"
    assert mean_sd({"mean": 0.8123, "std": 0.01}, 100, n_seeds=3) == "81.23 ± 1.00"
    assert mean_sd({"mean": None, "std": None}, 100, n_seeds=3) == "–"
    out = md_to_html("| a | b |\n|---|---|\n| **mean** | <script>x</script> |\n")
    assert "<strong>mean</strong>" in out and "<script>" not in out and "<td>" in out


def test_single_run_report(tmp_path: Path) -> None:
    run = tmp_path / "ft"
    run.mkdir()
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "mode": "finetune",
                "init": "scratch",
                "iterations": 3,
                "train_cases": 2,
                "selected": "final",
                "loss_first": 1.0,
                "loss_last": 0.5,
                "summary": {"dice": {"per_class": {"liver": 0.5}, "mean": 0.5}},
                "per_case": [{"id": "c1", "dice": {"liver": 0.5}}],
            }
        )
    )
    (run / "train_log.csv").write_text("iteration,loss\n1,1.0\n2,0.7\n3,0.5\n")
    page = build_report(run).read_text()
    assert 'id="provenance"' in page and "<strong>mean</strong>" in page and "**" not in page
    assert min(Image.open(run / "plots" / "loss.png").info["dpi"]) >= 149


def test_report_renders_in_headless_chromium(grid_dir: Path, tmp_path: Path) -> None:
    html = grid_dir / "report.html"
    text = chromium_dom(html, tmp_path)
    assert 'id="provenance"' in text and all(k in text for k in PROVENANCE_KEYS)
    assert 'data-xscale="log"' in text and text.count('src="data:image/png;base64,') >= 2
    assert text.count("<table") >= 4  # provenance, grid, Dice, statistics
    shot = chromium_screenshot(html, tmp_path, "1280,2400")
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=float) / 255
    assert px.shape[0] > 100 and px.std() > 0.05  # not blank
    keep = os.environ.get("ASA3D_KEEP_REPORT_SCREENSHOT")
    if keep:  # a copy for a person to look at
        shutil.copyfile(shot, keep)


def test_single_run_report_as_a_new_user_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-out split is named, a scratch init is one sentence (not a table of zeros), and the
    loss curve's iteration ticks are whole numbers (20 iterations once gave 2.5, 7.5, ...)."""
    import matplotlib.figure

    run = tmp_path / "ft"
    run.mkdir()
    doc = {
        "mode": "finetune",
        "init": "scratch",
        "iterations": 20,
        "train_cases": 9,
        "selected": "final",
        "loss_first": 0.6,
        "loss_last": 0.55,
        "test_split": "validation",
        "summary": {"dice": {"per_class": {"tumour": 0.3}, "mean": 0.3}},
        "per_case": [{"id": "STS_002", "dice": {"tumour": 0.3}}],
    }
    (run / "metrics.json").write_text(json.dumps(doc))
    scratch = {"source": "scratch", "kind": "scratch", "n_matched": 0, "n_missing": 159, "n_unexpected": 0}
    (run / "transfer.json").write_text(json.dumps({**scratch, "expected": 0, "expected_matched": 0}))
    (run / "train_log.csv").write_text(
        "iteration,loss\n" + "".join(f"{i},{1 - i / 40}\n" for i in range(1, 21))
    )
    ticks: list[float] = []
    real = matplotlib.figure.Figure.savefig

    def record(fig, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        lo, hi = fig.axes[0].get_xlim()
        ticks.extend(t for t in fig.axes[0].get_xticks() if lo <= t <= hi)
        return real(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    page = build_report(run).read_text()
    assert "held-out split &#x27;validation&#x27;" in page or "held-out split 'validation'" in page
    assert "random initialisation" in page and "0/0" not in page
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks

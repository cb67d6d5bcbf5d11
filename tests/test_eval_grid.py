"""The evaluation grid: resume after a crash, and a tiny end-to-end grid producing every output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asa3d.config_sections import DataConfig, ModelConfig, PreprocessConfig
from asa3d.eval.evaluate import EvaluateConfig, GridConfig, InitSpec, run_grid
from asa3d.eval.finetune import FinetuneTrainConfig, InferenceConfig
from chromium_dom import chromium_dom, chromium_screenshot


def grid_cfg(root: Path, inits: list[InitSpec], **grid) -> EvaluateConfig:
    g = dict(inits=inits, modes=["finetune", "probe"], fractions=[0.5, 1.0], seeds=[0, 1], n_boot=500)
    g.update(grid)
    return EvaluateConfig(
        model=ModelConfig(feature_size=12, drop_path_rate=0.0),
        data=DataConfig(
            root=str(root), num_workers=0, preprocess=PreprocessConfig(spacing=(12.0, 12.0, 6.0))
        ),
        train=FinetuneTrainConfig(iterations=2, crop_size=(32, 32, 64), lr=3e-3, log_every=0),
        eval=InferenceConfig(split="validation", overlap=0.25),
        grid=GridConfig(**g),
    )


class FakeRunner:
    """Stands in for run_finetune: deterministic per-case Dice, counts its calls, can crash."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.crash_at = crash_at

    def __call__(self, cfg, run_dir, ids, train_index, test_index, progress=None):
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append((cfg.init.source, cfg.train.seed, len(ids)))
        rng = np.random.default_rng([len(self.calls)])
        names = [v for k, v in sorted(test_index.label_names.items()) if k > 0]
        rows = [
            {"id": c.id, "dice": {n: float(rng.uniform(0.5, 0.9)) for n in names}} for c in test_index.cases
        ]
        run_dir.mkdir(parents=True, exist_ok=True)
        return {"per_case": rows, "summary": {}, "loss_first": 1.0, "loss_last": 0.5, "seconds": 0.0}


def test_grid_resumes_without_recomputing_finished_cells(phantom_dataset, tmp_path):
    cfg = grid_cfg(phantom_dataset, [InitSpec("scratch"), InitSpec("other", source="scratch")])
    cfg.grid.plots = cfg.grid.report = False
    crash = FakeRunner(crash_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_grid(cfg, tmp_path, runner=crash)
    done = sorted((tmp_path / "cells").glob("*/result.json"))
    assert len(done) == 5
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    again = FakeRunner()
    summary = run_grid(cfg, tmp_path, runner=again)
    assert len(again.calls) == 16 - 5
    assert summary["cells_resumed"] == 5 and summary["cells_run"] == 11
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    third = FakeRunner()
    run_grid(cfg, tmp_path, runner=third)
    assert third.calls == []
    subsets = json.loads((tmp_path / "subsets.json").read_text())
    assert len(subsets["0"]["0.5"]) == 2 and subsets["0"]["1"][:2] == subsets["0"]["0.5"]


def test_grid_refuses_to_reuse_cells_run_with_another_config(phantom_dataset, tmp_path):
    from asa3d.config import ConfigError

    cfg = grid_cfg(phantom_dataset, [InitSpec("scratch")], modes=["finetune"], fractions=[1.0], seeds=[0])
    cfg.grid.plots = cfg.grid.report = False
    run_grid(cfg, tmp_path, runner=FakeRunner())
    cfg.train.iterations = 5  # same --out, other settings: the old result must not be passed off
    with pytest.raises(ConfigError, match="another configuration"):
        run_grid(cfg, tmp_path, runner=FakeRunner())


def test_tiny_grid_end_to_end_with_report(phantom_dataset, tmp_path):
    torch.manual_seed(5)  # an "ASA-like" init: another network's weights, backbone without out.*
    from asa3d.eval.transfer import build_model

    other = build_model(ModelConfig(feature_size=12).swinunetr_kwargs(1))
    torch.save({k: v for k, v in other.state_dict().items() if not k.startswith("out.")}, tmp_path / "asa.pt")
    cfg = grid_cfg(phantom_dataset, [InitSpec("scratch"), InitSpec("asa", source=str(tmp_path / "asa.pt"))])
    out = tmp_path / "grid"
    summary = run_grid(cfg, out)
    for name in (
        "config.yaml",
        "subsets.json",
        "per_case.csv",
        "per_case.json",
        "summary.json",
        "table.md",
        "stats.json",
        "stats.md",
        "report.html",
        "plots/label_efficiency_dice.png",
        "plots/per_class_dice.png",
        "plots/montage_best.png",
        "plots/montage_worst.png",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "cells").glob("*/result.json"))) == 16
    assert not list((out / "cells").glob("*/run/model_final.pt"))  # dropped unless grid.keep_models
    table = (out / "table.md").read_text().splitlines()
    rows = [
        r
        for r in table
        if r.startswith(("| scratch | finetune", "| scratch | probe", "| asa | f", "| asa | p"))
    ]
    assert len(rows) == 8 and "Avg" in table[2]
    assert "| asa | state-dict | 126/126 | none |" in table  # weight transfer: nothing untrained
    stats = json.loads((out / "stats.json").read_text())["comparisons"]
    assert len(stats) == 4 and all(
        c["n"] == 2 and c["n_seeds"] == 2 for c in stats
    )  # 2 test cases, each averaged over 2 seeds
    assert all(c["p_holm"] >= c["p_value"] for c in stats)  # Holm over the 4 comparisons
    res = json.loads(next((out / "cells").glob("asa__finetune__f100__s0/result.json")).read_text())
    assert res["transfer"]["n_matched"] == 157  # all 159 keys but out.*
    assert res["transfer"]["expected_matched"] == res["transfer"]["expected"] == 126  # swinViT only
    assert summary["groups"][0]["dice"]["avg"]["mean"] is not None
    # CSV: one line per (init, mode, fraction, seed, case, class)
    assert len((out / "per_case.csv").read_text().splitlines()) == 1 + 16 * 2 * 13
    _render_in_chromium(out / "report.html", tmp_path)


def _render_in_chromium(html: Path, tmp_path: Path) -> None:
    dom = chromium_dom(html, tmp_path)
    assert dom.count("<table") >= 2 and dom.count('src="data:image/png;base64,') >= 4
    assert "scratch" in dom and "Avg" in dom
    shot = chromium_screenshot(html, tmp_path, "1200,2000")
    import matplotlib.image as mpimg

    px = mpimg.imread(str(shot))
    assert px.shape[0] > 100 and px[..., :3].std() > 0.05  # not blank

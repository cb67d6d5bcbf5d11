"""``finetune``/``probe --overwrite`` replace a finished run so that nothing of the old run can
pass for the new one, even when the replacement dies; every run records its provenance when it
ends, and a report never shows a record made for another config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_finetune_resume import tiny_overrides

OUTPUTS = ("metrics.json", "model_final.pt", "model.json", "train_log.csv", "provenance.json")


def _loss_steps(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss/train" in r]


@pytest.mark.slow  # three real fine-tuning runs (2, 1 and 1 iterations): the death must be mid-training
def test_overwrite_of_a_finished_run_that_dies_leaves_nothing_of_the_old_run(
    phantom_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asa3d.eval.finetune as ft
    from asa3d import provenance
    from asa3d.cli import main

    out = tmp_path / "ft"
    args = ["finetune", "--config", "finetune/phantom_tiny.yaml", "--out", str(out)]
    old = tiny_overrides(phantom_dataset, "train.iterations=2")  # eval.split=null: no scoring
    assert main([*args, *old]) == 0
    assert all((out / n).is_file() for n in OUTPUTS) and _loss_steps(out) == [1, 2]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config hash"] == provenance.config_hash(out) and prov["recorded"] == "at the end of the run"
    assert len(list((out / "tb").iterdir())) == 1
    assert main([*args, *old]) == 2  # a finished run is never replaced without --overwrite

    real, calls = ft.draw_augment, []

    def dies_at_the_second_step(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the replacement was killed")
        return real(*a, **k)

    monkeypatch.setattr(ft, "draw_augment", dies_at_the_second_step)
    new = [*old, "train.lr=0.001"]
    with pytest.raises(RuntimeError, match="killed"):
        main([*args, "--overwrite", *new])
    # nothing of the old run survives, and nothing says "finished"
    assert [n for n in OUTPUTS if (out / n).exists()] == []
    assert _loss_steps(out) == [1]  # the new run's log only, not appended to the old one's
    assert len(list((out / "tb").iterdir())) == 1  # one event file: the new run's
    assert "lr: 0.001" in (out / "config.yaml").read_text()
    # what is left is an unfinished run of the new config: the same command resumes it
    monkeypatch.setattr(ft, "draw_augment", real)
    assert main([*args, *new]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["iterations"] == 2 and _loss_steps(out) == [1, 2]
    assert json.loads((out / "provenance.json").read_text())["config hash"] == provenance.config_hash(out)


def test_report_records_provenance_anew_when_config_changed(tmp_path: Path) -> None:
    from asa3d import provenance
    from asa3d.eval.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  lr: 0.1\n")
    (run / "metrics.json").write_text(json.dumps({"mode": "finetune", "init": "scratch"}))
    first = provenance.record(run)
    assert first["recorded"] == "at the end of the run"
    assert provenance.read(run) == first  # the run's own record, as it was
    (run / "config.yaml").write_text("train:\n  lr: 0.2\n")  # a rerun began and did not finish
    page = build_report(run).read_text()
    again = json.loads((run / "provenance.json").read_text())
    assert again["config hash"] == provenance.config_hash(run) != first["config hash"]
    assert again["recorded"].startswith("by the report: config.yaml changed")
    assert again["config hash"] in page and first["config hash"] not in page
    (run / "provenance.json").unlink()
    assert provenance.read(run)["recorded"] == "by the report: the run recorded none"


def test_a_fresh_start_clears_only_run_outputs_and_never_a_pretraining_run(tmp_path: Path) -> None:
    from asa3d.config import ConfigError
    from asa3d.eval.finetune import clear_run_outputs

    run = tmp_path / "ft"
    (run / "tb").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / "notes.txt").write_text("the user's own file")
    (run / ".model_final.pt.abc.tmp").write_text("a killed write")
    assert sorted(clear_run_outputs(run)) == ["metrics.json", "tb"]
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    pre = tmp_path / "pretrain"
    pre.mkdir()
    (pre / "ckpt_r0000_i00000004.pt").write_bytes(b"")
    (pre / "config.yaml").write_text("method: {name: asa}\n")
    with pytest.raises(ConfigError, match="holds a pretraining run"):
        clear_run_outputs(pre)
    assert (pre / "config.yaml").is_file()

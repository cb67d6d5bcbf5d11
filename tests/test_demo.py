"""`asa3d demo`: every stage of the README's main command, at the smallest size that still trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from asa3d.cli import main

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--n",
        "3",
        "--n-validation",
        "1",
        "--finetune-iterations",
        "6",
        "--pretrain",
        "train.epochs=1",
        "train.max_iters_per_phase=1",
        "train.batch_size=1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    # 1-3: phantom, summary, caches
    ds = json.loads((out / "phantom" / "dataset.json").read_text())
    assert len(ds["training"]) == 2 and len(ds["validation"]) == 1
    summary = json.loads((out / "data_summary.json").read_text())
    assert len(summary["cases"]) == 3 and not summary["rejected"]
    # 4-5: pretraining checkpoint and the teacher export with its sidecar
    assert (out / "pretrain" / "last.pt").is_file()
    state = load_file(str(out / "asa_teacher.safetensors"))
    # a complete MONAI SwinUNETR state dict: the backbone plus the untrained, MONAI-initialised out.*
    heads = {k for k in state if k.startswith("out.")}
    assert any(k.startswith("swinViT.layers3") for k in state)
    assert heads == {"out.conv.conv.weight", "out.conv.conv.bias"}
    meta = json.loads((out / "asa_teacher.safetensors.json").read_text())
    assert meta["method"] == "asa"
    # 6: both fine-tunes trained (loss down) and the ASA one really loaded the export
    asa = json.loads((out / "finetune" / "asa" / "metrics.json").read_text())
    scratch = json.loads((out / "finetune" / "scratch" / "metrics.json").read_text())
    # every backbone key loaded; the export's untrained out.* is left out (fine-tuning builds its own)
    assert asa["transfer"]["n_matched"] == len(state) - len(heads)
    assert asa["transfer"]["n_shape_mismatch"] == 0
    assert scratch["transfer"]["n_matched"] == 0
    for doc in (asa, scratch):
        assert doc["loss_last"] < doc["loss_first"]
    # the per-organ table: every foreground organ, both inits, the difference column
    table = (out / "dice_table.md").read_text()
    organs = [v for k, v in ds["labels"].items() if k != "0"]
    for organ in organs:
        assert f"| {organ} |" in table
    assert "| organ | scratch | asa | asa - scratch |" in table
    mean_row = next(line for line in table.splitlines() if line.startswith("| **mean**"))
    values = [float(v) for v in mean_row.strip("|").split("|")[1:3]]
    expected = [scratch["summary"]["dice"]["mean"], asa["summary"]["dice"]["mean"]]
    assert values == pytest.approx(expected, abs=5e-4)  # printed to 3 decimals
    assert "per-organ dice" in printed.lower()

    # a rerun reuses every stage and prints the same table
    before = (out / "finetune" / "asa" / "model_final.pt").stat().st_mtime_ns
    assert main(argv) == 0
    assert "reused" in capsys.readouterr().out
    assert (out / "finetune" / "asa" / "model_final.pt").stat().st_mtime_ns == before
    assert (out / "dice_table.md").read_text() == table

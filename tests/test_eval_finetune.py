"""Fine-tuning end to end on the phantom and on real sarcoma CT (tiny model, tens of iterations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asa3d.config_sections import DataConfig, ModelConfig, PreprocessConfig
from asa3d.data.msd_json import write_dataset_json
from asa3d.eval.finetune import (
    FinetuneConfig,
    FinetuneTrainConfig,
    InferenceConfig,
    run_finetune,
    total_iterations,
)


def tiny_cfg(root: Path, spacing=(12.0, 12.0, 6.0), **train) -> FinetuneConfig:
    """SwinUNETR-12 on 32x32x64 crops (the bottleneck needs > 1 voxel for InstanceNorm)."""
    kw = dict(iterations=12, crop_size=(32, 32, 64), lr=3e-3, log_every=0, rot90_prob=0.0)
    kw.update(train)
    return FinetuneConfig(
        model=ModelConfig(feature_size=12, drop_path_rate=0.0),
        data=DataConfig(root=str(root), num_workers=0, preprocess=PreprocessConfig(spacing=spacing)),
        train=FinetuneTrainConfig(**kw),
        eval=InferenceConfig(split="validation", overlap=0.25),
    )


def test_finetune_phantom_outputs_and_loss_goes_down(phantom_dataset, tmp_path):
    out = tmp_path / "ft"
    doc = run_finetune(tiny_cfg(phantom_dataset), out)
    assert doc["loss_last"] < doc["loss_first"]
    for name in (
        "config.yaml",
        "transfer.json",
        "model_final.pt",
        "model.json",
        "train_log.csv",
        "metrics.json",
        "per_case.csv",
    ):
        assert (out / name).is_file(), name
    info = json.loads((out / "model.json").read_text())
    assert info["n_classes"] == 14 and info["preprocessing"]["spacing_mm"] == [12.0, 12.0, 6.0]
    state = torch.load(out / "model_final.pt", weights_only=True)
    assert "out.conv.conv.weight" in state
    rows = json.loads((out / "metrics.json").read_text())["per_case"]
    assert len(rows) == 2 and len(rows[0]["dice"]) == 13  # 13 foreground classes, background excluded
    assert 0.0 <= doc["summary"]["dice"]["mean"] <= 1.0
    # TensorBoard scalars (the engine's logger): one train loss per iteration, equal to train_log.csv
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("loss/train")]
    csv_rows = (out / "train_log.csv").read_text().splitlines()[1:]
    logged = [(int(r.split(",")[0]), float(r.split(",")[1])) for r in csv_rows]
    assert [s for s, _ in tb] == [s for s, _ in logged] == list(range(1, 13))
    assert [v for _, v in tb] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_epochs_alternative_and_best_needs_validation_split(phantom_dataset, tmp_path):
    assert total_iterations(FinetuneTrainConfig(epochs=3, batch_size=2), n_train=5) == 8
    cfg = tiny_cfg(phantom_dataset, select="best")
    with pytest.raises(Exception, match="val_split"):
        run_finetune(cfg, tmp_path / "x")


def test_probe_mode_keeps_encoder_fixed(phantom_dataset, tmp_path):
    cfg = tiny_cfg(phantom_dataset, iterations=3)
    cfg.mode = "probe"
    cfg.eval.split = None
    run_finetune(cfg, tmp_path / "probe")
    torch.manual_seed(cfg.train.seed)  # same seed -> same scratch init as the run's
    from asa3d.eval.finetune import make_model

    ref, _ = make_model(cfg, 14)
    state = torch.load(tmp_path / "probe" / "model_final.pt", weights_only=True)
    for k, v in ref.state_dict().items():
        if k.startswith("swinViT."):
            assert torch.equal(v, state[k]), k
    assert not torch.equal(
        ref.state_dict()["decoder1.conv_block.conv1.conv.weight"],
        state["decoder1.conv_block.conv1.conv.weight"],
    )


def test_binary_finetune_on_real_sarcoma_ct(shared_data, tmp_path):
    sts = sorted((shared_data / "ibsi_sts_ct").glob("STS_*"))[:5]
    entries = [
        {"image": str(d / "CT_image.nii.gz"), "label": str(d / "CT_mask.nii.gz"), "id": d.name} for d in sts
    ]
    ds = write_dataset_json(
        tmp_path / "sts" / "dataset.json",
        "sts",
        {0: "background", 1: "sarcoma"},
        training=entries[:3],
        validation=entries[3:],
    )
    cfg = tiny_cfg(ds, spacing=(5.0, 5.0, 2.6), iterations=15, balanced_crops=True)
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.eval.metrics = ["dice", "hd95"]
    cfg.eval.grid = "native"  # scored on the original 0.98 x 0.98 x 3.27 mm LPS grid
    doc = run_finetune(cfg, tmp_path / "run")
    assert doc["grid"] == "native"
    assert doc["loss_last"] < doc["loss_first"]
    rows = doc["per_case"]
    assert [r["id"] for r in rows] == ["STS_012", "STS_015"]
    assert set(rows[0]["dice"]) == {"sarcoma"} and rows[0]["dice"]["sarcoma"] is not None
    assert "hd95" in doc["summary"]


def test_cli_strict_probe_then_report_and_predict(phantom_dataset, tmp_path):
    from asa3d.cli import main

    out = tmp_path / "strict"
    rc = main(
        [
            "probe",
            "--strict",
            "--config",
            "finetune/phantom_tiny.yaml",
            "--out",
            str(out),
            f"data.root={phantom_dataset}",
            "data.preprocess.spacing=[12.0, 12.0, 6.0]",
            "train.iterations=2",
            "train.num_threads=1",
            "eval.max_cases=1",
        ]
    )
    assert rc == 0
    info = json.loads((out / "model.json").read_text())
    assert info["mode"] == "strict_linear"
    # the same --out again: a finished run is never replaced without --overwrite
    model_bytes = (out / "model_final.pt").read_bytes()
    again = ["probe", "--strict", "--config", "finetune/phantom_tiny.yaml", "--out", str(out),
             f"data.root={phantom_dataset}"]  # fmt: skip
    assert main(again) == 2 and (out / "model_final.pt").read_bytes() == model_bytes
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page
    from asa3d.eval.predict import predict_files

    src = json.loads(Path(phantom_dataset).read_text())["validation"][0]["image"]
    (seg,) = predict_files(out, [Path(phantom_dataset).parent / src], tmp_path / "pred", device="cpu")
    import nibabel as nib

    assert nib.load(str(seg)).shape == (64, 64, 48)
    # unknown keys are refused with the valid ones listed
    assert main(["finetune", "--config", "finetune/phantom_tiny.yaml", "train.iterationz=2"]) == 2


def test_best_selection_on_a_validation_section(phantom_dataset, tmp_path):
    cfg = tiny_cfg(phantom_dataset, iterations=2, val_every=1, select="best")
    cfg.eval.split, cfg.eval.val_split = None, "validation"
    doc = run_finetune(cfg, tmp_path / "best")
    assert [v["iteration"] for v in doc["validation"]] == [1, 2]
    assert doc["selected"].startswith("best") and (tmp_path / "best" / "model_best.pt").is_file()
    assert json.loads((tmp_path / "best" / "model.json").read_text())["weights"] == "model_best.pt"


def test_merged_classes_scored_beside_labels_and_kept_out_of_the_mean(phantom_dataset, monkeypatch):
    """eval.merged_classes (LiTS: liver = label >= 1): a prediction that swaps the two kidneys
    scores 0 for each kidney but 1 for the merged region, which never enters the mean."""
    import dataclasses

    import numpy as np

    from asa3d.config import ConfigError
    from asa3d.eval import finetune as ft
    from asa3d.eval import results

    cfg = tiny_cfg(phantom_dataset)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, merged_classes={"kidneys": [2, 3]}))
    index = ft.load_index(cfg.data, "validation")
    labels = {c.id: c.label() for c in index.cases}
    gts = iter([labels[c.id] for c in index.cases])

    def swapped(*args, **kwargs):
        gt = next(gts).copy()
        r, l = gt == 2, gt == 3
        gt[r], gt[l] = 3, 2
        return gt

    monkeypatch.setattr(results, "predict_volume", swapped)
    rows = results.score_cases(torch.nn.Identity(), index, cfg, 14, torch.device("cpu"))
    for row in rows:
        d = row["dice"]
        assert d["right kidney"] == 0.0 and d["left kidney"] == 0.0 and d["kidneys"] == 1.0
        assert d["liver"] == 1.0
    summary = results.summarise(rows, ["dice"], exclude=cfg.eval.merged_classes)["dice"]
    expected = np.nanmean([v for c, v in summary["per_class"].items() if c != "kidneys"])
    assert summary["mean"] == pytest.approx(expected) and summary["mean"] < 1.0
    with pytest.raises(ConfigError, match="foreground label values"):
        InferenceConfig(merged_classes={"bad": [0]}).validate()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_finetune_mixed_precision_runs(phantom_dataset, tmp_path, precision, caplog):
    """The engine's autocast/GradScaler helpers drive fine-tuning too (fp16 on CPU: autocast only).
    bf16 on a CPU trains in fp32 (oneDNN's bf16 conv3d weight gradients are unreliable there:
    benchmarks/cpu_bf16_conv.py), so its losses equal an fp32 run's bit for bit, while the
    sliding-window scoring (a forward pass, unaffected) still runs in bf16.
    Half-precision conv3d is ~7x slower than fp32 on a CPU, so: 2 steps."""
    import dataclasses

    cfg = tiny_cfg(phantom_dataset, iterations=2, precision=precision)
    split = "validation" if precision == "bf16" else None
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_cases=1, split=split))
    with caplog.at_level("WARNING", logger="asa3d.engine.precision"):
        doc = run_finetune(cfg, tmp_path / precision)
    assert doc["iterations"] == 2 and all(v == v for v in (doc["loss_first"], doc["loss_last"]))
    if precision == "bf16":
        assert any("training in fp32" in r.getMessage() for r in caplog.records)
        fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
        ref = run_finetune(fp32, tmp_path / "fp32")
        assert (doc["loss_first"], doc["loss_last"]) == (ref["loss_first"], ref["loss_last"])
    if split:
        assert 0.0 <= doc["summary"]["dice"]["mean"] <= 1.0
    state = torch.load(tmp_path / precision / "model_final.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())

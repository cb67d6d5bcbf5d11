"""`data prepare --config`: the cache is built as the run reads it, so the run builds nothing;
``ASA3D_CACHE_DIR`` moves it; a volume smaller than the crop is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from asa3d.cli import main
from asa3d.config import load_config


def test_prepare_with_finetune_config_is_what_finetune_reads(
    phantom_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from asa3d.eval.finetune import FinetuneConfig, load_index

    monkeypatch.setenv("ASA3D_CACHE_DIR", str(tmp_path / "user_cache"))
    cfg_file = "finetune/phantom_tiny.yaml"
    root = f"data.root={phantom_dataset}"
    assert main(["data", "prepare", "--config", cfg_file, root, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "splits ['training', 'validation']" in out  # fine-tuning scores the validation section
    assert f"cache folder: {tmp_path / 'user_cache'}" in out
    assert '"spacing_mm": [8.0, 8.0, 5.0]' in out  # the run's grid, not prepare's 1.5 mm default
    cfg = load_config(FinetuneConfig, cfg_file, [root])
    train = load_index(cfg.data)
    test = load_index(cfg.data, cfg.eval.split)
    assert (train.built, train.reused, test.built, test.reused) == (0, 4, 0, 2)
    assert str(train.cache_dir).startswith(str(tmp_path / "user_cache"))


def test_without_config_the_run_would_build_again(
    phantom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """What --config fixes: prepare's own defaults (1.5 x 1.5 x 2 mm) are not the run's grid."""
    from asa3d.eval.finetune import FinetuneConfig, load_index

    cache = tmp_path / "c"
    assert main(["data", "prepare", str(phantom_dataset), "--cache-dir", str(cache), "--workers", "1"]) == 0
    capsys.readouterr()
    cfg = load_config(FinetuneConfig, "finetune/phantom_tiny.yaml", [f"data.root={phantom_dataset}",
                      f"data.cache_dir={cache}"])  # fmt: skip
    assert load_index(cfg.data).built == 4


def test_prepare_with_pretrain_config(
    phantom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from asa3d.config_sections import PretrainConfig
    from asa3d.data.prepare import ensure_cache

    over = [f"data.root={phantom_dataset}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(["data", "prepare", "--config", "pretrain/asa_tiny.yaml", *over]) == 0
    assert '"spacing_mm": [4.0, 4.0, 4.0]' in capsys.readouterr().out
    cfg = load_config(PretrainConfig, "pretrain/asa_tiny.yaml", over)
    assert ensure_cache(cfg.data, with_labels=False).built == 0  # what the trainer calls


def test_volume_smaller_than_the_crop_is_reported(
    phantom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 16 mm voxels: the 64x64x48 phantoms at 6x6x8 mm become 24x24x24, below the 32x32x64 crop
    args = ["data", "prepare", "--config", "finetune/phantom_tiny.yaml", f"data.root={phantom_dataset}",
            "data.preprocess.spacing=[16.0,16.0,16.0]", "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "case 'phantom_000'" in err and "smaller than the crop (32, 32, 64)" in err and "zero-pads" in err


def test_run_section_override_needs_config(capsys: pytest.CaptureFixture, phantom_dataset: Path) -> None:
    assert main(["data", "prepare", str(phantom_dataset), "train.crop_size=[32,32,32]"]) == 2
    assert "need --config" in capsys.readouterr().err


def test_ensure_cache_reports_small_volumes_given_the_crop(
    phantom_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """For runs that skip `data prepare`: the trainer passes its crop and gets the same warning."""
    from asa3d.config_sections import DataConfig, PreprocessConfig
    from asa3d.data.prepare import ensure_cache

    cfg = DataConfig(root=str(phantom_dataset), cache_dir=str(tmp_path / "c"),
                     preprocess=PreprocessConfig(spacing=(16.0, 16.0, 16.0)))  # fmt: skip
    ensure_cache(cfg, with_labels=False, crop=(24, 24, 32))
    small = [r.message for r in caplog.records if "smaller than the crop" in r.message]
    assert len(small) == 4 and "on axis 2" in small[0]  # 24x24x24: only z is short

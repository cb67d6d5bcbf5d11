"""``asa3d predict`` writes label maps in the input's original geometry (RAS and LPS real scans)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from asa3d.eval.predict import load_finetuned, predict_files

SCANS = {
    "ras": "totalsegmentator_tests/example_ct_sm.nii.gz",  # 122x101x30, 3 mm, RAS
    "lps": "ibsi_sts_ct/STS_002/CT_image.nii.gz",  # 161x143x48, 0.98x0.98x3.27 mm, LPS
}


class Threshold(nn.Module):
    """A 'model' whose answer is known in any geometry: class 1 where the windowed intensity > 0.5
    (HU > 37.5 with the default window). Inverting the preprocessing must land it on the voxels of
    the original scan with HU > 37.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


INFO = {
    "preprocessing": {"orientation": "RAS", "spacing_mm": [2.0, 2.5, 4.0], "hu_window": [-175.0, 250.0]},
    "inference": {"roi_size": [32, 32, 64], "overlap": 0.25, "mode": "gaussian", "sw_batch_size": 4},
}


@pytest.mark.parametrize("kind", ["ras", "lps"])
def test_predict_inverts_preprocessing(shared_data, tmp_path, kind):
    src = shared_data / SCANS[kind]
    img = nib.load(str(src))
    assert ("".join(nib.aff2axcodes(img.affine)) == "RAS") == (kind == "ras")
    (out,) = predict_files(Threshold(), [src], tmp_path, info=INFO, device="cpu")
    seg = nib.load(str(out))
    assert seg.shape == img.shape
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)
    expected = np.asarray(img.dataobj) > 37.5
    got = np.asarray(seg.dataobj) == 1
    dice = 2 * (expected & got).sum() / (expected.sum() + got.sum())
    # resampling to 2-4 mm and back blurs the noisy soft-tissue edges only (measured 0.83 RAS, 0.75 LPS)
    assert dice > 0.7, dice
    flipped = 2 * (expected & got[::-1]).sum() / (expected.sum() + got.sum())
    assert flipped < 0.75 * dice, (dice, flipped)  # a wrong axis flip would be caught


def test_predict_from_a_finetuned_run_dir(shared_data, tmp_path):
    """A run dir is all predict needs: model.json (kwargs, mode, contract) + model_final.pt."""
    from asa3d.config_sections import ModelConfig
    from asa3d.eval.probe import prepare_model
    from asa3d.eval.transfer import build_model

    kwargs = ModelConfig(feature_size=12).swinunetr_kwargs(2)
    net = prepare_model(build_model(kwargs), "probe", 2)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(net.state_dict(), run / "model_final.pt")
    info = dict(
        INFO,
        format="asa3d-finetune/1",
        model_kwargs=kwargs,
        mode="probe",
        n_classes=2,
        probe={"freeze_encoders": False, "stages": [0, 1, 2, 3, 4]},
        weights="model_final.pt",
    )
    info["preprocessing"] = dict(INFO["preprocessing"], spacing_mm=[4.0, 4.0, 4.0])
    (run / "model.json").write_text(json.dumps(info))
    model, _ = load_finetuned(run / "model_final.pt")
    assert not model.training
    src = shared_data / SCANS["lps"]
    from asa3d.cli import main

    assert main(["predict", "--model", str(run), "--input", str(src), "--out", str(tmp_path / "pred")]) == 0
    seg = nib.load(str(Path(tmp_path / "pred" / "CT_image_seg.nii.gz")))
    img = nib.load(str(src))
    assert seg.shape == img.shape
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)

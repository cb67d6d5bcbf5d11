"""``asa3d eve`` end to end, and Eve's property after a tiny Adam training.

- The Eve property (Adam supplement B): after ``configs/pretrain/adam2d_tiny.yaml`` a landmark
  patch's embedding is closer to the same landmark inside a larger crop than to unrelated patches
  (other landmarks' patches of the patch's size, in every image), on phantom radiographs the run
  never saw. Compared with the same encoder at its initial weights, which fails it (a random
  network finds the same-size unrelated patches closer: AUC 0.33 against 0.61 after training).
- ``asa3d eve`` on a tiny 2D checkpoint (.pt) and a tiny 3D one (trained a few steps, exported to
  .safetensors): the three pictures, the table and scores.json exist and hold sane values;
  bad inputs exit 2 naming the file and the fix; existing outputs need --overwrite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asa3d.cli import build_parser
from asa3d.cli import main as cli

LANDMARKS = ["lungs", "liver", "spleen", "stomach", "vertebrae", "right kidney", "left kidney", "aorta"]


def _drr_dataset(out: Path, n: int) -> Path:
    """``n`` phantom radiographs the tiny run never saw (seed 1; it trains on seed 0), at its geometry."""
    from asa3d.data.dataset2d import DRR_SPACING, DRR_VOLUME
    from asa3d.data.drr import write_drr_dataset

    return write_drr_dataset(out, n=n, seed=1, shape=DRR_VOLUME, spacing=DRR_SPACING).parent


def test_eve_is_a_registered_verb() -> None:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert "eve" in sub.choices and "examples" in sub.choices["eve"].epilog


# ---- Eve's property after a tiny training -----------------------------------------------------------
@pytest.mark.slow  # the shared tiny run (about 15 s, once per session) + 6 radiographs
def test_tiny_adam_embeds_a_patch_closer_to_its_larger_crop_than_to_unrelated_patches(
    adam2d_tiny_run: Path, tmp_path: Path
) -> None:
    from asa3d.config import from_dict
    from asa3d.config_sections import PretrainConfig
    from asa3d.engine.checkpoint import load_checkpoint
    from asa3d.engine.precision import seed_all
    from asa3d.eve.landmarks import mask_landmarks
    from asa3d.eve.load import load_encoder
    from asa3d.eve.localise import scale_consistency
    from asa3d.eve.tsne import landmark_embeddings
    from asa3d.methods.base import build_method

    data = _drr_dataset(tmp_path / "drr", 6)
    images, lms = [], []
    for i in range(6):
        z = np.load(data / "masksTr" / f"drr_{i:03d}.npz")
        img = np.asarray(Image.open(data / "imagesTr" / f"drr_{i:03d}.png"), np.float32) / 65535
        images.append(torch.from_numpy(img)[None])
        lms.append(mask_landmarks(z["masks"], [str(n) for n in z["names"]], LANDMARKS))
    trained = load_encoder(adam2d_tiny_run / "last.pt").encoder
    ck = load_checkpoint(adam2d_tiny_run / "last.pt")
    cfg = from_dict(PretrainConfig, ck["config"])
    seed_all(cfg.train.seed)  # the run's initial weights
    init_net = build_method(cfg.method, cfg.model).student.encoder
    init = load_encoder(adam2d_tiny_run / "last.pt").encoder
    init.net.load_state_dict(init_net.state_dict(), strict=False)  # only the unused fc head differs
    score = {}
    for name, enc in (("init", init), ("trained", trained)):
        le = landmark_embeddings(enc, images, lms, [8.0, 16.0, 32.0])
        score[name] = scale_consistency(le, 1, 2)  # 16 px patch vs its 32 px crop, unrelated 16 px patches
    s0, s1 = score["init"], score["trained"]
    assert s0["n"] == s1["n"] == 48
    # measured (seed 0): AUC 0.33 -> 0.61, margin -0.029 -> 0.080; seeds 1 and 2 of the same config:
    # 0.47 -> 0.69 / 0.017 -> 0.081 and 0.55 -> 0.59 / 0.012 -> 0.098
    assert s1["auc"] > 0.55 and s0["auc"] < 0.5, score
    assert s1["auc"] > s0["auc"] + 0.1 and s1["margin"] > s0["margin"] + 0.05, score


# ---- asa3d eve --------------------------------------------------------------------------------------
def _pictures_ok(out: Path) -> dict:
    for name in ("tsne.png", "correspondence.png", "whole_parts.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 600 and im.size[1] > 400 and float(im.info["dpi"][0]) >= 150, name
            px = np.asarray(im.convert("L"), np.float32)
            assert px.std() > 10, f"{name} looks empty"
    md = (out / "whole_parts.md").read_text()
    assert md.startswith("| split |") and "baseline" in md
    s = json.loads((out / "scores.json").read_text())
    assert s["format"] == "asa3d-eve/1" and len(s["landmarks"]["names"]) >= 2
    t = s["tsne"]
    assert -1 <= t["silhouette"] <= 1 and 0 <= t["knn_accuracy"] <= 1 and t["points"] > 12
    c = s["scale_consistency"]
    assert c["n"] > 0 and 0 <= c["auc"] <= 1 and -2 <= c["margin"] <= 2
    for loc in (s["localisation"]["within_patient"], s["localisation"]["across_patients"]):
        if loc is None:  # grid landmarks: no across-patient localisation
            assert s["landmarks"]["source"] == "grid"
            continue
        assert loc["n"] > 0 and all(0 <= v <= 1 for v in loc["hit_rate"].values())
        assert 0 <= loc[f"median_error_{s['unit']}"] <= loc[f"mean_error_{s['unit']}"] * 3
    for row in s["whole_parts"]:
        assert -1 <= row["cos_mean"] <= 1 and -1 <= row["baseline_mean"] <= 1 and row["n"] > 1
    assert (out / "tb").is_dir()
    return s


@pytest.mark.slow  # the shared tiny run + an Eve run of 2 radiographs (about 10 s)
def test_eve_cli_on_the_tiny_2d_run(
    adam2d_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = _drr_dataset(tmp_path / "drr", 2)
    imgs = [str(data / "imagesTr" / f"drr_{i:03d}.png") for i in range(2)]
    labels = [str(data / "masksTr" / f"drr_{i:03d}.npz") for i in range(2)]
    out = tmp_path / "eve"
    args = [
        "eve",
        str(adam2d_tiny_run / "last.pt"),
        "--images",
        *imgs,
        "--labels",
        *labels,
        "--out",
        str(out),
    ]
    assert cli([*args, "--no-progress"]) == 0
    s = _pictures_ok(out)
    assert s["spatial_dims"] == 2 and s["unit"] == "px" and s["landmarks"]["source"] == "labels"
    assert (
        s["encoder"]["crop_embedding"] == "global average pool of layer4" and s["encoder"]["input_size"] == 32
    )
    assert set(s["images"]) == {"A", "B", "A'", "B'"} and s["tsne"]["points"] <= 4 * 10 * 3
    # the bookkeeping of the rotated copy is right: a landmark is found near where the transform puts it
    within = s["localisation"]["within_patient"]
    assert within["median_error_px"] < 0.1 * 64, within
    assert s["correspondence"]["matches"]["within"]["correct"] >= 5  # of 20, within one 4 px cell
    assert "localisation within patient" in capsys.readouterr().out
    before = (out / "scores.json").stat().st_mtime_ns
    assert cli([*args, "--no-progress"]) == 2  # outputs exist: refused, untouched
    assert "--overwrite" in capsys.readouterr().err and (out / "scores.json").stat().st_mtime_ns == before
    # no labels (grid landmarks) and the feature-map matches
    out2 = tmp_path / "eve_grid"
    assert (
        cli(
            ["eve", str(adam2d_tiny_run / "last.pt"), "--images", *imgs, "--out", str(out2), "--dense", "map"]
        )
        == 0
    )
    g = _pictures_ok(out2)
    assert g["landmarks"]["names"] == [f"grid {i}" for i in range(1, 10)]
    assert g["localisation"]["across_patients"] is None and g["correspondence"]["dense"] == "map"


@pytest.mark.slow  # a 3-step Adam-3D run (about 10 s) + export + a reduced Eve run (about 15 s)
def test_eve_cli_on_a_tiny_3d_export(phantom_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "a3d"
    root = phantom_dataset.parent
    over = [f"data.root={phantom_dataset}", "train.epochs=3", "train.progress=false"]
    assert cli(["pretrain", "--config", "pretrain/adam3d_tiny.yaml", "--out", str(run), *over]) == 0
    exp = tmp_path / "a3d.safetensors"
    assert cli(["export", str(run / "last.pt"), "--out", str(exp)]) == 0
    imgs = [str(root / "imagesTr" / f"phantom_00{i}.nii.gz") for i in (4, 5)]  # validation subjects
    labels = [str(root / "labelsTr" / f"phantom_00{i}.nii.gz") for i in (4, 5)]
    out = tmp_path / "eve3d"
    small = [
        "--grid",
        "4",
        "--match-grid",
        "6",
        "--landmarks",
        "liver",
        "spleen",
        "right kidney",
        "vertebrae",
    ]
    assert (
        cli(
            [
                "eve",
                str(exp),
                "--images",
                *imgs,
                "--labels",
                *labels,
                "--out",
                str(out),
                "--no-progress",
                *small,
            ]
        )
        == 0
    )
    s = _pictures_ok(out)
    assert s["spatial_dims"] == 3 and s["unit"] == "mm" and s["scales"] == [48.0, 72.0, 96.0]
    assert (
        s["encoder"]["backbone"] == "swinunetr"
        and s["encoder"]["crop_embedding"] == "global average pool of h4"
    )
    assert set(s["correspondence"]["matches"]["across"]) == {"axial", "coronal", "sagittal"}
    assert [r["split"] for r in s["whole_parts"]] == ["2x2x2"]
    diag = math.dist(
        (0, 0, 0), np.asarray(s["images"]["A"]["shape"]) * np.asarray(s["images"]["A"]["pixel_size"])
    )
    assert s["localisation"]["across_patients"]["mean_error_mm"] < diag


def test_eve_cli_refuses_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from asa3d.config_sections import ModelConfig
    from asa3d.data.phantom import make_phantom
    from asa3d.models.backbones.swinunetr import swinunetr_spec

    spec = swinunetr_spec(
        ModelConfig(feature_size=12, depths=[1, 1, 1, 1], num_heads=[3, 3, 3, 3], window_size=4)
    )
    net = spec.build()
    from safetensors.torch import save_file

    def export(name: str, parts: dict) -> Path:
        p = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p))
        side = {"backbone": spec.to_dict(), "method": name, "transfer_parts": parts, "method_config": {}}
        p.with_name(p.name + ".json").write_text(json.dumps(side))
        return p

    ok = export("swinssl", dict.fromkeys(spec.parts, True))
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png)
    import nibabel as nib

    hu, _, aff = make_phantom(0, (32, 32, 24), (12.0, 12.0, 12.0))
    nii = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(hu, aff), nii)

    def run(*args: str) -> str:
        assert cli(["eve", *args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        return capsys.readouterr().err

    err = run(str(ok), "--images", str(tmp_path / "missing.nii.gz"), str(nii))
    assert "missing.nii.gz" in err and "not found" in err
    err = run(str(ok), "--images", str(png), str(nii))  # 2D where 3D is needed
    assert "x.png" in err and "2D image" in err and "Fix" in err
    dead = export("nothing", dict.fromkeys(spec.parts, False))
    err = run(str(dead), "--images", str(nii), str(nii))  # a method that trained no encoder stage
    assert "nothing.safetensors" in err and "no dense features" in err and "Fix" in err
    from asa3d.models.backbones.resnet import resnet_spec

    spec2d = resnet_spec(10, 2, 1, 1, (4, 8, 8, 8))
    flat = tmp_path / "adam2d.safetensors"
    save_file({k: v.contiguous() for k, v in spec2d.build().state_dict().items()}, str(flat))
    side = {"backbone": spec2d.to_dict(), "method": "adam", "method_config": {"spatial_dims": 2}}
    flat.with_name(flat.name + ".json").write_text(json.dumps(side))
    err = run(str(flat), "--images", str(nii), str(png))  # 3D where 2D is needed
    assert "a.nii.gz" in err and "3D scan" in err and "Fix" in err
    bare = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, bare)
    err = run(str(bare), "--images", str(nii), str(nii))
    assert "model.pt" in err and "Fix" in err
    assert not any((tmp_path / "o").glob("*.png"))  # nothing written by a refused run

"""Fixed-seed tiny runs whose results are stored under ``tests/golden/`` (see test_asa_golden.py).

Reshaping the engine, the method contract or the fine-tuning loop must not change what ASA
and fine-tuning compute: these runs record the loss of every step and a fingerprint of the final
weights (sha256 of each tensor's bytes, plus float64 sum and sum of squares so a drift can be
measured when a hash differs). Regenerate ONLY when a change of behaviour is intended:

    PYTHONPATH=src python tests/make_golden.py [asa|finetune ...]

CPU kernels (MKL, oneDNN, ATen's vectorised paths) pick different instruction sets on different
processors, and the same code then differs in the last bits (measured: 6e-7 relative at step 0,
5e-5 after 12 ASA steps between an AVX-512 machine and the recording one). So a golden is tied
to a *kernel fingerprint* (the hash of a few seeded ops the runs use). To add one for another
machine class, run the recording commit's code with this script there:

    git worktree add ../golden-commit 00da7a3
    PYTHONPATH=../golden-commit/src python tests/make_golden.py --machine

which writes ``golden/<name>.<fingerprint>.json`` beside the first recording.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

GOLDEN = Path(__file__).resolve().parent / "golden"

# SwinUNETR-12, one block per stage: the smallest network ASA's heads accept
TINY_MODEL: dict[str, Any] = {
    "feature_size": 12,
    "depths": [1, 1, 1, 1],
    "num_heads": [3, 3, 3, 3],
    "window_size": 4,
    "drop_path_rate": 0.0,
}


def fingerprint(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        d = t.double()
        out[k] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
            "sum": float(d.sum()),
            "sumsq": float((d * d).sum()),
        }
    return out


class PhantomVolumes(Dataset):
    """Three whole phantom volumes in [0, 1] (unequal shapes: ASA resizes on the device)."""

    def __init__(self) -> None:
        from asa3d.data.phantom import make_phantom

        self.vols = []
        for i, shape in enumerate([(40, 36, 32), (36, 40, 36), (44, 36, 32)]):
            img, _, _ = make_phantom((7, i), shape=shape, spacing=(8.0, 8.0, 8.0))
            v = np.clip((img.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0)
            self.vols.append(torch.from_numpy(v)[None])

    def __len__(self) -> int:
        return len(self.vols)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"image": self.vols[idx], "id": f"ph{idx}"}


def asa_config(train: dict[str, Any] | None = None, **method: Any):  # noqa: ANN201
    from asa3d.config import from_dict
    from asa3d.config_sections import PretrainConfig

    m = {
        "name": "asa",
        "input_size": 32,
        "subvolume_size": 8,
        "p2_max_offset_cells": 1,
        "global_proj_dim": 64,
        "local_proj_dim": 32,
        "phases": [
            {"name": "P1", "view": "shuffle", "tasks": ["sop", "gc"]},
            {"name": "P2", "view": "related_crops", "tasks": ["gc", "lc"]},
        ],
    }
    m.update(method)
    tc = {
        "epochs": 3,
        "batch_size": 2,
        "lr": 1e-2,
        "warmup_epochs": 1,
        "max_iters_per_phase": 2,
        "seed": 0,
        "progress": False,
        "log_every": 1,
        "monitor_every": 0,
        "device": "cpu",
        "deterministic": True,
        **(train or {}),
    }
    return from_dict(
        PretrainConfig,
        {
            "method": m,
            "model": dict(TINY_MODEL),
            "data": {"num_workers": 0},
            "train": tc,
        },
    )


def run_asa(out: Path) -> dict[str, Any]:
    """3 rounds x (2 P1 + 2 P2) steps through the engine at 32^3 (order + consistency), then 2 P1
    steps at 64^3 with appearance recovery (the decoder needs 64^3); losses and final weights."""
    doc = _asa_run(out / "a", asa_config())
    var = _asa_run(
        out / "b",
        asa_config(
            {"epochs": 1, "warmup_epochs": 0, "lr_schedule": "constant"},
            input_size=64,
            subvolume_size=16,
            phases=[{"name": "P1", "view": "shuffle", "tasks": ["sop", "var", "gc"]}],
        ),
    )
    return {**doc, "var_steps": var["steps"], "var_teacher": var["teacher"], "var_student": var["student"]}


def _asa_run(out: Path, cfg: Any) -> dict[str, Any]:
    from asa3d.engine.checkpoint import load_checkpoint
    from asa3d.engine.trainer import run_pretrain

    ds = PhantomVolumes()
    last = run_pretrain(cfg, out, resume=False, dataset_factory=lambda phase, spec: ds)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [
        {
            "phase": r["phase"],
            **{k: v for k, v in r.items() if k.startswith("loss/") or k in ("lr", "grad_norm")},
        }
        for r in records
        if "loss/loss" in r
    ]
    ck = load_checkpoint(last)
    state = ck["state"]["method"]
    teacher = {k: v for k, v in state.items() if k.startswith("teacher.")}
    if not teacher:
        raise RuntimeError(f"no teacher.* tensors in the method state; keys: {sorted(state)[:5]}")
    return {
        "steps": steps,
        "teacher": fingerprint(teacher),
        "student": fingerprint({k: v for k, v in state.items() if k.startswith("student.")}),
    }


def finetune_config(root: Path):  # noqa: ANN201
    from asa3d.config_sections import DataConfig, ModelConfig, PreprocessConfig
    from asa3d.eval.finetune import FinetuneConfig, FinetuneTrainConfig, InferenceConfig

    return FinetuneConfig(
        model=ModelConfig(
            feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), window_size=4, drop_path_rate=0.0
        ),
        data=DataConfig(
            root=str(root), num_workers=0, preprocess=PreprocessConfig(spacing=(12.0, 12.0, 6.0))
        ),
        train=FinetuneTrainConfig(
            iterations=6,
            batch_size=2,
            crop_size=(32, 32, 64),
            lr=3e-3,
            log_every=0,
            rot90_prob=0.5,
            flip_prob=0.5,
            lr_schedule="warmup_cosine",
            warmup_iters=2,
            device="cpu",
        ),
        eval=InferenceConfig(split=None),
    )


def run_finetune_golden(out: Path) -> dict[str, Any]:
    """6 fine-tuning steps on the phantom from scratch; losses, LRs and the final weights."""
    import csv

    from asa3d.data.phantom import write_phantom_dataset
    from asa3d.eval.finetune import run_finetune

    ds_json = write_phantom_dataset(out / "data", n=3, seed=0, shape=(64, 64, 48), spacing=(6.0, 6.0, 8.0))
    run_finetune(finetune_config(ds_json), out / "run")
    with open(out / "run" / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = [{"iteration": int(r["iteration"]), "loss": float(r["loss"]), "lr": float(r["lr"])} for r in rows]
    state = torch.load(out / "run" / "model_final.pt", map_location="cpu", weights_only=True)
    return {"steps": steps, "weights": fingerprint(state)}


RUNS = {"asa": run_asa, "finetune": run_finetune_golden}


def kernel_fingerprint() -> str:
    """12 hex digits that change when the CPU kernels round differently: seeded conv3d forward
    and backward, matmul, layer norm, softmax, GELU and trilinear resize, one thread."""
    import torch.nn.functional as F

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 12, 12, generator=g, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, 3, generator=g, requires_grad=True)
    y = F.conv3d(x, w, padding=1)
    t = y.flatten(2).transpose(1, 2)  # (2, 1728, 8) tokens
    a = F.layer_norm(t, (8,)) @ torch.randn(8, 8, generator=g)
    s = F.softmax(a @ a.transpose(1, 2) / 8**0.5, -1) @ a
    r = F.interpolate(F.gelu(y), scale_factor=0.5, mode="trilinear", align_corners=False)
    (s.square().mean() + r.mean()).backward()
    h = hashlib.sha256()
    for out in (y, s, r, x.grad, w.grad):
        h.update(out.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def golden_files(name: str) -> dict[str, Path]:
    """Every recorded golden of run ``name``: the first recording under ``""`` (its machine's
    fingerprint was not recorded) and one per recorded kernel fingerprint."""
    out = {"": GOLDEN / f"{name}.json"}
    for p in sorted(GOLDEN.glob(f"{name}.*.json")):
        out[p.name.removeprefix(f"{name}.").removesuffix(".json")] = p
    return out


def compute(name: str) -> dict[str, Any]:
    torch.set_num_threads(1)  # reductions split over threads would change the bits
    with tempfile.TemporaryDirectory() as tmp:
        return RUNS[name](Path(tmp))


def main(argv: list[str]) -> int:
    GOLDEN.mkdir(exist_ok=True)
    machine = "--machine" in argv
    names = [a for a in argv if a != "--machine"] or list(RUNS)
    fp = kernel_fingerprint()
    for name in names:
        doc = {"torch": torch.__version__, "kernels": fp, **compute(name)}
        path = GOLDEN / (f"{name}.{fp}.json" if machine else f"{name}.json")
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path} ({len(doc['steps'])} steps, kernel fingerprint {fp})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main(sys.argv[1:]))

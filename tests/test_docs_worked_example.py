"""The worked example of docs/methods/adding_a_method.md runs as printed: its code block is read
from the page, trained through the engine on a folder of PNG images (two 2D crops per image,
BatchNorm declared ``broadcast``), its loss goes down, and its export loads into the plain MONAI
ResNet with strict=True."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from asa3d.config import from_dict
from asa3d.config_sections import PretrainConfig
from asa3d.engine.trainer import run_pretrain
from asa3d.export import export_checkpoint, rebuild_method

PAGE = Path(__file__).resolve().parents[1] / "docs" / "methods" / "adding_a_method.md"


def example_code() -> str:
    text = PAGE.read_text()
    section = text[text.index("## Worked example") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"{PAGE}: no python block under 'Worked example'"
    return match.group(1)


def load_example() -> types.ModuleType:
    """Execute the page's code as a module (registering ``tiny_contrast``)."""
    mod = types.ModuleType("docs_worked_example")
    sys.modules[mod.__name__] = mod  # dataclasses and the config loader resolve types through it
    exec(compile(example_code(), str(PAGE), "exec"), mod.__dict__)
    return mod


def _images(folder: Path, n: int) -> None:
    """Smooth random greyscale images (each distinct), 40 x 40 PNG."""
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        low = torch.rand(1, 1, 5, 5, generator=g)
        img = torch.nn.functional.interpolate(low, size=(40, 40), mode="bicubic", align_corners=False)
        arr = (img[0, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")


# slow: trains 20 steps end to end through the engine (about 7 s of CPU, more on a shared machine)
@pytest.mark.slow
def test_worked_example_trains_on_2d_crops_and_exports(tmp_path: Path) -> None:
    mod = load_example()
    method = {"name": "tiny_contrast", "depth": 10, "widths": [8, 16, 16, 16], "dim": 16, "crop": 32}
    cfg = from_dict(
        PretrainConfig,
        {
            "method": method,
            "data": {"root": str(tmp_path / "png"), "num_workers": 0},
            "train": {
                "epochs": 10,
                "batch_size": 8,
                "lr": 0.1,
                "weight_decay": 1e-4,
                "warmup_epochs": 0,
                "lr_schedule": "constant",
                "seed": 0,
                "progress": False,
                "log_every": 1,
                "monitor_every": 0,
                "device": "cpu",
            },
        },
    )
    _images(tmp_path / "png", 16)
    last = run_pretrain(cfg, tmp_path / "run", resume=False)

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/info_nce"] for r in rows if "loss/info_nce" in r]
    assert len(losses) == 20  # 16 images at batch 8: 2 steps per round, 10 rounds
    first, final = float(np.mean(losses[:4])), float(np.mean(losses[-4:]))
    assert final < first - 0.3, losses

    ck = torch.load(last, weights_only=True)
    assert ck["backbone"]["class"] == "monai.networks.nets.ResNet" and ck["backbone"]["spatial_dims"] == 2
    built = rebuild_method(ck)
    assert isinstance(built, mod.TinyContrast)
    groups = {g.name: g for g in built.param_groups(1e-4)}  # BatchNorm weights: no weight decay
    bn = built.net.bn1.weight
    assert any(p is bn for p in groups["no_decay"].params) and groups["no_decay"].weight_decay == 0.0

    from monai.networks.nets import ResNet

    out, meta = export_checkpoint(last, tmp_path / "tiny.safetensors")
    from safetensors.torch import load_file

    net = ResNet(**meta["architecture"]["kwargs"])
    net.load_state_dict(load_file(str(out)), strict=True)  # nothing missing, nothing unexpected
    trained = ck["state"]["method"]
    for k, v in load_file(str(out)).items():
        if not k.startswith("fc."):
            assert torch.equal(v, trained[f"net.{k}"]), k

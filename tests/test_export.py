"""Export: a fresh plain MONAI SwinUNETR loads it with only out.* missing; lossy exports refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR

from asa3d.cli import main as cli_main
from asa3d.engine.checkpoint import CheckpointError, backbone_spec, check_transfer, load_checkpoint
from asa3d.engine.distributed import DistEnv
from asa3d.engine.trainer import Trainer
from asa3d.export import export_checkpoint, read_export, rebuild_method, transfer_state_from_checkpoint
from engine_toy_method import EngineToy, toy_config, toy_factory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("exp")
    t = Trainer(toy_config(), d, DistEnv(), dataset_factory=toy_factory(2))
    with torch.no_grad():  # make the teacher distinguishable from a fresh init
        for p in t.method.teacher.parameters():  # type: ignore[attr-defined]
            p.add_(0.5)
    return t.save_checkpoint()  # type: ignore[return-value]


def test_export_loads_into_fresh_swinunetr(ckpt: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "w.safetensors"
    assert cli_main(["export", str(ckpt), "--out", str(out)]) == 0
    assert "matched:" in capsys.readouterr().out
    before = out.read_bytes()
    assert cli_main(["export", str(ckpt), "--out", str(out)]) == 2  # a rerun never replaces silently
    assert "pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert cli_main(["export", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    state, meta = read_export(out)  # downstream view: the untrained out.* left out
    assert not any(k.startswith("out.") for k in state)
    full, _ = read_export(out, with_output=True)
    assert {k for k in full if k.startswith("out.")} == {"out.conv.conv.weight", "out.conv.conv.bias"}
    kwargs = dict(meta["architecture"]["kwargs"], out_channels=5)
    net = SwinUNETR(**kwargs)
    res = net.load_state_dict(state, strict=False)
    assert (
        res.unexpected_keys == [] and res.missing_keys and all(k.startswith("out.") for k in res.missing_keys)
    )
    teacher = rebuild_method(ckpt).transfer_state_dict()
    assert torch.equal(
        net.state_dict()["swinViT.patch_embed.proj.weight"], teacher["swinViT.patch_embed.proj.weight"]
    )  # it is the teacher
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["method"] == "engine_toy" and len(side["source_sha256"]) == 64
    assert side["preprocessing"]["hu_window"] and side["transfer_parts"]["decoder"] is False


STRICT_LOAD = """
import json, sys
import torch
from monai.networks.nets import SwinUNETR
from safetensors.torch import load_file
path = sys.argv[1]
kwargs = json.load(open(path + ".json"))["architecture"]["kwargs"]
net = SwinUNETR(**kwargs)
net.load_state_dict(load_file(path), strict=True)
ref = load_file(path)["swinViT.patch_embed.proj.weight"]
assert torch.equal(net.state_dict()["swinViT.patch_embed.proj.weight"], ref)
assert not any(m == "asa3d" or m.startswith("asa3d.") for m in sys.modules), "asa3d was imported"
print("strict load ok", sum(p.numel() for p in net.parameters()))
"""


def test_export_loads_strictly_in_a_clean_interpreter(ckpt: Path, tmp_path: Path) -> None:
    """A user without asa3d: plain MONAI SwinUNETR(**sidecar kwargs), strict=True."""
    out = tmp_path / "plain.safetensors"
    export_checkpoint(ckpt, out)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", STRICT_LOAD, str(out)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "strict load ok" in res.stdout


def test_export_refuses_to_drop_backbone_keys(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orig = EngineToy.transfer_state_dict

    def renamed(self: EngineToy) -> dict[str, torch.Tensor]:
        s = orig(self)
        s["module.swinViT.extra"] = s.pop("swinViT.patch_embed.proj.weight")  # a prefix bug
        return s

    monkeypatch.setattr(EngineToy, "transfer_state_dict", renamed)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(CheckpointError, match="module.swinViT.extra"):
        export_checkpoint(ckpt, out)
    assert not out.exists()


def test_transfer_helpers(ckpt: Path) -> None:
    state, meta = transfer_state_from_checkpoint(ckpt)
    assert meta["keys"]["dropped_output"] == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert meta["keys"]["unmatched_in_swinunetr"] == meta["keys"]["dropped_output"]
    with pytest.raises(CheckpointError, match="shape mismatch"):
        check_transfer(
            {**state, "encoder1.layer.conv1.conv.weight": torch.zeros(1)},
            backbone_spec(load_checkpoint(ckpt)),
        )

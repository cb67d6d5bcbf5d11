"""ASA's export is the teacher, tensor by tensor: with a teacher whose every parameter differs from
the student's, the exported file equals the teacher's SwinUNETR state under the same key, and
matches the student nowhere (an export of the student, or a tensor under the wrong layer's key,
fails)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asa3d.config import from_dict
from asa3d.config_sections import PretrainConfig
from asa3d.engine.distributed import DistEnv
from asa3d.engine.trainer import Trainer
from asa3d.export import export_checkpoint, read_export
from engine_toy_method import toy_factory

ASA_SMALL = {
    "name": "asa",
    "input_size": 64,
    "subvolume_size": 16,
    "p2_max_offset_cells": 1,
    "global_proj_dim": 32,
    "local_proj_dim": 16,
}
MODEL = {"feature_size": 12, "window_size": 4, "depths": [2, 2, 2, 2]}


@pytest.fixture(scope="module")
def asa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict]:
    d = tmp_path_factory.mktemp("asa_export")
    cfg = from_dict(
        PretrainConfig,
        {
            "method": ASA_SMALL,
            "model": MODEL,
            "data": {"num_workers": 0},
            "train": {"epochs": 1, "batch_size": 2, "seed": 0, "progress": False, "device": "cpu"},
        },
    )
    torch.manual_seed(0)
    t = Trainer(cfg, d, DistEnv(), dataset_factory=toy_factory(2))
    method = t.method
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # teacher = student + a nonzero offset in every element
        for (_, pt), (_, ps) in zip(
            sorted(method.teacher.named_parameters()), sorted(method.student.named_parameters()), strict=True
        ):
            off = torch.rand(ps.shape, generator=g) * 0.5 + 0.25
            pt.copy_(ps + off * torch.where(torch.rand(ps.shape, generator=g) < 0.5, -1.0, 1.0))
    teacher = {k: v.detach().clone() for k, v in method.teacher.backbone.net.state_dict().items()}
    student = {k: v.detach().clone() for k, v in method.student.backbone.net.state_dict().items()}
    return t.save_checkpoint(), teacher, student  # type: ignore[return-value]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_asa_export_equals_the_teacher_tensor_by_tensor(asa_checkpoint, suffix: str, tmp_path: Path) -> None:
    ckpt, teacher, student = asa_checkpoint
    out, _ = export_checkpoint(ckpt, tmp_path / f"asa{suffix}")
    state, meta = read_export(out)
    expected = {k: v for k, v in teacher.items() if not k.startswith("out.")}
    assert set(state) == set(expected)
    params = {k for k, v in expected.items() if v.is_floating_point() and v.numel() > 0}
    for k in sorted(expected):
        assert state[k].shape == expected[k].shape, k
        assert torch.equal(state[k], expected[k]), f"{k}: exported tensor is not the teacher's"
    # the teacher differs from the student in every parameter element: nothing exported is the student's
    same = [k for k in params if k in student and torch.isclose(state[k], student[k]).any()]
    learned = [k for k in same if "running" not in k and "num_batches" not in k]
    assert not learned, f"exported tensors equal to the student's somewhere: {learned[:5]}"
    assert meta["method"] == "asa"

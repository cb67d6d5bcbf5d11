"""The student-teacher base: frozen eval-mode teacher, cosine momentum, EMA over chosen pairs only."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from asa3d.config_sections import ModelConfig
from asa3d.methods.base import StepOutput
from asa3d.methods.student_teacher import StudentTeacherMethod


@dataclass
class Cfg:
    ema_momentum_start: float = 0.5


class Toy(StudentTeacherMethod):
    name = "st_toy"

    def __init__(self) -> None:
        super().__init__(Cfg(), ModelConfig())
        self.init_teacher(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 1)))

    def phases(self) -> list[str]:
        return ["a", "b"]

    def ema_prefixes(self, phase: str) -> tuple[str, ...] | None:
        return None if phase == "a" else ("0.",)

    def training_step(self, batch, phase):  # noqa: ANN001, ANN201
        return StepOutput(self.student(batch["image"]).sum())

    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        return self.teacher.state_dict()


def test_teacher_is_frozen_in_eval_and_not_trained() -> None:
    m = Toy().train()
    assert m.student.training and not m.teacher.training
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in m.student.parameters()}
    assert list(m.state_dict())[0].startswith("student.")


def test_ema_follows_the_momentum_schedule_over_the_chosen_pairs() -> None:
    torch.manual_seed(0)
    m = Toy()
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    t0 = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    s = dict(m.student.state_dict())
    out = m.on_step_end("b", 0, 4)  # i = 0: m = m0 = 0.5; only layer 0
    assert out["ema_momentum"] == pytest.approx(0.5)
    now = m.teacher.state_dict()
    for k in t0:
        want = 0.5 * t0[k] + 0.5 * s[k] if k.startswith("0.") else t0[k]
        torch.testing.assert_close(now[k], want, rtol=0, atol=1e-7)
    assert m.on_step_end("a", 4, 4)["ema_momentum"] == pytest.approx(1.0)  # the end: frozen
    torch.testing.assert_close(m.teacher.state_dict()["2.weight"], t0["2.weight"], rtol=0, atol=0)

"""The student-teacher base: an EMA teacher made once from the student, kept in eval mode with no
gradients, updated after every optimiser step (the shared step's post-step hook, ``on_step_end``)
with a cosine momentum schedule over the pairs of parameters a phase chooses.

A method subclasses ``StudentTeacherMethod``, builds its student and calls
``self.init_teacher(student)``; it overrides ``ema_prefixes(phase)`` when a phase's EMA covers only
part of the network (ASA's related-crops phase updates only the encoder it trains).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asa3d.methods.base import PretrainMethod
from asa3d.models.ema import cosine_momentum, ema_update_, make_teacher, param_pairs


class StudentTeacherMethod(PretrainMethod):
    """A ``PretrainMethod`` with ``self.student`` and its EMA copy ``self.teacher``."""

    student: nn.Module
    teacher: nn.Module

    def init_teacher(self, student: nn.Module) -> None:
        """Register ``student`` and an exact frozen copy of it as the teacher (in that order, so
        the state dict lists the student first)."""
        self.student = student
        self.teacher = make_teacher(student)  # made once; updated only by EMA

    def train(self, mode: bool = True) -> StudentTeacherMethod:
        super().train(mode)
        self.teacher.eval()  # the teacher never runs drop-path or dropout
        return self

    # ---- EMA ---------------------------------------------------------------------------------
    def ema_momentum_start(self) -> float:
        """m0 of the cosine schedule (default: the method config's ``ema_momentum_start``)."""
        return float(self.cfg.ema_momentum_start)

    def ema_prefixes(self, phase: str) -> tuple[str, ...] | None:
        """Student parameter-name prefixes the EMA updates after a step of ``phase`` (None: all)."""
        return None

    def momentum(self, global_iter: int, total_iters: int) -> float:
        return cosine_momentum(global_iter, total_iters, self.ema_momentum_start())

    @torch.no_grad()
    def on_step_end(self, phase: str, global_iter: int, total_iters: int) -> dict[str, Any]:
        m = self.momentum(global_iter, total_iters)
        t, s = param_pairs(self.teacher, self.student, self.ema_prefixes(phase))
        ema_update_(t, s, m)
        return {"ema_momentum": m}

"""Learning-rate schedules (docs/engine.md, "LR schedules").

The LR is a pure function of the position in training, so resuming needs no replay: the
scheduler's "state" only records its settings (checked on resume) and the last value set.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

Kind = Literal["epoch_cosine", "iter_cosine", "constant"]


def warmup_cosine(base: float, e: float, warmup: float, epochs: float) -> float:
    """lr(e) = base * min(1, e/W) * 0.5 * (1 + cos(pi * clip((e - W) / (E - W), 0, 1))), e in (0, E].

    With the epoch schedule e = 1..E, so round 1 runs at base/W and the last round at 0 (as in
    the reference code; the spec keeps it).
    """
    warm = min(1.0, e / warmup) if warmup > 0 else 1.0
    span = epochs - warmup
    progress = min(1.0, max(0.0, (e - warmup) / span)) if span > 0 else 0.0
    return base * warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_floor(
    base: float, e: float, warmup: float, epochs: float, start: float, floor: float
) -> float:
    """Linear warm-up from ``start`` to ``base`` over W, then cosine from ``base`` down to ``floor``
    (SimMIM's and timm's form). With start = floor = 0 it is ``warmup_cosine``."""
    if warmup > 0 and e < warmup:
        return start + (base - start) * e / warmup
    span = epochs - warmup
    progress = min(1.0, max(0.0, (e - warmup) / span)) if span > 0 else 0.0
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Sets the LR of every param group from (round, global iteration): the schedule's value times
    the group's ``lr_scale`` (1 where a group has none), so groups keep their relative rates.

    ``epoch_cosine``: the curve above, set once per round (e = round + 1).
    ``iter_cosine``: the same curve evaluated at e = (global_iter + 1) / iters_per_round.
    ``constant``: linear warm-up over ``warmup`` rounds, then ``base`` (warmup 0: flat).
    ``start`` / ``floor`` (``train.warmup_start_lr`` / ``train.min_lr``): the cosine curves warm
    up from ``start`` and end at ``floor`` instead of 0 (``warmup_cosine_floor``).

    ``stage_starts``: rounds at which training restarts its schedule (a method's coarse-to-fine
    stages, e.g. Adam's): each stage runs the curve above over its own rounds, warm-up included.
    The default ``(0,)`` is one stage over all ``epochs``.

    ``unit="step"`` (``train.total_steps`` / ``train.warmup_steps``): ``warmup`` and ``epochs`` count
    optimiser steps, and the curve is evaluated at e = global_iter + 1, so step 0 runs at base/W and
    the last step (e = total) at the floor: the warm-up cosine of papers that count steps (Swin
    UNETR SSL: 500 of 100k; VoCo: 100 of 100k). ``epoch_cosine`` has no meaning there (refused).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: Kind,
        base: float,
        warmup: int,
        epochs: int,
        iters_per_round: int,
        start: float = 0.0,
        floor: float = 0.0,
        stage_starts: tuple[int, ...] = (0,),
        unit: Literal["round", "step"] = "round",
    ) -> None:
        if unit not in ("round", "step"):
            raise ValueError(f"schedule unit {unit!r}: 'round' or 'step'")
        if unit == "step" and kind == "epoch_cosine":
            raise ValueError("a step schedule has no rounds: use iter_cosine or constant, not epoch_cosine")
        if unit == "step" and tuple(stage_starts) != (0,):
            raise ValueError(
                f"stage_starts {stage_starts}: a method with stages counts rounds; use train.epochs, "
                "not train.total_steps"
            )
        if not stage_starts or stage_starts[0] != 0 or list(stage_starts) != sorted(set(stage_starts)):
            raise ValueError(f"stage_starts {stage_starts}: increasing rounds beginning at 0")
        if stage_starts[-1] >= epochs:
            raise ValueError(f"stage_starts {stage_starts}: every stage needs a round of the {epochs}")
        self.stage_starts = tuple(int(s) for s in stage_starts)
        self.optimizer = optimizer
        self.kind = kind
        self.base = float(base)
        self.warmup = int(warmup)
        self.epochs = int(epochs)
        self.iters_per_round = max(1, int(iters_per_round))
        self.start = float(start)
        self.floor = float(floor)
        self.unit = unit
        self.last_lr = float("nan")

    def _cosine(self, e: float, epochs: int) -> float:
        if self.start == 0.0 and self.floor == 0.0:  # the ASA curve, kept op for op (golden runs)
            return warmup_cosine(self.base, e, self.warmup, epochs)
        return warmup_cosine_floor(self.base, e, self.warmup, epochs, self.start, self.floor)

    def stage_of(self, round_: int) -> tuple[int, int]:
        """(first round, number of rounds) of the stage holding ``round_``."""
        starts = self.stage_starts
        i = max(j for j, s in enumerate(starts) if s <= round_)
        end = starts[i + 1] if i + 1 < len(starts) else self.epochs
        return starts[i], end - starts[i]

    def value(self, round_: int, global_iter: int) -> float:
        if self.unit == "step":  # warmup and epochs count optimiser steps
            e = global_iter + 1
            if self.kind == "iter_cosine":
                return self._cosine(e, self.epochs)
            return self.base * (min(1.0, e / self.warmup) if self.warmup > 0 else 1.0)
        epochs = self.epochs
        if len(self.stage_starts) > 1:  # positions relative to the stage's start
            start, epochs = self.stage_of(round_)
            round_, global_iter = round_ - start, global_iter - start * self.iters_per_round
        if self.kind == "epoch_cosine":
            return self._cosine(round_ + 1, epochs)
        if self.kind == "iter_cosine":
            return self._cosine((global_iter + 1) / self.iters_per_round, epochs)
        e = round_ + 1
        return self.base * (min(1.0, e / self.warmup) if self.warmup > 0 else 1.0)

    def step(self, round_: int, global_iter: int) -> float:
        lr = self.value(round_, global_iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.last_lr = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base": self.base,
            "warmup": self.warmup,
            "epochs": self.epochs,
            "iters_per_round": self.iters_per_round,
            "start": self.start,
            "floor": self.floor,
            "last_lr": self.last_lr,
            **({"stage_starts": list(self.stage_starts)} if len(self.stage_starts) > 1 else {}),
            **({"unit": "step"} if self.unit == "step" else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The schedule comes from the (possibly edited) config; only the last value is restored.
        self.last_lr = float(state.get("last_lr", float("nan")))

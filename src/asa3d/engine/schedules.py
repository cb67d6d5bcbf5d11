"""Learning-rate schedules (research/asa.md §7).

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


class LRSchedule:
    """Sets the LR of every param group from (round, global iteration).

    ``epoch_cosine``: the curve above, set once per round (e = round + 1).
    ``iter_cosine``: the same curve evaluated at e = (global_iter + 1) / iters_per_round.
    ``constant``: linear warm-up over ``warmup`` rounds, then ``base`` (warmup 0: flat).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: Kind,
        base: float,
        warmup: int,
        epochs: int,
        iters_per_round: int,
    ) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.base = float(base)
        self.warmup = int(warmup)
        self.epochs = int(epochs)
        self.iters_per_round = max(1, int(iters_per_round))
        self.last_lr = float("nan")

    def value(self, round_: int, global_iter: int) -> float:
        if self.kind == "epoch_cosine":
            return warmup_cosine(self.base, round_ + 1, self.warmup, self.epochs)
        if self.kind == "iter_cosine":
            return warmup_cosine(
                self.base, (global_iter + 1) / self.iters_per_round, self.warmup, self.epochs
            )
        e = round_ + 1
        return self.base * (min(1.0, e / self.warmup) if self.warmup > 0 else 1.0)

    def step(self, round_: int, global_iter: int) -> float:
        lr = self.value(round_, global_iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_lr = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base": self.base,
            "warmup": self.warmup,
            "epochs": self.epochs,
            "iters_per_round": self.iters_per_round,
            "last_lr": self.last_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The schedule comes from the (possibly edited) config; only the last value is restored.
        self.last_lr = float(state.get("last_lr", float("nan")))

"""The optimisation step shared by pretraining (``engine.trainer``) and fine-tuning (``eval.finetune``).

One function, :func:`optimisation_step`, does what every training step needs: forward each
micro-batch under autocast, check its loss terms are finite, backward through the GradScaler,
average gradients (and the logged scalars, the bad-step flag, a stop request) across ranks in one
all-reduce, unscale, measure and clip the gradient norm, step the optimiser and run the post-step
hook (a student-teacher method's EMA update), or skip all of it when anything was non-finite.
:class:`NonFinitePolicy` is the common answer to a skipped step (count it, stop after
``train.max_bad_steps`` in a row), and :func:`install_stop_handlers` turns SIGTERM/SIGINT into a
stop at the next step boundary. docs/architecture.md "The optimisation step".
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asa3d.engine.distributed import DistEnv, average_gradients
from asa3d.engine.precision import autocast

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` consecutive non-finite steps; the last good checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT (e.g. SLURM pre-emption): a checkpoint was written at the step boundary."""


@dataclass
class StepOutcome:
    """What one step did. ``terms`` are the loss terms (``"loss"`` first) averaged over
    micro-batches and ranks; ``bad_terms`` is empty for a good step."""

    terms: dict[str, float]
    bad_terms: list[str] = field(default_factory=list)
    grad_norm: float | None = None
    lr: float | None = None  # what ``before_step`` returned
    stepped: bool = False  # the optimiser changed the weights (False: skipped, or fp16 overflow)
    stop: bool = False  # some rank asked to stop (SIGTERM/SIGINT), learned through the all-reduce
    after: dict[str, float] = field(default_factory=dict)  # what ``after_step`` returned (scalars)

    @property
    def bad(self) -> bool:
        return bool(self.bad_terms)


def optimisation_step(
    micro_batches: Sequence[Any],
    forward: Callable[[Any], Mapping[str, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: Sequence[torch.nn.Parameter],
    precision: str,
    env: DistEnv,
    grad_clip: float | None = None,
    prepare: Callable[[int, Any], Any] | None = None,
    before_step: Callable[[], float | None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    after_step: Callable[[], Mapping[str, float] | None] | None = None,
) -> StepOutcome:
    """One optimiser step over ``micro_batches`` (gradient accumulation: their mean).

    ``prepare(m, batch)`` runs outside autocast (seeding, moving to the device, augmentation) and
    returns what ``forward`` gets; ``forward(batch)`` runs under autocast and returns the loss terms,
    ``"loss"`` being the one differentiated. ``before_step()`` runs only when the step is taken,
    just before ``optimizer.step`` (pretraining sets the LR there). Every rank must call this with
    the same number of micro-batches; the gradients present after backward must be the same set.
    ``stop_requested()`` is asked after backward, so a signal that arrived during this step stops
    every rank after it. ``after_step()`` (the EMA hook) runs right after the optimiser changed
    the weights, and never for a skipped step (non-finite terms or gradients, fp16 overflow); the
    scalars it returns are in ``outcome.after``. The step decides identically on every rank
    (gradients, flags and the GradScaler's inf check are all-reduced), so the hook may use
    collectives (e.g. gather a MoCo queue's keys).
    """
    optimizer.zero_grad(set_to_none=True)  # so parameters a step does not use keep no gradient
    names: list[str] = []
    sums: torch.Tensor | None = None
    bad_local: list[str] = []
    for m, batch in enumerate(micro_batches):
        if prepare is not None:
            batch = prepare(m, batch)
        with autocast(precision, env.device):
            out = forward(batch)
        terms = {"loss": out["loss"], **{k: v for k, v in out.items() if k != "loss"}}
        vals = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        finite = torch.isfinite(vals)
        if not bool(finite.all()):
            flags = zip(terms, finite.tolist(), strict=True)
            bad_local += [k for k, ok in flags if not ok and k not in bad_local]
        names = list(terms)
        sums = vals if sums is None else sums + vals
        scaler.scale(out["loss"] / len(micro_batches)).backward()
    if sums is None:
        raise ValueError("optimisation_step: no micro-batches")
    means = (sums / len(micro_batches)).tolist()
    stop_flag = float(bool(stop_requested and stop_requested()))
    reduced = average_gradients(params, env, extra=[*means, float(bool(bad_local)), stop_flag])
    term_vals, bad_any, stop = reduced[:-2], reduced[-2] > 0, reduced[-1] > 0
    outcome = StepOutcome(terms=dict(zip(names, term_vals, strict=False)), stop=stop)

    grads = [p for p in params if p.grad is not None]
    if not bad_any and grads:
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in grads])
        outcome.grad_norm = float(gnorm)
        if not math.isfinite(outcome.grad_norm) and not scaler.is_enabled():
            bad_local, bad_any = ["grad_norm"], True  # identical on all ranks (grads are averaged)
        elif grad_clip:
            torch.nn.utils.clip_grads_with_norm_([p.grad for p in grads], grad_clip, gnorm)
    if bad_any:
        outcome.bad_terms = bad_local or ["<on another rank>"]
        return outcome
    if before_step is not None:
        outcome.lr = before_step()
    if scaler.is_enabled():
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        outcome.stepped = scaler.get_scale() >= before  # a drop in scale means inf grads: skipped
    else:
        optimizer.step()
        outcome.stepped = True
    if outcome.stepped and after_step is not None:
        outcome.after = {k: float(v) for k, v in (after_step() or {}).items()}
    return outcome


class NonFinitePolicy:
    """Skipped steps in a row: warn and log each, raise :class:`TrainingDiverged` at ``max_bad``.

    ``last_checkpoint()`` names the file the error points the user to (the good state to go back to).
    """

    def __init__(
        self,
        max_bad: int,
        last_checkpoint: Callable[[], Path | None],
        is_main: bool = True,
        logger: Any = None,
    ) -> None:
        self.max_bad, self.last_checkpoint = max_bad, last_checkpoint
        self.is_main, self.logger = is_main, logger
        self.streak = 0

    def good(self) -> None:
        self.streak = 0

    def bad(self, iteration: int, terms: Sequence[str], where: str, skipped: str, **event: Any) -> None:
        """Record a skipped step at ``iteration`` (``where``: e.g. "phase rec"; ``skipped``: what
        was not done); raises once ``max_bad`` steps in a row were bad."""
        self.streak += 1
        msg = (
            f"non-finite {', '.join(terms)} at iteration {iteration} ({where}): step skipped "
            f"({skipped}); {self.streak}/{self.max_bad} in a row"
        )
        if self.is_main:
            log.warning(msg)
            if self.logger:
                self.logger.event(iteration, "bad_step", terms=list(terms), streak=self.streak, **event)
        if self.streak >= self.max_bad:
            last = self.last_checkpoint()
            raise TrainingDiverged(
                f"{self.streak} consecutive non-finite steps (last: {', '.join(terms)} in {where} at "
                f"iteration {iteration}); stopping. Last good checkpoint: {last or 'none written yet'}. "
                "Lower train.lr, use train.grad_clip, or try precision fp32."
            )


def install_stop_handlers(request_stop: Callable[[int], None]) -> dict[int, Any]:
    """SIGTERM/SIGINT call ``request_stop(signum)`` (the loop then checkpoints at the next step
    boundary and exits), which is what SLURM pre-emption and Ctrl-C need. Returns the previous
    handlers for :func:`restore_handlers`; a no-op off the main thread (signals cannot be set there)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda signum, frame: request_stop(signum))
    return previous


def restore_handlers(previous: Mapping[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a signal on another rank"

"""The contract every self-supervised method meets, so one engine can train all of them.

A method is an ``nn.Module`` that owns its student, heads and (optionally) EMA teacher. The
engine (``asa3d.engine.trainer``) owns everything else: data order, optimiser, LR schedule,
precision, distributed gradient averaging, checkpoints, logging, health monitors.

Checklist for adding a method (see docs/methods/adding_a_method.md):
1. ``methods/<name>.py``: a ``Config`` dataclass and a ``PretrainMethod`` subclass, registered
   with ``@register_method``; its losses as pure functions in ``methods/<name>_losses.py``.
2. View generators as pure batched tensor functions in ``views/``.
3. ``configs/pretrain/<name>.yaml`` (paper scale) and ``<name>_tiny.yaml`` (CPU).
4. Tests: views (invariants), losses (values on known inputs), gradient routing, a tiny run whose
   loss goes down, export loadable into a plain MONAI SwinUNETR.
5. ``docs/methods/<name>.md``: the method, its paper-vs-code switches, its tables.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from asa3d.config_sections import ModelConfig


@dataclass(frozen=True)
class SampleSpec:
    """What the data loader must deliver to the method for one phase.

    ``whole``: every volume whole (a list of (1, X, Y, Z) tensors of varying shape; the method
    resizes on the device). ``crop``: random crops of ``crop_size`` (padded if the volume is
    smaller), stacked into (B, 1, *crop_size).
    """

    mode: Literal["whole", "crop"] = "whole"
    crop_size: tuple[int, int, int] | None = None


@dataclass
class StepOutput:
    """One micro-batch's result: the total loss to back-propagate and each named term (detached
    copies are logged; a non-finite term is reported by name)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class PretrainMethod(nn.Module, abc.ABC):
    """Base class of all pretraining methods."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object  # the method's own dataclass (keys under ``method:``)

    def __init__(self, cfg: Any, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model_cfg = model_cfg

    # ---- what the engine asks -------------------------------------------------------------
    @abc.abstractmethod
    def phases(self) -> list[str]:
        """Names of the phases of one round, in order (e.g. ``["P1", "P2"]``)."""

    def sample_spec(self, phase: str) -> SampleSpec:
        return SampleSpec()

    @abc.abstractmethod
    def training_step(self, batch: Mapping[str, Any], phase: str) -> StepOutput:
        """Forward one micro-batch of ``phase`` and return its loss. ``batch["image"]`` is on the
        training device (see ``SampleSpec``). Runs under the engine's autocast context."""

    def on_round_start(self, round_index: int, total_rounds: int) -> None:
        """Called at the start of every round (0-based), also when a run resumes mid-round.
        For schedules that change per round (coarse-to-fine stages, queue warm-up): derive the
        state from ``round_index`` alone, so a resumed run sets exactly what an uninterrupted one did."""

    def on_step_end(self, phase: str, global_iter: int, total_iters: int) -> dict[str, float]:
        """Called after every optimiser step (EMA updates go here). Returns scalars to log."""
        return {}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimiser updates (the student and its heads, never a teacher)."""
        return (p for p in self.parameters() if p.requires_grad)

    @abc.abstractmethod
    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to transfer downstream, keyed exactly as a plain MONAI ``SwinUNETR``'s
        ``state_dict()`` (the teacher for student-teacher methods). Heads are not included."""

    def transfer_parts(self) -> dict[str, bool]:
        """Which parts of the SwinUNETR this method actually trains (for results tables)."""
        return {"swinViT": True, "encoders": True, "decoder": True}

    def monitor_embeddings(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Embeddings for health monitors, e.g. ``{"teacher": (B, D), "student": (B, D)}``.
        Empty when the method has nothing to monitor. Called under ``torch.no_grad``."""
        return {}

    def backbone_kwargs(self, out_channels: int = 1) -> dict[str, Any]:
        return self.model_cfg.swinunetr_kwargs(out_channels)


METHODS: dict[str, type[PretrainMethod]] = {}


def register_method(cls: type[PretrainMethod]) -> type[PretrainMethod]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name`")
    METHODS[cls.name] = cls
    return cls


def build_method(method_section: Mapping[str, Any], model_cfg: ModelConfig) -> PretrainMethod:
    """Instantiate the method named by ``method_section["name"]`` with its validated config."""
    from asa3d.config import ConfigError, from_dict
    from asa3d.methods import load_builtin_methods

    load_builtin_methods()
    section = dict(method_section)
    name = section.pop("name", None)
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not a known method. Known: {sorted(METHODS)}.")
    cls = METHODS[name]
    cfg = from_dict(cls.Config, section, where="method")
    return cls(cfg, model_cfg)

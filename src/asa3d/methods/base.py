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
   loss goes down, export loadable (strict) into the plain network of ``backbone_spec()``.
5. ``docs/methods/<name>.md``: the method, its paper-vs-code switches, its tables.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from asa3d.config_sections import ModelConfig
from asa3d.data.sampling import SampleSpec  # re-exported: the data layer owns it
from asa3d.engine.param_groups import ParamGroup, decay_groups
from asa3d.methods.dist_context import DistContext
from asa3d.models.backbones.spec import BackboneSpec


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
        self.dist = DistContext()  # replaced by the engine with the run's (all_gather etc.)

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

    def stage_starts(self, total_rounds: int) -> tuple[int, ...]:
        """Rounds (0-based, the first 0) at which a new training stage begins, for curricula
        trained as a chain of runs (Adam's coarse-to-fine stages): there the engine restarts the
        LR schedule and clears the optimiser state (as a new optimiser would start); the method
        state (weights, queues) carries on. Default: one stage."""
        return (0,)

    def on_step_end(self, phase: str, global_iter: int, total_iters: int) -> dict[str, float]:
        """The optimisation step's post-step hook: called right after every optimiser step that
        changed the weights, never after a skipped one (EMA updates and queues go here). Every
        rank calls it alike, so collectives (``self.dist``) are allowed. Returns scalars to log."""
        return {}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimiser updates (the student and its heads, never a teacher)."""
        return (p for p in self.parameters() if p.requires_grad)

    # norms and biases out of weight decay (SimMIM-style); off where the paper decays everything
    no_decay_on_norm_and_bias: ClassVar[bool] = False

    def param_groups(self, weight_decay: float) -> list[ParamGroup]:
        """Optimiser groups over ``trainable_parameters()``, each with its weight decay and LR
        scale (the schedule multiplies ``train.lr x lr_scale``). Override for layer-wise decay
        or a faster head; ``asa3d.engine.param_groups.decay_groups`` does the usual split."""
        params = list(self.trainable_parameters())
        if not self.no_decay_on_norm_and_bias:
            return [ParamGroup("all", params, weight_decay, 1.0)]
        return decay_groups(self, weight_decay, only=params)

    def backbone_spec(self) -> BackboneSpec:
        """The network whose weights ``transfer_state_dict()`` holds (class, kwargs, named parts,
        head). Recorded in every checkpoint and export; the default is MONAI's SwinUNETR built
        from the ``model:`` section."""
        from asa3d.models.backbones.swinunetr import swinunetr_spec

        return swinunetr_spec(self.model_cfg, 1)

    @abc.abstractmethod
    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to transfer downstream, keyed exactly as the plain network of
        ``backbone_spec()`` (the teacher for student-teacher methods). Heads are not included."""

    def transfer_parts(self) -> dict[str, bool]:
        """Which parts of ``backbone_spec().parts`` this method actually trains (for results
        tables and probes: an untrained part holds random weights). Every part must be named."""
        return {p: True for p in self.backbone_spec().parts}

    def buffer_policy(self) -> dict[str, str]:
        """How each buffer is kept across ranks: ``{name_prefix: "broadcast" | "sync_bn" |
        "gathered" | "local"}`` (see ``asa3d.methods.dist_context``). Undeclared buffers are
        broadcast from rank 0 after every step."""
        return {}

    def monitor_embeddings(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Embeddings for health monitors, e.g. ``{"teacher": (B, D), "student": (B, D)}``.
        Empty when the method has nothing to monitor. Called under ``torch.no_grad``."""
        return {}

    def image_summaries(self, batch: Mapping[str, Any], phase: str) -> dict[str, torch.Tensor]:
        """2D pictures of what the method sees and makes, ``{"input": (H, W), ...}`` in [0, 1],
        written to TensorBoard every ``train.image_every`` iterations. Called under
        ``torch.no_grad`` with the RNG state forked, so drawing views here changes nothing in
        training. Empty by default."""
        return {}

    def backbone_kwargs(self, out_channels: int = 1) -> dict[str, Any]:
        """Kept for callers: the kwargs of ``backbone_spec()`` with ``out_channels`` outputs."""
        return dict(self.backbone_spec().with_outputs(out_channels).kwargs)


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

"""ASA (Pang et al., MICCAI 2024), implemented from the paper; see docs/methods/asa.md.

A round is an ordered list of phases. Each phase has a view generator and a subset of tasks:
- ``shuffle`` (F_perm, whole volume resized to S^3, sub-volumes shuffled): ``sop`` (order
  prediction), ``var`` (appearance recovery), ``gc`` (global consistency with the teacher);
- ``related_crops`` (F_src, volume resized to S + M*p, two grid-aligned S^3 crops): ``gc`` and
  ``lc`` (local consistency of the shared sub-volumes).

Every head reads the stage-k hidden state, one token per p^3 sub-volume (p=16 -> stage 3). Only
P1 with ``var`` runs the decoder; everything else runs the encoder up to stage k only, so the
gradient of each term reaches exactly the parameters listed in docs/methods/asa.md ("The method").
The teacher is an EMA copy of the whole student (heads included), always in eval mode, never
given a gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.data.sampling import SampleSpec
from asa3d.methods.asa_losses import (
    appearance_loss,
    consistency_loss,
    order_loss_1d,
    order_loss_1d_ce,
    order_loss_3d,
)
from asa3d.methods.base import StepOutput, register_method
from asa3d.methods.student_teacher import StudentTeacherMethod
from asa3d.models.backbones.swinunetr import (
    SwinBackbone,
    encoder_parameter_names,
    stage_for_subvolume,
    swin_stage_parts,
    tap_channels,
)
from asa3d.models.heads import OrderHead, Projector
from asa3d.views.related_crops import CropPair, related_crops
from asa3d.views.resize import resize_volumes
from asa3d.views.shuffle import ShuffleResult, shuffle_blocks

__all__ = ["ASA", "ASAConfig", "ASANetwork", "PhaseConfig"]

Task = Literal["sop", "var", "gc", "lc"]
View = Literal["shuffle", "related_crops"]
VIEW_TASKS: dict[str, frozenset[str]] = {
    "shuffle": frozenset({"sop", "var", "gc"}),
    "related_crops": frozenset({"gc", "lc"}),
}


@dataclass
class PhaseConfig:
    """One phase of a round: a view generator and the tasks computed on it."""

    name: str
    view: View
    tasks: list[Task]

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError(
                f"method.phases: phase {self.name!r} has no tasks; remove the phase instead "
                "(a config with no P1 task has no P1 pass)."
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"method.phases: phase {self.name!r} lists a task twice: {self.tasks}")
        bad = sorted(set(self.tasks) - VIEW_TASKS[self.view])
        if bad:
            raise ConfigError(
                f"method.phases: phase {self.name!r} (view {self.view}) cannot run task(s) {bad}; "
                f"view {self.view} supports {sorted(VIEW_TASKS[self.view])}."
            )


def _default_phases() -> list[PhaseConfig]:
    return [
        PhaseConfig("P1", "shuffle", ["sop", "var", "gc"]),
        PhaseConfig("P2", "related_crops", ["gc", "lc"]),
    ]


@dataclass
class ASAConfig:
    """Keys under ``method:`` (with ``name: asa``). Defaults follow the paper (docs/methods/asa.md,
    "Configuration")."""

    phases: list[PhaseConfig] = field(default_factory=_default_phases)  # S11 (full ASA)
    order_target: Literal["3d", "1d"] = "3d"
    order_1d_loss: Literal["mse", "ce"] = "mse"  # 1d only: scalar regression or N-way CE
    perm_ratio: float = 1.0  # fraction of sub-volumes shuffled (reference code: always 1)
    subvolume_size: int = 16  # p; the tap is stage log2(p / patch_size)
    input_size: int = 128  # S: P1 volume and P2 crop size
    p2_max_offset_cells: int = 2  # M: crop offsets in {0..M} cells, S2 = S + M*p
    resize_mode: Literal["area", "trilinear"] = "area"
    global_proj_dim: int = 8192
    local_proj_dim: int = 512
    p1_teacher_input: Literal["original", "permuted"] = "original"  # code: permuted
    ema_momentum_start: float = 0.9  # code: 0.999
    ema_scope: Literal["paper", "all"] = "paper"  # code: all
    local_normalize: bool = True  # code: false (unnormalised local embeddings)
    p2_symmetric: bool = False  # code: true (global 1/2 + local 1/4 per direction)
    consistency_reduction: Literal["sum", "mean"] = "sum"  # code: mean
    lambda_vop: float = 1.0
    lambda_var: float = 1.0
    lambda_global: float = 1.0
    lambda_local: float = 1.0

    @property
    def grid(self) -> int:
        return self.input_size // self.subvolume_size

    @property
    def p2_size(self) -> int:
        return self.input_size + self.p2_max_offset_cells * self.subvolume_size

    def tasks(self) -> set[str]:
        return {t for ph in self.phases for t in ph.tasks}

    def validate(self) -> None:
        p, s = self.subvolume_size, self.input_size
        if not self.phases:
            raise ConfigError("method.phases: at least one phase is required.")
        names = [ph.name for ph in self.phases]
        if len(set(names)) != len(names):
            raise ConfigError(f"method.phases: phase names must be unique, got {names}")
        if p not in (4, 8, 16, 32):
            raise ConfigError(f"method.subvolume_size={p}: must be one of 4, 8, 16, 32.")
        if s % 32:
            raise ConfigError(f"method.input_size={s}: SwinUNETR needs a multiple of 32 (e.g. 64, 96, 128).")
        if s % p:
            raise ConfigError(f"method.input_size={s} must be divisible by method.subvolume_size={p}.")
        g = s // p
        if g < 2:
            raise ConfigError(
                f"method.input_size={s} / subvolume_size={p} gives G={g} sub-volume per axis; need >= 2."
            )
        if "var" in self.tasks() and s < 64:
            raise ConfigError(
                f"method.input_size={s}: task var runs the SwinUNETR decoder, whose bottleneck InstanceNorm "
                "needs at least 2 voxels per axis at stage 4; use input_size >= 64."
            )
        if not 0 <= self.p2_max_offset_cells < g:
            raise ConfigError(
                f"method.p2_max_offset_cells={self.p2_max_offset_cells}: must lie in [0, G-1] = [0, {g - 1}] "
                f"(G = input_size/subvolume_size = {g}), or the two crops may not overlap."
            )
        if not 0.0 < self.perm_ratio <= 1.0:
            raise ConfigError(f"method.perm_ratio={self.perm_ratio}: must lie in (0, 1].")
        if not 0.0 <= self.ema_momentum_start <= 1.0:
            raise ConfigError(f"method.ema_momentum_start={self.ema_momentum_start}: must lie in [0, 1].")
        for key in ("global_proj_dim", "local_proj_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be positive.")
        for key in ("lambda_vop", "lambda_var", "lambda_global", "lambda_local"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: loss weights must be >= 0.")


class ASANetwork(nn.Module):
    """Backbone (SwinUNETR, out_channels=1) plus the heads the configured tasks need."""

    def __init__(self, model_cfg: ModelConfig, cfg: ASAConfig, stage: int) -> None:
        super().__init__()
        tasks = cfg.tasks()
        c = tap_channels(model_cfg.feature_size, stage)
        n = cfg.grid**3
        self.backbone = SwinBackbone(model_cfg, out_channels=1)
        if "sop" in tasks:
            out = 3 if cfg.order_target == "3d" else (1 if cfg.order_1d_loss == "mse" else n)
            self.order_head = OrderHead(c, out)
        if "gc" in tasks:
            self.global_proj = Projector(c, cfg.global_proj_dim)
        if "lc" in tasks:
            self.local_proj = Projector(c, cfg.local_proj_dim)

    def tokens(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Encoder-only forward to ``stage``: (B, N, C) tokens in raster order (axis 2 fastest)."""
        return _flat(self.backbone.encode(x, stage)[stage])


def _flat(h: torch.Tensor) -> torch.Tensor:
    """(B, C, G, G, G) -> (B, N, C) with token t = (i0*G + i1)*G + i2."""
    return h.flatten(2).transpose(1, 2)


@register_method
class ASA(StudentTeacherMethod):
    """Anatomical consistency, sub-volume spatial relationships and appearance (ASA)."""

    name = "asa"
    Config = ASAConfig

    def __init__(self, cfg: ASAConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        if model_cfg.in_channels != 1:
            raise ConfigError(f"model.in_channels={model_cfg.in_channels}: ASA pretrains on 1-channel CT.")
        try:
            self.stage = stage_for_subvolume(cfg.subvolume_size, model_cfg.patch_size)
        except ValueError as exc:
            raise ConfigError(f"method.subvolume_size: {exc}") from None
        self.init_teacher(ASANetwork(model_cfg, cfg, self.stage))
        self._phase = {ph.name: ph for ph in cfg.phases}

    # ---- contract --------------------------------------------------------------------------
    def phases(self) -> list[str]:
        return [ph.name for ph in self.cfg.phases]

    def sample_spec(self, phase: str) -> SampleSpec:
        return SampleSpec(mode="whole")

    def phase_config(self, phase: str) -> PhaseConfig:
        if phase not in self._phase:
            raise ValueError(f"ASA has no phase {phase!r}; phases are {self.phases()}")
        return self._phase[phase]

    def training_step(self, batch: Mapping[str, Any], phase: str) -> StepOutput:
        ph = self.phase_config(phase)
        images = batch["image"]
        cfg = self.cfg
        if ph.view == "shuffle":
            x = resize_volumes(images, cfg.input_size, cfg.resize_mode)
            return self.shuffle_step(x, shuffle_blocks(x, cfg.subvolume_size, cfg.perm_ratio), ph.tasks)
        big = resize_volumes(images, cfg.p2_size, cfg.resize_mode)
        pair = related_crops(big, cfg.input_size, cfg.subvolume_size, cfg.p2_max_offset_cells)
        return self.crops_step(pair, ph.tasks)

    # ---- phase computations (public so tests/benchmarks can feed fixed views) ---------------
    def shuffle_step(self, x: torch.Tensor, sh: ShuffleResult, tasks: Sequence[str]) -> StepOutput:
        """F_perm phase: order prediction, appearance recovery, global consistency."""
        cfg = self.cfg
        net = self.student
        terms: dict[str, torch.Tensor] = {}
        loss = x.new_zeros(())
        # Only appearance recovery needs the decoder (and layers4 when the tap is stage 3).
        if "var" in tasks:
            recon, hidden = net.backbone.forward_full(sh.x_perm)
            tok = _flat(hidden[self.stage])
            terms["var"] = appearance_loss(recon, x)
            loss = loss + cfg.lambda_var * terms["var"]
        elif "sop" in tasks or "gc" in tasks:
            tok = net.tokens(sh.x_perm, self.stage)
        if "sop" in tasks:
            pred = net.order_head(tok)
            if cfg.order_target == "3d":
                terms["vop"] = order_loss_3d(pred, sh.target3d)
            elif cfg.order_1d_loss == "mse":
                terms["vop"] = order_loss_1d(pred, sh.target1d)
            else:
                terms["vop"] = order_loss_1d_ce(pred, sh.perm)
            loss = loss + cfg.lambda_vop * terms["vop"]
        if "gc" in tasks:
            z_s = net.global_proj(tok.mean(1))
            with torch.no_grad():
                t_in = x if cfg.p1_teacher_input == "original" else sh.x_perm
                z_t = self.teacher.global_proj(self.teacher.tokens(t_in, self.stage).mean(1))
            terms["global"] = consistency_loss(z_s, z_t, True, cfg.consistency_reduction)
            loss = loss + cfg.lambda_global * terms["global"]
        return StepOutput(loss=loss, terms=terms)

    def crops_step(self, pair: CropPair, tasks: Sequence[str]) -> StepOutput:
        """F_src phase: student on crop 1 vs teacher on crop 2 (both directions if symmetric)."""
        cfg = self.cfg
        sym = cfg.p2_symmetric
        # Symmetric: one batched pass per network; rows [s(C1); s(C2)] meet [t(C2); t(C1)].
        s_in = torch.cat([pair.crop1, pair.crop2]) if sym else pair.crop1
        t_in = torch.cat([pair.crop2, pair.crop1]) if sym else pair.crop2
        s_mask = torch.cat([pair.mask1, pair.mask2]) if sym else pair.mask1
        t_mask = torch.cat([pair.mask2, pair.mask1]) if sym else pair.mask2
        h_s = self.student.tokens(s_in, self.stage)
        with torch.no_grad():
            h_t = self.teacher.tokens(t_in, self.stage)
        terms: dict[str, torch.Tensor] = {}
        loss = h_s.new_zeros(()).float()
        if "gc" in tasks:
            z_s = self.student.global_proj(h_s.mean(1))
            with torch.no_grad():
                z_t = self.teacher.global_proj(h_t.mean(1))
            # Mean over 2B rows = (G12 + G21) / 2: each direction weighs 1/2 when symmetric.
            terms["global"] = consistency_loss(z_s, z_t, True, cfg.consistency_reduction)
            loss = loss + cfg.lambda_global * terms["global"]
        if "lc" in tasks:
            u_s = self.student.local_proj(h_s[s_mask])  # (P, D) rows paired with u_t
            with torch.no_grad():
                u_t = self.teacher.local_proj(h_t[t_mask])
            terms["local"] = consistency_loss(u_s, u_t, cfg.local_normalize, cfg.consistency_reduction)
            # Both directions share P pairs, so the pooled mean is (L12 + L21) / 2; the code's
            # symmetric form weighs each local direction 1/4, hence the extra 1/2.
            loss = loss + cfg.lambda_local * (0.5 if sym else 1.0) * terms["local"]
        return StepOutput(loss=loss, terms=terms)

    def image_summaries(self, batch: Mapping[str, Any], phase: str) -> dict[str, torch.Tensor]:
        """Middle axial slices of the first volume: F_perm's input, permuted view and (with
        appearance recovery) the student's reconstruction; F_src's two related crops."""
        ph, cfg = self.phase_config(phase), self.cfg
        images = batch["image"][:1]

        def mid(v: torch.Tensor) -> torch.Tensor:
            return v[0, 0, :, :, v.shape[-1] // 2]

        if ph.view == "shuffle":
            x = resize_volumes(images, cfg.input_size, cfg.resize_mode)
            sh = shuffle_blocks(x, cfg.subvolume_size, cfg.perm_ratio)
            out = {"input": mid(x), "permuted": mid(sh.x_perm)}
            if "var" in ph.tasks:
                out["reconstruction"] = mid(self.student.backbone.forward_full(sh.x_perm)[0])
            return out
        big = resize_volumes(images, cfg.p2_size, cfg.resize_mode)
        pair = related_crops(big, cfg.input_size, cfg.subvolume_size, cfg.p2_max_offset_cells)
        return {"crop1": mid(pair.crop1), "crop2": mid(pair.crop2)}

    # ---- EMA -------------------------------------------------------------------------------
    def ema_prefixes(self, phase: str) -> tuple[str, ...] | None:
        """Student parameter-name prefixes the EMA updates after a step of ``phase`` (None: all)."""
        ph = self.phase_config(phase)
        if self.cfg.ema_scope == "all" or ph.view == "shuffle":
            return None  # P1 trains encoder + decoder (+ heads); asa3d updates all of it
        enc = tuple("backbone.net." + n for n in encoder_parameter_names(self.stage, self.model_cfg.use_v2))
        return enc + ("global_proj.", "local_proj.")

    # ---- transfer / monitoring ---------------------------------------------------------------
    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        """The TEACHER's SwinUNETR weights, every key including the 1-channel ``out`` conv; the
        export/fine-tune side drops ``out.*`` when its out_channels differ. Heads excluded."""
        return self.teacher.backbone.swinunetr_state_dict()

    def transfer_parts(self) -> dict[str, bool]:
        """Order and consistency tasks train the Swin stages up to the tap; layers beyond it, the
        UNETR conv blocks and the decoder learn only from appearance recovery (L_var)."""
        var = "var" in self.cfg.tasks()
        tapped = set(swin_stage_parts(self.stage))
        return {p: var or p in tapped for p in self.backbone_spec().parts}

    @torch.no_grad()
    def monitor_embeddings(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Global embeddings of teacher and student on the un-permuted S^3 volumes (the global
        projector output when ``gc`` is trained, else the l2-normalised token mean)."""
        x = resize_volumes(batch["image"], self.cfg.input_size, self.cfg.resize_mode)
        out = {}
        for key, net in (("teacher", self.teacher), ("student", self.student)):
            pooled = net.tokens(x, self.stage).mean(1)
            out[key] = (
                net.global_proj(pooled)
                if hasattr(net, "global_proj")
                else nn.functional.normalize(pooled, dim=-1)
            )
        return out

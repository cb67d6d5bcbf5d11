"""Linear probing, two ways (docs/evaluation.md, "fine-tune vs probe vs strict linear probe").

What is frozen comes from the backbone spec (``asa3d.models.backbones``), never from a network
name here:

- ``probe`` (the paper's "linear probing"): the spec's encoder parts are frozen (and kept in eval
  mode), everything else (skip-path blocks, decoder, head) is trained. Not linear: for the default
  backbone at feature size 48 about 54 M of 62 M parameters still train (docs/evaluation.md).
  Option ``freeze_encoders``: also freeze the spec's skip-path parts (``BackboneSpec.skip_parts``).
- ``strict_linear``: a truly linear probe. The frozen multi-scale encoder features the spec
  declares (``BackboneSpec.feature_tap``) are upsampled to the input grid, concatenated, and one
  1x1(x1) convolution maps them to class logits. Only that convolution trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from asa3d.models.backbones import BackboneSpec


def frozen_parts(spec: BackboneSpec, mode: str, freeze_encoders: bool = False) -> list[str]:
    """The spec parts a training ``mode`` keeps fixed (their weights are used as loaded)."""
    if mode == "finetune":
        return []
    if mode == "strict_linear":
        return list(spec.encoder)
    if mode == "probe":
        return list(spec.encoder) + (list(spec.skip_parts()) if freeze_encoders else [])
    raise ValueError(f"unknown training mode {mode!r}: finetune | probe | strict_linear")


def freeze_for_probe(model: nn.Module, spec: BackboneSpec, freeze_encoders: bool = False) -> list[str]:
    """Freeze the encoder parts of ``spec`` (and optionally its skip-path parts); returns the
    frozen parameter names."""
    prefixes = spec.prefixes(frozen_parts(spec, "probe", freeze_encoders))
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def frozen_modules(model: nn.Module) -> list[str]:
    """The outermost submodules all of whose parameters are frozen: kept in eval mode while the
    rest trains (no dropout, no drop path, no running-statistics update in a fixed part)."""
    out: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(o + ".") for o in out):
            continue
        params = list(mod.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name)
    return out


class StrictLinearProbe(nn.Module):
    """1x1(x1) convolution over the upsampled, concatenated frozen encoder features of the spec."""

    def __init__(
        self,
        backbone: nn.Module,
        spec: BackboneSpec,
        out_channels: int,
        stages: Sequence[int] = (0, 1, 2, 3, 4),
    ) -> None:
        super().__init__()
        tap = spec.feature_tap()
        self._tap = tap
        self.add_module(tap.attr, getattr(backbone, tap.attr))  # its keys stay the network's
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.stages = tuple(int(s) for s in stages)
        n = len(tap.channels)
        if not self.stages or min(self.stages) < 0 or max(self.stages) >= n:
            raise ValueError(f"strict probe stages {list(stages)} must be a non-empty subset of 0..{n - 1}")
        conv = {3: nn.Conv3d, 2: nn.Conv2d}[spec.spatial_dims]
        self._resize = {3: "trilinear", 2: "bilinear"}[spec.spatial_dims]
        self.head = conv(sum(tap.channels[s] for s in self.stages), out_channels, kernel_size=1)

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self._tap.attr)

    def train(self, mode: bool = True) -> StrictLinearProbe:
        super().train(mode)
        self.encoder.eval()  # frozen features: deterministic
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hs = self._tap.forward(self.encoder, x)
            feats = [
                F.interpolate(hs[s], size=x.shape[2:], mode=self._resize, align_corners=False)
                for s in self.stages
            ]
        return self.head(torch.cat(feats, dim=1))


def trainable_parameters(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def prepare_model(
    model: nn.Module,
    spec: BackboneSpec,
    mode: str,
    freeze_encoders: bool = False,
    stages: Sequence[int] = (0, 1, 2, 3, 4),
) -> nn.Module:
    """``finetune``: the model as is; ``probe``: its encoder frozen; ``strict_linear``: the 1x1x1
    probe over its encoder features (``spec`` is the network's backbone spec)."""
    if mode == "finetune":
        return model
    if mode == "probe":
        freeze_for_probe(model, spec, freeze_encoders)
        return _ProbeWrapper(model)
    if mode == "strict_linear":
        return StrictLinearProbe(model, spec, spec.out_channels, stages)
    raise ValueError(f"unknown training mode {mode!r}: finetune | probe | strict_linear")


class _ProbeWrapper(nn.Module):
    """The network with its frozen parts kept in eval mode; state-dict keys stay the network's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._frozen = frozen_modules(model)

    def train(self, mode: bool = True) -> _ProbeWrapper:
        super().train(mode)
        for name in self._frozen:
            self.model.get_submodule(name).eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

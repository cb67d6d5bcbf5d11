"""Parameter groups a method hands the optimiser: each with its own LR scale and weight decay.

The LR schedule multiplies each group's base rate (``train.lr x lr_scale``) instead of
overwriting it, so a head can learn faster than the backbone, or deeper layers faster than
shallow ones (layer-wise decay), and norms and biases can be kept out of weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

# modules whose affine parameters are conventionally not decayed (e.g. SimMIM, MAE, BEiT)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


@dataclass
class ParamGroup:
    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    weight_decay: float = 0.0
    lr_scale: float = 1.0

    def as_optimizer_group(self, base_lr: float) -> dict:
        return {
            "params": self.params,
            "weight_decay": self.weight_decay,
            "lr": base_lr * self.lr_scale,
            "lr_scale": self.lr_scale,
            "name": self.name,
        }


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters of norm layers and of every bias (and other 1-d parameters)."""
    out = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, NORM_TYPES) or p_name == "bias" or p.ndim <= 1:
                out.add(full)
    return out


def decay_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    skip_norm_and_bias: bool = True,
    lr_scale: Callable[[str], float] | None = None,
    only: Iterable[nn.Parameter] | None = None,
) -> list[ParamGroup]:
    """Group ``model``'s trainable parameters by (decay, LR scale).

    ``skip_norm_and_bias``: norm weights and biases get no weight decay. ``lr_scale(name)``:
    a per-parameter LR multiplier (layer-wise decay); parameters with equal scale share a group.
    ``only``: restrict to these parameters (e.g. a method's ``trainable_parameters()``)."""
    allowed = None if only is None else {id(p) for p in only}
    skip = no_decay_names(model) if skip_norm_and_bias else set()
    groups: dict[tuple[bool, float], ParamGroup] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (allowed is not None and id(p) not in allowed):
            continue
        decay = name not in skip
        scale = float(lr_scale(name)) if lr_scale else 1.0
        key = (decay, scale)
        if key not in groups:
            label = ("decay" if decay else "no_decay") + (f"@{scale:g}" if lr_scale else "")
            groups[key] = ParamGroup(label, [], weight_decay if decay else 0.0, scale)
        groups[key].params.append(p)
    return list(groups.values())


def build_optimizer(
    kind: str, groups: list[ParamGroup], base_lr: float, momentum: float = 0.9, amsgrad: bool = False
) -> torch.optim.Optimizer:
    dicts = [g.as_optimizer_group(base_lr) for g in groups if g.params]
    if kind == "sgd":
        if amsgrad:
            raise ValueError("amsgrad is an AdamW option; optimizer 'sgd' has none")
        return torch.optim.SGD(dicts, lr=base_lr, momentum=momentum)
    if kind == "adamw":
        return torch.optim.AdamW(dicts, lr=base_lr, amsgrad=amsgrad)
    raise ValueError(f"unknown optimizer {kind!r}: sgd | adamw")

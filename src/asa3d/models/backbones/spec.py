"""What a method declares about its network, so the engine, the export and the fine-tuning side
never need to know which network it is.

A ``BackboneSpec`` names the network class and its keyword arguments, the named parts of its
``state_dict`` (part -> key prefixes), the task head a downstream user replaces, the encoder parts
a probe freezes, and the spatial dims. It is recorded in every checkpoint and export sidecar
(``to_dict``) and read back with ``BackboneSpec.from_dict``; ``check_transfer`` verifies that a
state dict loads into a fresh network with nothing but the head unmatched.

Each network family lives in one module beside this one (``swinunetr.py``, ``resnet.py``) and
registers a ``BackboneKind``: how to adapt kwargs to the installed library and which parts it has,
and optionally what the downstream side asks of it: the input sizes it accepts
(``check_input``), the multi-scale features a strict linear probe reads (``features``), the parts
on its skip paths (``skip``) and what a refused weight load says about the source (``explain``).
The fine-tuning, probing, transfer and prediction code asks the spec; it never names a network.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class BackboneError(Exception):
    """A state dict or recorded spec does not fit the network (the message lists what)."""


@dataclass(frozen=True)
class FeatureTap:
    """The multi-scale features of a network's encoder, as a strict linear probe reads them."""

    attr: str  # the encoder submodule (the probe keeps it under this name: its keys stay the network's)
    channels: tuple[int, ...]  # channels of each scale, finest first
    forward: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]  # (encoder, x) -> one map per scale


@dataclass(frozen=True)
class BackboneKind:
    """One network family: class path, kwargs adapter, parts and head as functions of kwargs."""

    name: str
    network: str  # import path of the class, e.g. "monai.networks.nets.SwinUNETR"
    adapt: Callable[[dict[str, Any]], dict[str, Any]]  # kwargs as the installed library names them
    parts: Callable[[Mapping[str, Any]], dict[str, tuple[str, ...]]]
    head: tuple[str, ...]  # key prefixes of the task head (never transferred)
    encoder: tuple[str, ...]  # part names that form the encoder (what a probe freezes)
    out_key: str  # the kwarg setting the head's output channels / classes
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # coarse name -> parts
    skip: tuple[str, ...] = ()  # parts on the skip paths (``probe.freeze_encoders`` freezes them too)
    # kwargs that change neither the weights nor what the trained network computes (dropout rates,
    # gradient checkpointing, attention kernels): a pretraining and its fine-tuning may differ there
    training_only: tuple[str, ...] = ()
    # (kwargs, spatial size) -> why the network cannot take that input, or None
    check_input: Callable[[Mapping[str, Any], Sequence[int]], str | None] | None = None
    features: Callable[[Mapping[str, Any]], FeatureTap] | None = None  # for the strict linear probe
    # (source state, model state) -> what the source is, where a load was refused ("feature size 48")
    explain: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], list[str]] | None = None
    # a network that embeds another family as its encoder (a U-Net on a ResNet): (that family, the
    # kwargs of the embedded network as that family names them, its key -> our key or None to drop)
    embeds: tuple[str, Callable[[Mapping[str, Any]], dict[str, Any]], Callable[[str], str | None]] | None = (
        None
    )
    # (options of the ``network:`` config section, outputs) -> kwargs: how a downstream config names it
    from_options: Callable[[Mapping[str, Any], int], dict[str, Any]] | None = None


KINDS: dict[str, BackboneKind] = {}
DEFAULT_BACKBONE = "swinunetr"  # what the ``model:`` config section describes

# other programs' checkpoint layouts a family can read: (source kind, detect(keys), key -> our key)
LAYOUTS: list[tuple[str, Callable[[Any], bool], Callable[[str], str | None]]] = []


def register_layout(kind: str, detect: Callable[[Any], bool], rename: Callable[[str], str | None]) -> None:
    LAYOUTS.append((kind, detect, rename))


def convert_known_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str] | None:
    """A state dict in a registered foreign layout -> (our keys, source kind); None otherwise.
    Keys without a counterpart are kept as ``<unmapped>key`` so they are reported, not lost."""
    _load_kinds()
    for kind, detect, rename in LAYOUTS:
        if detect(tensors.keys()):
            out = {}
            for k, v in tensors.items():
                nk = rename(k)
                out[nk if nk else f"<unmapped>{k}"] = v
            return out, kind
    return None


def default_spec(model_cfg: Any, out_channels: int) -> BackboneSpec:
    """The backbone the ``model:`` section describes, with ``out_channels`` outputs."""
    from asa3d.models.backbones.swinunetr import swinunetr_spec

    return swinunetr_spec(model_cfg, out_channels)


def network_spec(name: str, options: Mapping[str, Any], out: int) -> BackboneSpec:
    """The downstream network a config names (``network.name`` + ``network.options``) with ``out``
    outputs (classes or label channels)."""
    kind = kind_of(name)
    if kind.from_options is None:
        raise BackboneError(
            f"backbone {name} cannot be built from network.options; known: {downstream_names()}"
        )
    try:
        kwargs = kind.from_options(dict(options), int(out))
    except (TypeError, ValueError) as exc:
        raise BackboneError(f"network.name={name}: {exc}") from None
    return BackboneSpec.create(name, kwargs)


def downstream_names() -> list[str]:
    _load_kinds()
    return sorted(k.name for k in KINDS.values() if k.from_options is not None)


def register_backbone(kind: BackboneKind) -> BackboneKind:
    KINDS[kind.name] = kind
    return kind


def _load_kinds() -> None:
    # the built-in families register themselves on import
    from asa3d.models.backbones import resnet, swinunetr  # noqa: F401


def kind_of(name: str) -> BackboneKind:
    _load_kinds()
    if name not in KINDS:
        raise BackboneError(f"unknown backbone {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def _json_safe(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _show(xs: list[str]) -> str:
    return f"{len(xs)} {xs[:8]}{' ...' if len(xs) > 8 else ''}"


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    network: str
    kwargs: dict[str, Any]
    spatial_dims: int
    parts: dict[str, tuple[str, ...]]
    head: tuple[str, ...]
    encoder: tuple[str, ...]
    out_key: str = "out_channels"
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, kwargs: Mapping[str, Any]) -> BackboneSpec:
        kind = kind_of(name)
        try:
            kw = kind.adapt(dict(kwargs))
        except TypeError as exc:
            raise BackboneError(str(exc)) from None
        kw = {k: _json_safe(v) for k, v in kw.items()}
        return cls(
            name=name,
            network=kind.network,
            kwargs=kw,
            spatial_dims=int(kw.get("spatial_dims", 3)),
            parts={p: tuple(v) for p, v in kind.parts(kw).items()},
            head=tuple(kind.head),
            encoder=tuple(kind.encoder),
            out_key=kind.out_key,
            groups={g: tuple(v) for g, v in kind.groups.items()},
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "checkpoint") -> BackboneSpec:
        """Read a recorded spec; a record of only ``class`` + ``kwargs`` (older checkpoints) is
        completed from the family registered for that class."""
        name = d.get("name")
        if name is None:
            _load_kinds()
            by_class = {k.network: k.name for k in KINDS.values()}
            name = by_class.get(str(d.get("class")))
            if name is None:
                raise BackboneError(f"{where}: backbone class {d.get('class')!r} is not a known backbone")
        return cls.create(name, d.get("kwargs", {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": self.network,
            "kwargs": dict(self.kwargs),
            "spatial_dims": self.spatial_dims,
            "parts": {p: list(v) for p, v in self.parts.items()},
            "head": list(self.head),
            "encoder": list(self.encoder),
        }

    def with_outputs(self, n: int) -> BackboneSpec:
        """The same network with an ``n``-channel (or ``n``-class) head."""
        return BackboneSpec.create(self.name, {**self.kwargs, self.out_key: int(n)})

    def network_class(self) -> type[nn.Module]:
        module, _, cls = self.network.rpartition(".")
        return getattr(importlib.import_module(module), cls)

    def build(self) -> nn.Module:
        try:
            return self.network_class()(**self.kwargs)
        except TypeError as exc:
            raise BackboneError(
                f"cannot build {self.network} from the recorded kwargs {self.kwargs}: {exc}"
            ) from None

    # ---- what the downstream side asks -------------------------------------------------
    @property
    def kind(self) -> BackboneKind:
        return kind_of(self.name)

    @property
    def out_channels(self) -> int:
        return int(self.kwargs[self.out_key])

    def skip_parts(self) -> tuple[str, ...]:
        return tuple(self.kind.skip)

    def check_input_size(self, size: Sequence[int], where: str) -> None:
        """Raise ``BackboneError`` naming ``where`` when the network cannot take inputs of ``size``."""
        rule = self.kind.check_input
        problem = rule(self.kwargs, [int(s) for s in size]) if rule else None
        if problem:
            raise BackboneError(f"{where}={[int(s) for s in size]}: {problem}")

    def feature_tap(self) -> FeatureTap:
        if self.kind.features is None:
            raise BackboneError(
                f"backbone {self.name} declares no multi-scale encoder features, so the strict linear "
                "probe cannot read it; use mode=probe or mode=finetune."
            )
        return self.kind.features(self.kwargs)

    def explain_mismatch(self, source: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]) -> str:
        """What the source is where it differs from this network (empty when nothing is known)."""
        found = self.kind.explain(source, model) if self.kind.explain else []
        return ("The source has " + "; ".join(found) + ". ") if found else ""

    def differences(self, other: BackboneSpec) -> list[str]:
        """How ``other`` (e.g. the spec a pretraining recorded) differs from this one, head size and
        training-only kwargs aside: ``["network ... vs ..."]``, ``["feature_size 48 vs 12"]``, ..."""
        mine, theirs, ignore = self.kwargs, other.kwargs, {self.out_key, *self.kind.training_only}
        embedded = self.kind.embeds
        if embedded is not None and other.name == embedded[0]:  # the source is our encoder's family
            mine, ignore = embedded[1](self.kwargs), {other.out_key, *other.kind.training_only}
        elif other.name != self.name or other.network != self.network:
            return [f"network {other.name} ({other.network}) vs {self.name} ({self.network})"]
        keys = sorted((set(mine) | set(theirs)) - ignore)
        return [
            f"{k} {theirs.get(k, '(unset)')} vs {mine.get(k, '(unset)')}"
            for k in keys
            if theirs.get(k) != mine.get(k)
        ]

    def adopts(self, recorded: Mapping[str, Any] | None) -> bool:
        """Whether a source that recorded ``recorded`` (a spec dict) is this network's encoder family."""
        embedded = self.kind.embeds
        return embedded is not None and bool(recorded) and recorded.get("name") == embedded[0]  # type: ignore[union-attr]

    def adopt(
        self, state: Mapping[str, torch.Tensor], recorded: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        """``state`` in this network's keys: a state of the family this network embeds as its
        encoder (the source's ``recorded`` spec says so) is renamed into the encoder (its head
        dropped); any other state is returned as it is."""
        if not self.adopts(recorded):
            return dict(state)
        embedded = self.kind.embeds
        assert embedded is not None
        out = {}
        for k, v in state.items():
            nk = embedded[2](k)
            if nk is not None:
                out[nk] = v
        return out

    # ---- keys ---------------------------------------------------------------------------
    def is_head_key(self, key: str) -> bool:
        return any(key == p.rstrip(".") or key.startswith(p) for p in self.head)

    def part_of(self, key: str) -> str | None:
        for part, prefixes in self.parts.items():
            if key.startswith(prefixes):
                return part
        return None

    def prefixes(self, parts: list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
        names = self.parts if parts is None else parts
        return tuple(p for n in names for p in self.parts[n])

    def encoder_prefixes(self) -> tuple[str, ...]:
        return self.prefixes(self.encoder)

    def check_parts(self, parts: Mapping[str, bool], source: str) -> dict[str, bool]:
        """``parts`` (a method's ``transfer_parts()``) must name every part of the spec; a coarse
        group name (``swinViT`` for all Swin stages) stands for each of its parts."""
        parts = dict(parts)
        for group, members in self.groups.items():
            if group in parts:
                value = parts.pop(group)
                for m in members:
                    parts.setdefault(m, value)
        unknown = sorted(set(parts) - set(self.parts))
        missing = sorted(set(self.parts) - set(parts))
        if unknown or missing:
            raise BackboneError(
                f"{source}: transfer_parts() must report every part of backbone {self.name} "
                f"{list(self.parts)}; unknown {unknown}, missing {missing}"
            )
        return {p: bool(parts[p]) for p in self.parts}

    # ---- verification -------------------------------------------------------------------
    def check_transfer(
        self, state: Mapping[str, torch.Tensor], source: str = "transfer state"
    ) -> dict[str, list[str]]:
        """Load ``state`` into a fresh network, strictly except the head.

        Returns ``{"matched", "missing", "unexpected", "mismatched"}`` (``missing`` holds only head
        keys). Raises ``BackboneError`` when a backbone key would be dropped, missing, or of the
        wrong shape, so a run cannot produce weights nobody can load."""
        net = self.build()
        ref = net.state_dict()
        matched, unexpected, mismatched = [], [], []
        for k, v in state.items():
            if self.is_head_key(k):
                continue
            if k not in ref:
                unexpected.append(k)
            elif tuple(ref[k].shape) != tuple(v.shape):
                mismatched.append(f"{k}: {tuple(v.shape)} vs {self.name} {tuple(ref[k].shape)}")
            else:
                matched.append(k)
        missing = [k for k in ref if k not in state]
        missing_body = [k for k in missing if not self.is_head_key(k)]
        if unexpected or mismatched or missing_body:
            raise BackboneError(
                f"{source} does not load into a plain {self.network}({self.kwargs}): "
                f"unexpected (would be dropped): {_show(unexpected)}; shape mismatch: {_show(mismatched)}; "
                f"missing backbone keys: {_show(missing_body)}. Only {list(self.head)} may be unmatched."
            )
        body = {k: v for k, v in state.items() if not self.is_head_key(k)}
        result = net.load_state_dict(body, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        return {"matched": sorted(matched), "missing": sorted(missing), "unexpected": [], "mismatched": []}

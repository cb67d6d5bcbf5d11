"""Typed configuration: dataclass schemas, YAML files and dotted command-line overrides.

Every config is a tree of dataclasses. YAML and ``key.sub=value`` overrides are merged as plain
dicts first and validated once against the schema, so an unknown key (in a file or on the
command line) is refused with the list of valid keys, and a wrongly typed value is refused with
its dotted path. No string booleans: ``true``/``false`` are parsed by YAML.

We write this (~200 lines) instead of pulling Hydra/OmegaConf: we need strict refusal with the
valid keys listed, per-method sub-schemas chosen by ``method.name``, and the resolved config
saved as plain YAML; those libraries make the first two awkward.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config file or override does not fit the schema; the message says which key and how to fix it."""


# --------------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Validate ``value`` against type annotation ``tp`` and return the converted value."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)} ({'; '.join(errors)})")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(
                _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def closest(key: str, valid: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """The valid key nearest to a misspelt one (difflib's ratio >= 0.6), or []."""
    return difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.6)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and listing the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hints = [f"{k!r} -> did you mean {m[0]!r}?" for k in unknown if (m := closest(k, fields))]
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}. "
            + (" ".join(hints) + " " if hints else "")
            + f"Valid keys: {sorted(fields)}. Check the spelling, or see docs/configuration.md."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-python (YAML/JSON-safe) view of a config tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------------------------
# files and overrides
# --------------------------------------------------------------------------------------------
def resolve_config_path(path: str | Path) -> Path:
    """Find a config file: as given, else relative to the repository's ``configs/``."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file {path!r} not found (also looked in {CONFIG_DIR}).")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's exponent floats without a dot (``3e-3``, ``1E5``):
    YAML 1.1, which PyYAML implements, reads them as strings, so ``train.lr=3e-3`` was refused
    as "not a float"."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with :class:`YamlLoader`: what every config text goes through."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config; ``_base_: other.yaml`` (relative to this file) is merged underneath."""
    p = resolve_config_path(path)
    try:
        data = load_yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    base = data.pop("_base_", None)
    if base:
        data = deep_merge(read_yaml(p.parent / base), data)
    return data


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.epochs=2)")
    key, raw = text.split("=", 1)
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file plus dotted overrides, validated strictly."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, where=str(path) if path else "config")


def save_config(cfg: Any, path: str | Path) -> Path:
    from asa3d.atomic import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type | Any, prefix: str = "") -> list[str]:
    """One ``key = value  (type)`` line per leaf field, for ``--help`` output and docs.

    ``cls`` is a config class (its dataclass defaults are shown) or a loaded config (its values
    are shown: what a run with that file would use)."""
    obj = None if isinstance(cls, type) else cls
    schema = type(obj) if obj is not None else cls
    lines: list[str] = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines += describe(getattr(obj, f.name) if obj is not None else tp, key + ".")
            continue
        if obj is not None:
            default = to_dict(getattr(obj, f.name))
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = to_dict(f.default_factory())  # type: ignore[misc]
        else:
            default = "<required>"
        lines.append(f"  {key} = {default!r}  ({_type_name(tp)})")
    return lines

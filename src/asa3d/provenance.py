"""Where a result came from: ``provenance.json`` in a run folder.

Written at the end of every run that produces results (``asa3d pretrain``, ``finetune``/``probe``,
the ``evaluate`` grid): asa3d version, git commit, the hash of the run's ``config.yaml``, a data
fingerprint, the date and the device that ran it. ``asa3d report`` shows it. A record whose config
hash no longer matches ``config.yaml`` (the folder was rerun with ``--overwrite`` and the new run
did not finish, or a run from before provenance was recorded) is never shown as the run's: the
report records it anew and says so (``recorded``).

Light on purpose (no torch at import): the engine, the evaluation side and the report use it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from asa3d import __version__

log = logging.getLogger(__name__)

FILE = "provenance.json"
KEYS = ("asa3d version", "git commit", "config hash", "data fingerprint", "date", "device")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def git_commit() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if sha.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def data_fingerprint(root: str | None) -> str:
    """sha256 of a dataset.json, or of a folder's sorted (relative path, size) listing."""
    if not root:
        return "unknown (no data.root recorded)"
    p = Path(root).expanduser()
    if p.is_file():
        try:
            n = sum(len(v) for k, v in json.loads(p.read_text()).items() if isinstance(v, list))
            extra = f", {n} listed cases"
        except (ValueError, AttributeError):
            extra = ""
        return f"sha256 {_sha(p.read_bytes())} of {p.name}{extra}"
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and ".asa3d_cache" not in f.parts)[:100000]
        listing = "\n".join(f"{f.relative_to(p)}\t{f.stat().st_size}" for f in files)
        return f"sha256 {_sha(listing.encode())} of the listing of {len(files)} files"
    return f"unknown ({root} not found)"


def config_hash(run: Path) -> str:
    cfg_file = run / "config.yaml"
    return f"sha256 {_sha(cfg_file.read_bytes())} of config.yaml" if cfg_file.is_file() else "–"


def describe_device(device: Any = None, wanted: str = "auto") -> str:
    """``cuda:0: <GPU name>`` / ``cpu (N threads)`` for the device a run used; without one, what
    the config asked for (resolved on this machine)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return str(device or wanted)
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available():
            return f"{dev}: {torch.cuda.get_device_name(dev)}"
        if dev.type == "cpu":
            return f"cpu ({torch.get_num_threads()} threads)"
        return str(dev)
    if wanted in ("auto", "cuda") or wanted.startswith("cuda"):
        if torch.cuda.is_available():
            return f"{wanted}: {torch.cuda.get_device_name(0)}"
        if wanted == "auto":
            return f"auto: cpu ({torch.get_num_threads()} threads)"
    return wanted


def _config(run: Path) -> dict[str, Any]:
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        return {}
    from asa3d.config import load_yaml

    with contextlib.suppress(yaml.YAMLError, OSError):
        return load_yaml(cfg_file.read_text()) or {}
    return {}


def compute(run: str | Path, device: Any = None, recorded: str = "at the end of the run") -> dict[str, str]:
    run = Path(run)
    cfg = _config(run)
    return {
        "asa3d version": __version__,
        "git commit": git_commit(),
        "config hash": config_hash(run),
        "data fingerprint": data_fingerprint((cfg.get("data") or {}).get("root")),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": describe_device(device, str((cfg.get("train") or {}).get("device", "auto"))),
        "host": os.uname().nodename if hasattr(os, "uname") else "–",
        "recorded": recorded,
    }


def record(run: str | Path, device: Any = None) -> dict[str, str]:
    """Write ``run/provenance.json`` now (the end of a run); returns it."""
    from asa3d.atomic import atomic_write_json

    doc = compute(run, device)
    atomic_write_json(Path(run) / FILE, doc)
    return doc


def read(run: str | Path) -> dict[str, str]:
    """The run's provenance. A missing record, or one made for another ``config.yaml`` than the
    folder holds now, is recorded anew (and says so): a report never shows stale facts."""
    from asa3d.atomic import atomic_write_json

    run = Path(run)
    path = run / FILE
    old: Mapping[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(path.read_text())
    if old and old.get("config hash") == config_hash(run):
        return dict(old)
    why = (
        "by the report: the run recorded none"
        if not old
        else "by the report: config.yaml changed since the run's record (a rerun that did not finish?)"
    )
    if old:
        log.warning("%s: %s; recording it anew", path, why.removeprefix("by the report: "))
    doc = compute(run, recorded=why)
    with contextlib.suppress(OSError):  # a read-only run folder still gets its report elsewhere
        atomic_write_json(path, doc)
    return doc

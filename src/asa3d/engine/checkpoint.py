"""Checkpoints: self-describing, written atomically, read without executing code.

A checkpoint is a dict of tensors and plain python values (see docs/architecture.md
"Checkpoint"), so ``torch.load(weights_only=True)`` reads it and a crafted pickle is refused
before any of its payload runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asa3d.atomic import atomic_write_with, fsync_dir
from asa3d.models.backbones.spec import BackboneError, BackboneSpec

log = logging.getLogger(__name__)

FORMAT = "asa3d-checkpoint/1"
CKPT_PATTERN = re.compile(r"^ckpt_r(\d+)_i(\d+)\.pt$")
LAST = "last.pt"


class CheckpointError(Exception):
    """A checkpoint cannot be read, trusted, resumed from or exported; the message names the file."""


# --------------------------------------------------------------------------------------------
# safe loading
# --------------------------------------------------------------------------------------------
def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Anything that is not tensors and plain containers (e.g. a pickle whose ``__reduce__`` would
    run code) is refused with a ``CheckpointError`` before the payload executes. ``mmap``: map the
    tensors instead of reading them (a cheap check of a large file; zip-format files only).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist.")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(unpickling_message(p, exc)) from None
    except Exception as exc:  # truncated / not a zip / not a torch file / unreadable
        words = _own_words(exc)
        raise CheckpointError(
            f"{p}: not a readable checkpoint ({type(exc).__name__}{': ' + words if words else ''}). "
            "Fix: check the path, or write the file again (it may be truncated or of another format)."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict, found {type(obj).__name__}.")
    return obj


def _own_words(exc: BaseException, limit: int = 200) -> str:
    """An exception's text, quoted in whole sentences up to ``limit`` characters, without torch's
    advice to load with ``weights_only=False`` (asa3d never passes that advice on: it would run
    whatever code the file carries)."""
    text = " ".join(str(exc).split())
    if "weights_only" in text:
        return ""
    kept = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if len(kept) + len(sentence) + 1 > limit:
            break
        kept = f"{kept} {sentence}".strip()
    if not kept and text:  # one long sentence: cut at a word boundary
        kept = text[:limit].rsplit(" ", 1)[0] + " ..."
    return kept


def unpickling_message(path: str | Path, exc: BaseException) -> str:
    """Our message for a file ``torch.load(weights_only=True)`` refused, naming what it found."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return (
            f"{path}: refused to load: it contains a Python object ({found.group(1)}) and not only "
            "tensors and plain values, so loading it could run code. asa3d reads only safe files: use "
            "a checkpoint written by asa3d, a safetensors export, or a plain state dict of tensors."
        )
    return (
        f"{path}: not a readable checkpoint (not a torch file, or corrupt). Fix: check the path, or "
        "write the file again."
    )


def check_format(ckpt: Mapping[str, Any], path: str | Path = "<checkpoint>") -> None:
    fmt = ckpt.get("format")
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path}: format {fmt!r} is not {FORMAT!r} (not an asa3d pretraining checkpoint)."
        )


# --------------------------------------------------------------------------------------------
# atomic writing
# --------------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through ``asa3d.atomic``: ``path`` is either the old file or the complete new
    one; a crash mid-write leaves only a hidden ``.tmp`` file, never named like a checkpoint."""
    return atomic_write_with(path, lambda f: torch.save(obj, f))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src`` atomically: a hard link (no extra bytes) or, failing that, a copy."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Numbered checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CKPT_PATTERN.match(p.name)
        if m:
            found.append((int(m.group(2)), int(m.group(1)), p))
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest numbered checkpoint (``last.pt`` may lag it by one if a kill landed between
    writing the file and re-pointing ``last.pt``), else ``last.pt``."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        return ckpts[-1]
    last = run_dir / LAST
    return last if last.is_file() else None


def save_rotating(
    ckpt: Mapping[str, Any], run_dir: str | Path, round_: int, global_iter: int, keep_last: int
) -> Path:
    """Write ``ckpt_r{round}_i{iter}.pt`` atomically, point ``last.pt`` at it, keep the newest
    ``keep_last`` numbered files."""
    run_dir = Path(run_dir)
    path = atomic_save(dict(ckpt), run_dir / f"ckpt_r{round_:04d}_i{global_iter:08d}.pt")
    _link_or_copy(path, run_dir / LAST)
    fsync_dir(run_dir)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != path:
                with contextlib.suppress(OSError):
                    old.unlink()
    return path


# --------------------------------------------------------------------------------------------
# RNG state as weights_only-safe values
# --------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of ints, None): plain values
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # fewer devices now than when saved
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --------------------------------------------------------------------------------------------
# the declared backbone (checked when pretraining starts, and by export)
# --------------------------------------------------------------------------------------------
def backbone_spec(ckpt: Mapping[str, Any], source: str | Path = "checkpoint") -> BackboneSpec:
    """The ``BackboneSpec`` a checkpoint records (older ones: class + kwargs only)."""
    rec = ckpt.get("backbone")
    if not isinstance(rec, Mapping):
        raise CheckpointError(f"{source}: no backbone record; not an asa3d checkpoint?")
    try:
        return BackboneSpec.from_dict(rec, where=str(source))
    except BackboneError as exc:
        raise CheckpointError(str(exc)) from None


def check_transfer(
    state: Mapping[str, torch.Tensor], spec: BackboneSpec, source: str = "transfer_state_dict()"
) -> dict[str, list[str]]:
    """``spec.check_transfer`` with its refusal as a ``CheckpointError`` naming ``source``."""
    try:
        return spec.check_transfer(state, source=source)
    except BackboneError as exc:
        raise CheckpointError(str(exc)) from None

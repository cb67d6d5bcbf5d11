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
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "asa3d-checkpoint/1"
CKPT_PATTERN = re.compile(r"^ckpt_r(\d+)_i(\d+)\.pt$")
LAST = "last.pt"
SWINUNETR_CLASS = "monai.networks.nets.SwinUNETR"


class CheckpointError(Exception):
    """A checkpoint cannot be read, trusted, resumed from or exported; the message names the file."""


# --------------------------------------------------------------------------------------------
# safe loading
# --------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Anything that is not tensors and plain containers (e.g. a pickle whose ``__reduce__`` would
    run code) is refused with a ``CheckpointError`` before the payload executes.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist.")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{p}: refused to load: it contains objects other than tensors and plain python values "
            f"(a pickle that could run code). Only load checkpoints you trust. Detail: {str(exc)[:300]}"
        ) from None
    except Exception as exc:  # truncated / not a zip / not a torch file
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(exc).__name__}: {exc}).") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict, found {type(obj).__name__}.")
    return obj


def check_format(ckpt: Mapping[str, Any], path: str | Path = "<checkpoint>") -> None:
    fmt = ckpt.get("format")
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path}: format {fmt!r} is not {FORMAT!r} (not an asa3d pretraining checkpoint)."
        )


# --------------------------------------------------------------------------------------------
# atomic writing
# --------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` so that ``path`` is either the old file or the complete new one.

    The bytes go to a hidden temp file in the same directory (same filesystem, so the rename is
    atomic), are fsynced, then ``os.replace``d over the target. A crash mid-write leaves only a
    ``.tmp`` file, which is never named like a checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


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
    _fsync_dir(run_dir)
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
# transfer to a plain MONAI SwinUNETR (checked when pretraining starts, and by export)
# --------------------------------------------------------------------------------------------
def is_output_key(key: str) -> bool:
    return key == "out" or key.startswith("out.")


def check_swinunetr_transfer(
    state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any], source: str = "transfer_state_dict()"
) -> dict[str, list[str]]:
    """Load ``state`` into a fresh ``SwinUNETR(**kwargs)`` strictly except the output layer.

    Returns ``{"matched", "missing", "unexpected", "mismatched"}`` key lists (``missing`` holds
    only ``out.*``). Raises ``CheckpointError`` when any backbone key would be dropped, missing,
    or of the wrong shape, so a run cannot produce weights nobody can load.
    """
    from monai.networks.nets import SwinUNETR

    try:
        net = SwinUNETR(**dict(kwargs))
    except TypeError as exc:
        raise CheckpointError(
            f"cannot build SwinUNETR from the recorded kwargs {dict(kwargs)}: {exc}"
        ) from None
    ref = net.state_dict()
    matched, unexpected, mismatched = [], [], []
    for k, v in state.items():
        if is_output_key(k):
            continue
        if k not in ref:
            unexpected.append(k)
        elif tuple(ref[k].shape) != tuple(v.shape):
            mismatched.append(f"{k}: {tuple(v.shape)} vs SwinUNETR {tuple(ref[k].shape)}")
        else:
            matched.append(k)
    missing = [k for k in ref if k not in state]
    missing_backbone = [k for k in missing if not is_output_key(k)]
    if unexpected or mismatched or missing_backbone:

        def show(xs: list[str]) -> str:
            return f"{len(xs)} {xs[:8]}{' ...' if len(xs) > 8 else ''}"

        raise CheckpointError(
            f"{source} does not load into a plain MONAI SwinUNETR({dict(kwargs)}): "
            f"unexpected (would be dropped): {show(unexpected)}; shape mismatch: {show(mismatched)}; "
            f"missing backbone keys: {show(missing_backbone)}. Only out.* may be unmatched."
        )
    # the strict load itself (minus out.*) is the final word
    body = {k: v for k, v in state.items() if not is_output_key(k)}
    result = net.load_state_dict(body, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return {"matched": sorted(matched), "missing": sorted(missing), "unexpected": [], "mismatched": []}


def monai_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``SwinUNETR`` keyword arguments as the installed MONAI names them (MONAI 1.x spells the
    stochastic depth ``dropout_path_rate``), with tuples as lists so they serialise, so
    ``SwinUNETR(**kwargs)`` works for a reader of the checkpoint or sidecar. Unknown keys are
    refused, naming them."""
    from asa3d.models.backbone import monai_swinunetr_kwargs

    try:
        out = monai_swinunetr_kwargs(dict(kwargs))
    except TypeError as exc:
        raise CheckpointError(str(exc)) from None
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

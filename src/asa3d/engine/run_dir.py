"""The run directory: resolved config, checkpoints, metrics, TensorBoard events."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from asa3d.atomic import atomic_write_text
from asa3d.config import to_dict
from asa3d.engine.checkpoint import CheckpointError, latest_checkpoint

log = logging.getLogger(__name__)


def resolve_resume(run_dir: Path, resume: bool | str | Path | None) -> Path | None:
    """Which checkpoint to resume from.

    ``None`` (default): the run dir's ``last.pt`` if there is one (auto-resume), else fresh.
    ``True``: the run dir's latest checkpoint, which must exist. A path: that checkpoint.
    ``False``: a fresh run; refused if the run dir already holds checkpoints (never clobber).
    """
    existing = latest_checkpoint(run_dir)
    if resume is None:
        return existing
    if resume is False:
        if existing is not None:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints ({existing.name}); refusing to overwrite them. "
                "Resume with --resume, or choose a new --out directory."
            )
        return None
    if resume is True:
        if existing is None:
            raise CheckpointError(f"--resume: no checkpoint found in {run_dir}.")
        return existing
    p = Path(resume)
    if not p.is_file():
        raise CheckpointError(f"--resume {p}: no such checkpoint file.")
    return p


def save_resolved_config(cfg: Any, run_dir: Path) -> Path:
    """Write ``config.yaml``; an earlier, different one (a resumed run with changed overrides) is
    kept as ``config.<timestamp>.yaml`` so the history stays visible."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path.is_file() and path.read_text() != text:
        path.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    return atomic_write_text(path, text)

"""Run logging on rank 0: TensorBoard scalars and a JSONL file with the same numbers."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    """``log(step, {"loss/total": 0.3, ...}, **context)`` appends one JSON line to
    ``metrics.jsonl`` and writes each number as a TensorBoard scalar. Inactive on ranks > 0."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)  # line-buffered: survives a kill
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is a dependency, but keep training without it
                log.warning("tensorboard is not installed; writing metrics.jsonl only")

    def log(self, step: int, scalars: dict[str, float], **context: Any) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()}
        record = {"step": int(step), "time": round(time.time(), 3), **context, **clean}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)

    def image(self, step: int, name: str, picture: Any) -> None:
        """One (H, W) picture in [0, 1] as a TensorBoard image."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(name, picture.detach().float().clamp(0, 1).cpu(), step, dataformats="HW")

    def event(self, step: int, kind: str, **fields: Any) -> None:
        """A non-scalar record (bad step, collapse warning, resume) in the JSONL log."""
        if self.enabled and self._file is not None:
            self._file.write(
                json.dumps({"step": int(step), "time": round(time.time(), 3), "event": kind, **fields}) + "\n"
            )

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._file is not None:
            self._file.close()
            self._file = None

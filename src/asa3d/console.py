"""The console of a verb: one log format for every line, progress bars that log lines do not break.

- Every log record, ours, MONAI's and Python warnings (``logging.captureWarnings``), is written by
  the root handler in ``LOG_FORMAT``; a record of several lines repeats the prefix on each, so a
  log file can be filtered line by line.
- MONAI's ``monai.apps.utils.get_logger`` gives its loggers their own stdout handler and format
  and turns propagation off; loggers under ``FOLDED`` ignore both, so their lines reach the root
  handler in our format (on stderr, like ours).
- ``console()`` wraps a verb in tqdm's ``logging_redirect_tqdm``, so a log line printed while a
  bar is drawn goes above the bar instead of through it. Bars themselves are made with
  ``disable=None`` (drawn only when stderr is a terminal), so a log file holds no carriage
  returns.

Light on purpose (no torch, no MONAI): the CLI imports it before any verb runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
FOLDED = ("monai",)  # libraries whose loggers write through ours


class OneFormat(logging.Formatter):
    """``LOG_FORMAT``, with the prefix repeated on every line of a multi-line record."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if "\n" not in text:
            return text
        empty = {"msg": "", "args": None, "exc_info": None, "exc_text": None, "stack_info": None}
        bare = logging.makeLogRecord({**record.__dict__, **empty})
        prefix = super().format(bare)
        first, *rest = text.splitlines()
        return "\n".join([first, *(prefix + "  " + line for line in rest if line.strip())])


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
        sys.stdout,
        sys.stderr,
        sys.__stdout__,
        sys.__stderr__,
    )


class _FoldedLogger(logging.Logger):
    """A logger of a library in ``FOLDED``: its own console handlers and ``propagate=False`` are
    ignored, so its records reach the root handler (other loggers behave as ``logging.Logger``)."""

    @property
    def propagate(self) -> bool:  # type: ignore[override]
        return True if _folded(self.name) else self.__dict__.get("_propagate", True)

    @propagate.setter
    def propagate(self, value: bool) -> None:
        self.__dict__["_propagate"] = value

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802  logging's own name
        if _folded(self.name) and _is_console(hdlr):
            return
        super().addHandler(hdlr)


def _folded(name: str) -> bool:
    return name.split(".", 1)[0] in FOLDED


def fold_library_loggers() -> None:
    """Route the loggers of ``FOLDED`` libraries through the root handler, those that exist now
    (the library was imported already) and those it creates later."""
    if logging.getLoggerClass() is logging.Logger:
        logging.setLoggerClass(_FoldedLogger)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and _folded(name):
            for h in [h for h in logger.handlers if _is_console(h)]:
                logger.removeHandler(h)
            if type(logger) is logging.Logger:
                keep = logger.__dict__.pop("propagate", True)
                logger.__class__ = _FoldedLogger
                logger.propagate = keep


class _ShortWarning(logging.Filter):
    """A captured warning as ``Category: message (file.py:line)``, without the source-code line
    ``warnings.formatwarning`` puts under it (the process's own ``formatwarning`` is left alone)."""

    _HEAD = re.compile(r"^(?P<path>.*?):(?P<line>\d+): (?P<cat>\w+): (?P<msg>.*)$", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        lines = record.getMessage().rstrip("\n").split("\n")  # logging passes the text as msg
        if len(lines) > 1 and lines[-1].startswith(" "):  # the source line
            lines = lines[:-1]
        m = self._HEAD.match("\n".join(lines))
        if m:
            record.msg, record.args = f"{m['cat']}: {m['msg']} ({Path(m['path']).name}:{m['line']})", None
        return True


def setup_logging(verbose: bool = False) -> None:
    """The one log format on stderr for the whole process, warnings and MONAI's loggers included."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        root.addHandler(handler)
    for h in root.handlers:
        if _is_console(h):
            h.setFormatter(OneFormat(LOG_FORMAT, DATE_FORMAT))
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    if not any(isinstance(f, _ShortWarning) for f in py_warnings.filters):
        py_warnings.addFilter(_ShortWarning())
    fold_library_loggers()


@contextlib.contextmanager
def console() -> Iterator[None]:
    """Log lines go above the progress bars while a verb runs (tqdm's ``logging_redirect_tqdm``)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


def progress_kwargs(enabled: bool = True) -> dict[str, Any]:
    """tqdm arguments every long verb shares: stderr, drawn only on a terminal (``disable=None``),
    never when ``enabled`` is off."""
    return {"file": sys.stderr, "dynamic_ncols": True, "disable": None if enabled else True}

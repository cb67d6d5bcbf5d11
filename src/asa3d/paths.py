"""Checks on the paths a verb will write, made before any long work starts."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def ensure_writable_dir(path: str | Path, what: str = "--out") -> Path:
    """Create ``path`` (a folder) if needed and prove a file can be written in it.

    Raises ``OSError`` with ``filename`` set (the CLI turns it into an exit-2 message naming the
    file and the fix) instead of failing an hour into a run."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{what} must be a folder, but this is a file", str(p))
    for parent in [p, *p.parents]:  # a file anywhere on the way makes the path impossible
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{what}: {parent} is a file, not a folder", str(p))
            break
    p.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".asa3d_write_test.", suffix=".tmp", dir=p)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(p)) from None
    os.close(fd)
    os.unlink(tmp)
    return p

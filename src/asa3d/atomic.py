"""Atomic writes: a file on disk is either its old content or the complete new one.

Every result asa3d writes (checkpoints, exports, caches, tables, predictions, JSON sidecars) goes
through these helpers, so a kill or a full disk mid-write never leaves a truncated file under a
final name. The bytes go to a hidden ``.<name>.<random>.tmp`` in the same directory (same
filesystem, so the rename is atomic), are fsynced, then ``os.replace``d over the target. Stale
``.tmp`` files of a killed run are removed by :func:`remove_stale_tmp`.

- :func:`atomic_open` / :func:`atomic_write_text` / ``_bytes`` / ``_json``: writers that take a
  file object or a string;
- :func:`atomic_write_with`: writers that take a file object (``torch.save``, ``np.save``);
- :func:`atomic_path`: writers that need a path (``savefig``, ``sitk.WriteImage``, ``nib.save``).
  They write into a hidden temp folder beside the target, under the target's own name (so the
  suffix picks the format and a companion file, e.g. MetaImage's ``.raw``, keeps the name its
  header refers to); the files are then renamed into place, the target last.

``tests/test_atomic_writes.py`` parses ``src/`` and fails on a raw write outside this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
_FILE_MODE: int | None = None


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask): ``mkstemp`` creates
    0o600, which would hide results from the other users of a shared machine."""
    global _FILE_MODE
    if _FILE_MODE is None:
        umask = os.umask(0)  # the only portable way to read it; restored at once
        os.umask(umask)
        _FILE_MODE = 0o666 & ~umask
    return _FILE_MODE


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where the platform cannot)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", newline: str | None = None) -> Iterator[IO[Any]]:
    """``with atomic_open(p, "w") as f: f.write(...)``: ``p`` appears only when the block ends
    without an exception; on any exception the temp file is removed and ``p`` is untouched.
    ``newline`` as ``open``'s (text mode; ``""`` for the ``csv`` module)."""
    if mode not in {"w", "wb"}:
        raise ValueError(f"atomic_open writes whole files; mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"newline": newline})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, doc: Any, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(doc, indent=indent))


def atomic_write_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
    """Atomically write whatever ``writer(file_object)`` writes (``torch.save``, ``np.save``...)."""
    with atomic_open(path, "wb") as f:
        writer(f)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: fig.savefig(tmp)``: a path to write to instead of ``p``.

    ``tmp`` has ``p``'s name inside a hidden ``.<name>.<random>.tmp`` folder beside ``p``. When the
    block ends without an exception, every file written into that folder is fsynced and renamed
    into ``p``'s folder (``p`` itself last, so a header never appears before the data it names);
    on an exception the folder is removed and ``p`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp_dir / path.name
        written = sorted((f for f in tmp_dir.iterdir() if f.is_file()), key=lambda f: f.name == path.name)
        if not any(f.name == path.name for f in written):
            raise FileNotFoundError(f"atomic_path: the writer did not create {path.name}")
        for f in written:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, path.parent / f.name)
    finally:
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
    fsync_dir(path.parent)


def remove_stale_tmp(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the hidden ``.*.tmp`` files (and folders) a killed writer left in ``directory``.

    Call it only where no other live process writes into ``directory`` at the same moment."""
    import shutil

    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = "**/.*" + TMP_SUFFIX if recursive else ".*" + TMP_SUFFIX
    removed = []
    for p in directory.glob(pattern):
        with contextlib.suppress(OSError):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed

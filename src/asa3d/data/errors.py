"""The one exception type of the data layer."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A scan, label map or datalist cannot be used. The message names the file and the fix;
    ``asa3d`` prints it without a traceback."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = str(path) if path is not None else None

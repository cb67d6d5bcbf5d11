"""Reading and writing Medical Segmentation Decathlon style ``dataset.json`` files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_dataset_json(
    path: str | Path,
    name: str,
    labels: Mapping[int, str],
    training: Sequence[Mapping[str, str]],
    validation: Sequence[Mapping[str, str]] = (),
    test: Sequence[str | Mapping[str, str]] = (),
    description: str = "",
    modality: str = "CT",
) -> Path:
    """Write an MSD-style dataset.json (atomically). Entries hold paths relative to the json's
    folder; an optional ``id`` per entry is kept (asa3d reads it; other MSD readers ignore it)."""
    p = Path(path)
    doc: dict[str, Any] = {
        "name": name,
        "description": description,
        "modality": {"0": modality},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(training),
        "numTest": len(test),
        "training": [dict(e) for e in training],
        "validation": [dict(e) for e in validation],
        "test": [e if isinstance(e, str) else dict(e) for e in test],
    }
    from asa3d.atomic import atomic_write_json

    return atomic_write_json(p, doc, indent=2)

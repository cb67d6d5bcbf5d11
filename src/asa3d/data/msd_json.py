"""Reading and writing Medical Segmentation Decathlon style ``dataset.json`` files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_dataset_json(
    path: str | Path,
    name: str,
    labels: Mapping[int, str],
    training: Sequence[Mapping[str, str]],
    validation: Sequence[Mapping[str, str]] = (),
    test: Sequence[str] = (),
    description: str = "",
    modality: str = "CT",
) -> Path:
    """Write an MSD-style dataset.json. Entries hold paths relative to the json's folder."""
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
        "test": list(test),
    }
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2))
    return p

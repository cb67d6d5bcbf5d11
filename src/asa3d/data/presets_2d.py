"""2D dataset presets: official download layouts -> datalists with labels and splits.

ChestX-ray14 (NIH, Wang et al. 2017): ``images_001/images/*.png`` ... ``images_012/images/*.png``,
``Data_Entry_2017.csv`` (``Image Index``, ``Finding Labels`` joined by ``|`` or ``No Finding``,
``Patient ID``, ...) and the official patient-wise split lists ``train_val_list.txt`` (86,524
images) and ``test_list.txt`` (25,596). Adam pretrains on train_val only and never touches test.
Items are ``{"image", "id", "patient", "findings"}`` with ``findings`` the ``|``-joined class
names (empty for No Finding); ``multi_hot`` turns them into the 14-class target. Like the 3D
presets, only file names and the CSV are read, no image.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from asa3d.data.datalist import Datalist
from asa3d.data.errors import DataError
from asa3d.data.presets import SPLIT_SEED

log = logging.getLogger(__name__)

__all__ = ["CHESTXRAY14_CLASSES", "PRESETS_2D", "chestxray14", "load_preset_2d", "multi_hot"]

CHESTXRAY14_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
CHESTXRAY14_CSV = "Data_Entry_2017.csv"
CHESTXRAY14_LISTS = {"training": "train_val_list.txt", "test": "test_list.txt"}
CHESTXRAY14_COUNTS = {"training": 86524, "test": 25596}
CHESTXRAY14_TEST_FRACTION = 25596 / 112120  # for the seeded fallback when the lists are missing


def multi_hot(findings: str, classes: Sequence[str] = CHESTXRAY14_CLASSES) -> np.ndarray:
    """``"Effusion|Mass"`` -> float32 vector over ``classes`` (unknown names raise ValueError)."""
    out = np.zeros(len(classes), np.float32)
    index = {c: i for i, c in enumerate(classes)}
    for name in filter(None, findings.split("|")):
        if name == "No Finding":
            continue
        if name not in index:
            raise ValueError(f"unknown finding {name!r}; known: {list(classes)}")
        out[index[name]] = 1.0
    return out


def _read_entries(csv_path: Path) -> dict[str, dict[str, str]]:
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read ({exc}).", csv_path) from None
    need = {"Image Index", "Finding Labels", "Patient ID"}
    if not rows or not need <= set(rows[0]):
        raise DataError(
            f"{csv_path}: expected the columns {sorted(need)} of ChestX-ray14's {CHESTXRAY14_CSV}; "
            "use the file from the official download.",
            csv_path,
        )
    out = {}
    for r in rows:
        findings = "|".join(n for n in r["Finding Labels"].split("|") if n and n != "No Finding")
        unknown = [n for n in filter(None, findings.split("|")) if n not in CHESTXRAY14_CLASSES]
        if unknown:
            raise DataError(f"{csv_path}: row {r['Image Index']} has unknown findings {unknown}.", csv_path)
        out[r["Image Index"]] = {"patient": r["Patient ID"], "findings": findings}
    return out


def _patient_split(names: list[str], patients: dict[str, str]) -> dict[str, list[str]]:
    """Seeded patient-wise split (no patient in both), used only when the official lists are missing."""
    pats = sorted({patients[n] for n in names})
    order = np.random.default_rng(SPLIT_SEED).permutation(len(pats))
    test_p = {pats[i] for i in order[: round(CHESTXRAY14_TEST_FRACTION * len(pats))]}
    return {
        "training": [n for n in names if patients[n] not in test_p],
        "test": [n for n in names if patients[n] in test_p],
    }


def chestxray14(root: Path) -> tuple[dict[str, list[dict[str, str]]], list[str], dict]:
    """(splits, notes, split record) of a ChestX-ray14 download at ``root``."""
    csv_path = next(iter(sorted(root.rglob(CHESTXRAY14_CSV))), None)
    if csv_path is None:
        raise DataError(
            f"{root}: preset 'chestxray14' found no {CHESTXRAY14_CSV}. Point data.root at the download "
            "folder (images_001/images/*.png ... and Data_Entry_2017.csv; see docs/data.md).",
            root,
        )
    entries = _read_entries(csv_path)
    files = {f.name: f.resolve() for f in sorted(root.glob("images*/images/*.png"))}
    if not files:
        raise DataError(
            f"{root}: preset 'chestxray14' found no images_XXX/images/*.png. Extract the image archives "
            "into the download folder.",
            root,
        )
    notes: list[str] = []
    unlisted = sorted(set(files) - set(entries))
    if unlisted:
        raise DataError(
            f"{csv_path}: {len(unlisted)} image(s) on disk have no row (e.g. {unlisted[0]}); is this "
            "the CSV of this download?",
            csv_path,
        )
    missing = len(entries) - len(files)
    if missing:
        notes.append(f"chestxray14: {missing} images of the CSV are not on disk (partial download?)")
    lists = {k: csv_path.parent / v for k, v in CHESTXRAY14_LISTS.items()}
    if all(p.is_file() for p in lists.values()):
        names = {k: [n for n in p.read_text().split() if n in files] for k, p in lists.items()}
        prov = "official train_val_list.txt (training) / test_list.txt (test)"
        for k, n in names.items():
            if len(n) != CHESTXRAY14_COUNTS[k]:
                notes.append(
                    f"chestxray14: {k} has {len(n)} images on disk, the official list {CHESTXRAY14_COUNTS[k]}"
                )
    else:
        names = _patient_split(sorted(files), {n: entries[n]["patient"] for n in files})
        prov = f"ours: seeded ({SPLIT_SEED}) patient-wise split; the official lists were not found"
        notes.append(f"chestxray14: {prov} (put train_val_list.txt and test_list.txt beside the CSV)")
    splits = {
        k: [{"image": str(files[n]), "id": Path(n).stem, **entries[n]} for n in v] for k, v in names.items()
    }
    record = {
        "preset": "chestxray14",
        "provenance": prov,
        **{k: [it["id"] for it in v] for k, v in splits.items()},
    }
    return splits, notes, record


PRESETS_2D: dict[str, Callable[[Path], tuple[dict[str, list[dict[str, str]]], list[str], dict]]] = {
    "chestxray14": chestxray14
}


def load_preset_2d(name: str, root: str | Path, split: str = "training") -> Datalist:
    """A 2D preset's split as a ``Datalist``; ``label_names`` index the ``multi_hot`` classes."""
    if name not in PRESETS_2D:
        raise DataError(f"unknown 2D preset {name!r}. Known: {sorted(PRESETS_2D)}.")
    r = Path(root).expanduser().resolve()
    splits, notes, record = PRESETS_2D[name](r)
    if split == "all":
        items = [it for v in splits.values() for it in v]
    elif split in splits:
        items = splits[split]
    else:
        raise DataError(f"preset {name!r}: unknown split {split!r}; use one of {sorted(splits) + ['all']}.")
    if not items:
        raise DataError(f"{r}: preset {name!r} split {split!r} is empty.", r)
    for n in notes:
        log.info(n)
    return Datalist(
        items=[dict(it) for it in items],
        label_names=dict(enumerate(CHESTXRAY14_CLASSES)),
        name=name,
        split=split,
        root=r,
        source=f"preset:{name}",
        split_record=record,
        notes=notes,
    )

"""Dataset presets: official download layouts of the ASA paper's datasets -> datalists + splits.

A preset only looks at file names (no file is opened), so it is cheap and testable on a fake
layout. Where the paper's case list is public we reproduce it; where it is not, the split is a
seeded deterministic choice recorded in ``Datalist.split_record`` (``ensure_cache`` writes it to
``<cache_dir>/splits/<preset>.json``; pass it back as ``split_file`` to pin it). Provenance of
each split is in docs/data.md.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asa3d.data.datalist import Datalist, load_dataset_json
from asa3d.data.errors import DataError

log = logging.getLogger(__name__)

SPLIT_SEED = 20240501  # fixed: the same download always gives the same split

BTCV_LABELS = {
    0: "background", 1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_vein",
    11: "pancreas", 12: "right_adrenal_gland", 13: "left_adrenal_gland",
}  # fmt: skip
AMOS_LABELS = {
    0: "background", 1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "postcava", 10: "pancreas", 11: "right_adrenal_gland",
    12: "left_adrenal_gland", 13: "duodenum", 14: "bladder", 15: "prostate_uterus",
}  # fmt: skip
LITS_LABELS = {0: "background", 1: "liver", 2: "tumor"}
PANCREAS_LABELS = {0: "background", 1: "pancreas"}
BTCV_TEST_IDS = tuple(f"{i:04d}" for i in range(35, 41))  # Swin UNETR dataset_0.json "validation"
AMOS_MRI_FIRST_ID = 500  # AMOS22 ids >= 500 are MRI


@dataclass
class PresetLayout:
    name: str
    label_names: dict[int, str]
    splits: dict[str, list[dict[str, str]]]  # training / test (+ unlabelled)
    notes: list[str] = field(default_factory=list)
    split_record: dict | None = None


def _nii_files(root: Path, pattern: str) -> dict[str, Path]:
    """Files under ``root`` (recursive) whose name fully matches ``pattern`` (group 1 = case number)."""
    rx = re.compile(pattern, re.IGNORECASE)
    out: dict[str, Path] = {}
    for f in sorted(root.rglob("*")):
        if ".asa3d_cache" in f.parts:
            continue
        m = rx.fullmatch(f.name)
        if m and f.is_file():
            out.setdefault(m.group(1), f.resolve())
    return out


def _need(found: dict, root: Path, preset: str, what: str) -> None:
    if not found:
        raise DataError(
            f"{root}: preset {preset!r} found no {what} here. Point data.root at the dataset's "
            "download folder (see docs/data.md for the expected layout).",
            root,
        )


def _pair(images: dict[str, Path], labels: dict[str, Path], prefix: str = "") -> list[dict[str, str]]:
    return [
        {"id": f"{prefix}{k}", "image": str(images[k]), "label": str(labels[k])}
        for k in sorted(images)
        if k in labels
    ]


def _seeded_test(ids: list[str], n_test: int, seed: int = SPLIT_SEED) -> set[str]:
    order = np.random.default_rng(seed).permutation(len(ids))
    return {sorted(ids)[i] for i in order[:n_test]}


def _seeded_split(pairs: list[dict[str, str]], n_test: int) -> dict[str, list[dict[str, str]]]:
    """``training`` / ``test`` with a seeded choice of ``n_test`` test cases (order kept)."""
    test_ids = _seeded_test([p["id"] for p in pairs], n_test)
    return {
        "training": [p for p in pairs if p["id"] not in test_ids],
        "test": [p for p in pairs if p["id"] in test_ids],
    }


def _record(name: str, splits: dict[str, list[dict[str, str]]], provenance: str) -> dict:
    return {
        "preset": name,
        "seed": SPLIT_SEED,
        "provenance": provenance,
        **{k: [it["id"] for it in v] for k, v in splits.items()},
    }


def _check_count(name: str, split: str, got: int, expected: int, notes: list[str]) -> None:
    if got != expected:
        msg = f"{name}: {split} has {got} cases, the paper uses {expected} (incomplete download?)"
        log.warning(msg)
        notes.append(msg)


# --------------------------------------------------------------------------------------------
def btcv(root: Path) -> PresetLayout:
    """BTCV (Synapse multi-organ): RawData/Training/img/img0001.nii.gz + label/label0001.nii.gz, or
    the flattened imagesTr/labelsTr of MONAI's tutorial. 30 labelled cases: 24 training, 6 test
    (img0035-0040, the 'validation' of Swin UNETR's dataset_0.json); RawData/Testing = unlabelled."""
    images = _nii_files(root, r"img(\d{4})\.nii(?:\.gz)?")
    labels = _nii_files(root, r"label(\d{4})\.nii(?:\.gz)?")
    _need(images, root, "btcv", "img0001.nii.gz-style images")
    pairs = _pair(images, labels, "img")
    splits = {
        "training": [p for p in pairs if p["id"][3:] not in BTCV_TEST_IDS],
        "test": [p for p in pairs if p["id"][3:] in BTCV_TEST_IDS],
        "unlabelled": [{"id": f"img{k}", "image": str(images[k])} for k in sorted(images) if k not in labels],
    }
    notes: list[str] = []
    _check_count("btcv", "training", len(splits["training"]), 24, notes)
    _check_count("btcv", "test", len(splits["test"]), 6, notes)
    return PresetLayout(
        "btcv",
        dict(BTCV_LABELS),
        splits,
        notes,
        _record("btcv", splits, "paper/Swin UNETR dataset_0.json: test = img0035-img0040"),
    )


def _amos(root: Path, ct_only: bool) -> PresetLayout:
    name = "amos22_ct" if ct_only else "amos22_paper"
    tr = _nii_files(root, r"amos_(\d{4})\.nii(?:\.gz)?")
    _need(tr, root, name, "amos_XXXX.nii.gz images")
    by_folder: dict[str, dict[str, Path]] = {
        "imagesTr": {},
        "labelsTr": {},
        "imagesVa": {},
        "labelsVa": {},
        "imagesTs": {},
    }
    for f in root.rglob("amos_*.nii*"):
        m = re.fullmatch(r"amos_(\d{4})\.nii(?:\.gz)?", f.name)
        if m and f.parent.name in by_folder:
            by_folder[f.parent.name][m.group(1)] = f.resolve()

    def keep(k: str) -> bool:
        return not ct_only or int(k) < AMOS_MRI_FIRST_ID

    splits = {
        "training": [
            p for p in _pair(by_folder["imagesTr"], by_folder["labelsTr"], "amos_") if keep(p["id"][5:])
        ],
        "test": [
            p for p in _pair(by_folder["imagesVa"], by_folder["labelsVa"], "amos_") if keep(p["id"][5:])
        ],
        "unlabelled": [
            {"id": f"amos_{k}", "image": str(v)} for k, v in sorted(by_folder["imagesTs"].items()) if keep(k)
        ],
    }
    notes: list[str] = []
    _check_count(name, "training", len(splits["training"]), 200 if ct_only else 240, notes)
    _check_count(name, "test", len(splits["test"]), 100 if ct_only else 120, notes)
    if not ct_only:
        notes.append(
            "amos22_paper includes MRI (ids >= 500): the CT HU window does not suit them; "
            "use amos22_ct for CT only."
        )
    prov = "paper: official imagesTr (training) / imagesVa (test)" + (
        ", CT only (ids < 500): our choice" if ct_only else ", MRI included as published"
    )
    return PresetLayout(name, dict(AMOS_LABELS), splits, notes, _record(name, splits, prov))


def amos22_paper(root: Path) -> PresetLayout:
    """AMOS22 imagesTr (240) / imagesVa (120), MRI included as in the paper."""
    return _amos(root, ct_only=False)


def amos22_ct(root: Path) -> PresetLayout:
    """AMOS22 CT only (ids < 500): 200 / 100."""
    return _amos(root, ct_only=True)


def lits(root: Path) -> PresetLayout:
    """LiTS: volume-N.nii + segmentation-N.nii (official batches) or MSD Task03_Liver liver_N.nii.gz.
    131 labelled; test = 36 seeded cases (the paper's list is not public), training = other 95."""
    images = _nii_files(root, r"volume-(\d+)\.nii(?:\.gz)?") or _nii_files(root, r"liver_(\d+)\.nii(?:\.gz)?")
    labels = _nii_files(root, r"segmentation-(\d+)\.nii(?:\.gz)?")
    if not labels:  # MSD layout: labelsTr/liver_N.nii.gz next to imagesTr/liver_N.nii.gz
        labels = {
            k: v.parent.parent / "labelsTr" / v.name
            for k, v in images.items()
            if (v.parent.parent / "labelsTr" / v.name).is_file()
        }
    _need(images, root, "lits", "volume-N.nii / liver_N.nii.gz images")
    pairs = sorted(_pair(images, labels, "lits_"), key=lambda p: int(p["id"][5:]))
    n_test = min(36, len(pairs) // 4) if len(pairs) < 131 else 36
    splits = {
        **_seeded_split(pairs, n_test),
        "unlabelled": [
            {"id": f"lits_{k}", "image": str(images[k])} for k in sorted(images) if k not in labels
        ],
    }
    notes = [
        "LiTS: the paper's 36 test cases are not public; ours are a seeded choice. The supplement says "
        "94 training cases (Table S2: 96); 131 - 36 = 95 remain, and we train on all 95."
    ]
    _check_count("lits", "test", len(splits["test"]), 36, notes)
    return PresetLayout(
        "lits",
        dict(LITS_LABELS),
        splits,
        notes,
        _record("lits", splits, f"ours: seeded ({SPLIT_SEED}) choice of 36 test cases"),
    )


def _dicom_series_dirs(root: Path, rx: re.Pattern) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(root.rglob("*.dcm")):
        for part in f.parts:
            m = rx.fullmatch(part)
            if m:
                out.setdefault(m.group(1), f.parent.resolve())
                break
    return out


def pancreas_ct(root: Path) -> PresetLayout:
    """TCIA Pancreas-CT: DICOM series under PANCREAS_0001/... (or PANCREAS_0001.nii.gz) and
    label0001.nii.gz labels (TCIA_pancreas_labels). 80 labelled: seeded 64 / 16."""
    rx = re.compile(r"PANCREAS_(\d{4})", re.IGNORECASE)
    images = _nii_files(root, r"PANCREAS_(\d{4})\.nii(?:\.gz)?") or _dicom_series_dirs(root, rx)
    labels = _nii_files(root, r"label(\d{4})\.nii(?:\.gz)?")
    _need(images, root, "pancreas_ct", "PANCREAS_XXXX images or DICOM folders")
    pairs = _pair(images, labels, "pancreas_")
    n_test = round(0.2 * len(pairs))
    splits = _seeded_split(pairs, n_test)
    notes: list[str] = []
    _check_count("pancreas_ct", "training", len(splits["training"]), 64, notes)
    return PresetLayout(
        "pancreas_ct",
        dict(PANCREAS_LABELS),
        splits,
        notes,
        _record("pancreas_ct", splits, f"ours: seeded ({SPLIT_SEED}) 80/20 split"),
    )


def luna16(root: Path) -> PresetLayout:
    """LUNA16 subset0..9/*.mhd: pretraining only (no labels), every scan in 'training'."""
    scans = sorted(
        (f.resolve() for f in root.rglob("*.mhd") if ".asa3d_cache" not in f.parts),
        key=lambda f: (f.parent.name, f.name),
    )
    if not scans:
        raise DataError(
            f"{root}: preset 'luna16' found no .mhd files (expected subset0..subset9/*.mhd).", root
        )
    items = [{"id": f.stem, "image": str(f)} for f in scans]
    notes = []
    if len(items) != 888:
        notes.append(f"luna16: {len(items)} scans found (the full set has 888; the paper reports 843).")
    return PresetLayout("luna16", {}, {"training": items, "test": []}, notes, None)


PRESETS: dict[str, Callable[[Path], PresetLayout]] = {
    "btcv": btcv, "amos22_paper": amos22_paper, "amos22_ct": amos22_ct, "lits": lits,
    "pancreas_ct": pancreas_ct, "luna16": luna16,
}  # fmt: skip


def _apply_split_file(layout: PresetLayout, split_file: Path) -> None:
    try:
        rec = json.loads(split_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{split_file}: cannot read the split file ({exc}).", split_file) from None
    pool = {it["id"]: it for v in layout.splits.values() for it in v}
    new: dict[str, list[dict[str, str]]] = {}
    for key in ("training", "test", "validation", "unlabelled"):
        ids = rec.get(key) or []
        missing = [i for i in ids if i not in pool]
        if missing:
            raise DataError(
                f"{split_file}: ids {missing[:5]} of '{key}' are not in the download at "
                f"{layout.name}'s root.",
                split_file,
            )
        new[key] = [pool[i] for i in ids]
    layout.splits = new
    layout.split_record = {**rec, "provenance": f"{rec.get('provenance', '')} (from {split_file})"}


def load_preset(
    name: str, root: Path, split: str = "training", split_file: str | Path | None = None
) -> Datalist:
    if name == "msd":
        return load_dataset_json(root if root.is_file() else root / "dataset.json", split)
    if name not in PRESETS:
        raise DataError(f"unknown preset {name!r}. Known: {sorted(PRESETS) + ['msd']}.")
    layout = PRESETS[name](root.resolve())
    if split_file:
        _apply_split_file(layout, Path(split_file))
    if split == "validation":  # the paper has no validation set; its held-out cases are 'test'
        split = "test"
        layout.notes.append(
            f"{name}: split 'validation' means the paper's held-out 'test' cases; do not select "
            "models on them."
        )
    if split == "all":
        items = [it for v in layout.splits.values() for it in v]
    elif split in layout.splits:
        items = layout.splits[split]
    else:
        raise DataError(
            f"preset {name!r}: unknown split {split!r}; use one of {sorted(layout.splits) + ['all']}."
        )
    if not items:
        raise DataError(
            f"{root}: preset {name!r} split {split!r} is empty. Check the download layout (docs/data.md).",
            root,
        )
    for n in layout.notes:
        log.info(n)
    return Datalist(
        items=[dict(it) for it in items],
        label_names=layout.label_names,
        name=name,
        split=split,
        root=root,
        source=f"preset:{name}",
        split_record=layout.split_record,
        notes=layout.notes,
    )

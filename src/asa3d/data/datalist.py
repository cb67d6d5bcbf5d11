"""Datalists: which scans (and label maps) make up a dataset split.

Three sources, one result (``Datalist``): an MSD-style ``dataset.json`` (also what
``asa3d.data.msd_json.write_dataset_json`` writes), a plain folder of scans (labels matched by
file name from a second folder), or a dataset preset (``asa3d.data.presets``) that knows an
official download layout and the ASA paper's split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asa3d.data.errors import DataError
from asa3d.data.io import IMAGE_SUFFIXES, case_id_from_path

log = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test", "all")
NNUNET_CHANNEL_SUFFIX = "_0000"  # nnU-Net names single-channel images case_0000.nii.gz


@dataclass
class Datalist:
    """``items``: ``{"image": abs path, "label"?: abs path, "id": str}`` in a fixed order."""

    items: list[dict[str, str]]
    label_names: dict[int, str]
    name: str
    split: str = "training"
    root: Path | None = None
    source: str = ""  # "dataset.json" | "folder" | "preset:<name>"
    split_record: dict[str, Any] | None = None  # a preset's split, to be written beside the cache
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_labels(self) -> bool:
        return bool(self.items) and all("label" in it for it in self.items)

    def write_split(self, path: str | Path) -> Path | None:
        """Write ``split_record`` (a preset's deterministic split) as JSON; None when there is none."""
        if not self.split_record:
            return None
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.split_record, indent=2))
        tmp.replace(p)
        return p


def unique_ids(paths: Sequence[Path]) -> list[str]:
    """Case ids from file names; folders are prefixed where names repeat (e.g. STS_002/CT_image)."""
    ids = [case_id_from_path(p) for p in paths]
    if len(set(ids)) == len(ids):
        return ids
    return [f"{Path(p).parent.name}_{i}" if ids.count(i) > 1 else i for p, i in zip(paths, ids, strict=False)]


# --------------------------------------------------------------------------------------------
# MSD dataset.json
# --------------------------------------------------------------------------------------------
def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _entries(doc: Mapping[str, Any], key: str, base: Path, where: Path) -> list[dict[str, str]]:
    out = []
    for i, e in enumerate(doc.get(key) or []):
        if isinstance(e, str):
            e = {"image": e}
        if not isinstance(e, Mapping) or "image" not in e:
            raise DataError(
                f"{where}: entry {i} of '{key}' must be a path or a mapping with an 'image' key, got {e!r}.",
                where,
            )
        img = e["image"]
        if isinstance(img, list):  # multi-modal MSD tasks list channels; we use CT = first
            img = img[0]
        item = {"image": str(_resolve(base, img))}
        if e.get("label"):
            item["label"] = str(_resolve(base, e["label"]))
        if e.get("id"):
            item["id"] = str(e["id"])
        out.append(item)
    return out


def _finish_ids(items: list[dict[str, str]]) -> list[dict[str, str]]:
    missing = [it for it in items if "id" not in it]
    if missing:
        for it, i in zip(missing, unique_ids([Path(it["image"]) for it in missing]), strict=False):
            it["id"] = i
    ids = [it["id"] for it in items]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(
            f"case ids {dup[:5]} occur more than once in the datalist; give each scan a unique "
            "file name (or an 'id' in the dataset.json)."
        )
    return [
        {"id": it["id"], "image": it["image"], **({"label": it["label"]} if "label" in it else {})}
        for it in items
    ]


def parse_label_names(raw: Mapping[str, Any] | None) -> dict[int, str]:
    """MSD ``{"0": "background", "1": "liver"}`` (also the inverted ``{"liver": 1}`` of nnU-Net v2)."""
    names: dict[int, str] = {}
    for k, v in (raw or {}).items():
        if str(k).lstrip("-").isdigit():
            names[int(k)] = str(v)
        elif isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            names[int(v)] = str(k)
    if names and 0 not in names:
        names[0] = "background"
    return dict(sorted(names.items()))


def load_dataset_json(path: str | Path, split: str = "training") -> Datalist:
    p = Path(path).expanduser().resolve()
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"{p}: dataset.json not found.", p) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{p}: not valid JSON ({exc}). Fix the file (e.g. `python -m json.tool {p.name}`).", p
        ) from None
    if not isinstance(doc, Mapping):
        raise DataError(f"{p}: the top level must be a JSON object with 'training'/'validation'/'test'.", p)
    base = p.parent
    sections = {k: _entries(doc, k, base, p) for k in ("training", "validation", "test")}
    if split == "all":
        seen: set[str] = set()  # a scan listed in two sections is one case
        items = [
            it
            for it in sections["training"] + sections["validation"] + sections["test"]
            if not (it["image"] in seen or seen.add(it["image"]))
        ]
    elif split in sections:
        items = sections[split]
    else:
        raise DataError(f"{p}: unknown split {split!r}; use one of {list(SPLITS)}.", p)
    if not items:
        raise DataError(
            f"{p}: split {split!r} is empty (sections with cases: "
            f"{[k for k, v in sections.items() if v]}). Choose another split (data.split=...).",
            p,
        )
    return Datalist(
        items=_finish_ids(items),
        label_names=parse_label_names(doc.get("labels")),
        name=str(doc.get("name") or p.parent.name),
        split=split,
        root=p,
        source="dataset.json",
    )


def write_datalist_json(
    path: str | Path,
    splits: Mapping[str, Datalist | Sequence[Mapping[str, str]]],
    name: str,
    label_names: Mapping[int, str],
    description: str = "",
) -> Path:
    """Write splits as an MSD dataset.json (paths relative to the json when below it)."""
    from asa3d.data.msd_json import write_dataset_json

    p = Path(path).resolve()

    def rel(s: str) -> str:
        try:
            return "./" + str(Path(s).resolve().relative_to(p.parent))
        except ValueError:
            return str(s)

    def conv(entries) -> list[dict[str, str]]:
        items = entries.items if isinstance(entries, Datalist) else entries
        return [
            {"image": rel(it["image"]), **({"label": rel(it["label"])} if it.get("label") else {})}
            for it in items
        ]

    test = [e["image"] for e in conv(splits.get("test", []))]
    return write_dataset_json(
        p,
        name=name,
        labels=label_names,
        training=conv(splits.get("training", [])),
        validation=conv(splits.get("validation", [])),
        test=test,
        description=description,
    )


# --------------------------------------------------------------------------------------------
# plain folders
# --------------------------------------------------------------------------------------------
def _is_dicom_dir(d: Path) -> bool:
    return any(f.suffix.lower() == ".dcm" for f in d.iterdir() if f.is_file())


def list_scans(folder: Path) -> list[Path]:
    """Scans directly inside ``folder``: image files and DICOM series sub-folders (sorted)."""
    out = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue  # e.g. .asa3d_cache
        if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES) or f.is_dir() and _is_dicom_dir(f):
            out.append(f)
    return out


def load_folder(folder: str | Path, labels: str | Path | None = None, split: str = "training") -> Datalist:
    d = Path(folder).expanduser().resolve()
    if split not in ("training", "all"):
        raise DataError(
            f"{d}: a plain folder has only one split ('training'); got {split!r}. Write a "
            "dataset.json with training/validation/test sections to use others.",
            d,
        )
    scans = list_scans(d)
    if not scans:
        raise DataError(
            f"{d}: no scans found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series "
            "folders directly inside it). Point data.root to the folder that holds them.",
            d,
        )
    items = [{"id": i, "image": str(s)} for s, i in zip(scans, unique_ids(scans), strict=False)]
    if labels:
        ld = Path(labels).expanduser().resolve()
        if not ld.is_dir():
            raise DataError(f"{ld}: label folder not found (data.labels / --labels).", ld)
        by_id = {case_id_from_path(f): f for f in list_scans(ld)}
        missing = []
        for it in items:
            key = it["id"]
            cand = by_id.get(key) or by_id.get(key.removesuffix(NNUNET_CHANNEL_SUFFIX))
            if cand is None:
                missing.append(it["id"])
            else:
                it["label"] = str(cand)
        if missing:
            raise DataError(
                f"{ld}: no label map for {len(missing)} scan(s) ({missing[:5]}...). Labels are "
                "matched by file name (case.nii.gz <-> case.nii.gz, case_0000 <-> case); add "
                "them or drop the scans.",
                ld,
            )
    return Datalist(items=items, label_names={}, name=d.name, split=split, root=d, source="folder")


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def load_datalist(
    root: str | Path | None = None,
    split: str = "training",
    labels: str | Path | None = None,
    preset: str | None = None,
    split_file: str | Path | None = None,
) -> Datalist:
    """A datalist from a dataset.json, a folder (``labels``: folder of label maps), or a ``preset``.

    ``split``: training | validation | test | all. ``split_file``: a split json (as written by a
    preset) to use instead of the preset's own deterministic split.
    """
    if root is None:
        raise DataError(
            "no data given: set data.root (a folder of scans, a dataset.json, or a preset's "
            "download folder), or make a phantom with `asa3d data phantom --out DIR`."
        )
    r = Path(root).expanduser()
    if not r.exists():
        raise DataError(
            f"{r}: not found. data.root must be a folder of scans, a dataset.json, or a preset's "
            "download folder.",
            r,
        )
    if preset and preset != "msd":
        from asa3d.data.presets import load_preset

        return load_preset(preset, r, split=split, split_file=split_file)
    if r.is_file():
        if r.suffix.lower() != ".json":
            raise DataError(
                f"{r}: expected a dataset.json or a folder, got a single file. Put the scans in a "
                "folder (or list them in a dataset.json).",
                r,
            )
        return load_dataset_json(r, split)
    if (r / "dataset.json").is_file() and not labels:
        return load_dataset_json(r / "dataset.json", split)
    if preset == "msd":
        raise DataError(f"{r}: preset 'msd' needs a dataset.json in this folder.", r)
    return load_folder(r, labels=labels, split=split)

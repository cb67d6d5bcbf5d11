"""``asa3d data index``: a dataset.json from any layout, by glob patterns.

``--image "*/CT_image.nii.gz" --label "*/CT_mask.nii.gz"`` under ``ROOT`` pairs
``STS_002/CT_image.nii.gz`` with ``STS_002/CT_mask.nii.gz``: the text the wildcards matched
(``STS_002``) is the case id, for images and labels alike, so pairing needs no naming convention
beyond the patterns. A pattern without wildcards in the varying part falls back to file-name ids
(``datalist.unique_ids``). The result is an MSD ``dataset.json`` that every verb reads.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from asa3d.data.datalist import unique_ids, write_datalist_json
from asa3d.data.errors import DataError
from asa3d.data.io import IMAGE_SUFFIXES, is_dicom_dir


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A glob (``*``, ``?``, ``**``, ``[...]``) as a regex whose groups capture each wildcard."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("((?:[^/]+/)*)")
            i += 3
        elif pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif c == "*":
            out.append("([^/]*)")
            i += 1
        elif c == "?":
            out.append("([^/])")
            i += 1
        elif c == "[":
            j = pattern.find("]", i)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                out.append("(" + pattern[i : j + 1].replace("[!", "[^") + ")")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


def _id_from_groups(groups: tuple[str, ...]) -> str:
    parts = [g.strip("/").replace("/", "_") for g in groups]
    return "_".join(p for p in parts if p)


def match_pattern(root: Path, pattern: str, what: str) -> dict[str, Path]:
    """``{case id: path}`` of every scan under ``root`` matching ``pattern`` (files of a supported
    format, or DICOM series folders)."""
    if Path(pattern).is_absolute():
        raise DataError(
            f"--{what} {pattern!r}: give a pattern relative to ROOT ({root}), e.g. '*/CT.nii.gz'."
        )
    rx = pattern_regex(pattern)
    found = sorted(
        p
        for p in root.glob(pattern)
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
        and ((p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)) or (p.is_dir() and is_dicom_dir(p)))
    )
    if not found:
        raise DataError(
            f"{root}: no scan matches --{what} {pattern!r} (patterns are relative to ROOT; '*' matches "
            "within one folder level, '**/' any depth; files must be .nii/.nii.gz/.mhd/.mha/.nrrd/.nhdr "
            "or DICOM series folders).",
            root,
        )
    ids = []
    for p in found:
        m = rx.fullmatch(p.relative_to(root).as_posix())
        ids.append(_id_from_groups(m.groups()) if m else "")
    if not all(ids) or len(set(ids)) != len(ids):
        ids = unique_ids(found)  # no wildcard in the varying part: file-name ids
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"{root}: --{what} {pattern!r} gives the case id(s) {dup[:5]} twice.", root)
    return dict(zip(ids, found, strict=True))


def parse_label_names_arg(text: str) -> dict[int, str]:
    """``"0=background,1=tumour"`` -> ``{0: "background", 1: "tumour"}``."""
    names: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, name = part.partition("=")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise DataError(
                f"--label-names {text!r}: each item must be INDEX=NAME, e.g. 0=background,1=tumour."
            )
        names[int(key)] = name.strip()
    names.setdefault(0, "background")
    return dict(sorted(names.items()))


def label_names_from_values(labels: Mapping[str, Path]) -> dict[int, str]:
    """``{0: background, k: class_k}`` for every value found in the label maps (each is read)."""
    import numpy as np

    from asa3d.data.io import read_volume

    values: set[int] = {0}
    for path in labels.values():
        arr = read_volume(path).array
        if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
            raise DataError(
                f"{path}: label map holds non-integer values; save class indices as integers.", path
            )
        values |= {int(v) for v in np.unique(arr)}
    return {v: "background" if v == 0 else f"class_{v}" for v in sorted(values)}


@dataclass
class IndexResult:
    path: Path
    training: list[dict[str, str]]
    unlabelled: list[dict[str, str]]
    label_names: dict[int, str]
    notes: list[str] = field(default_factory=list)
    validation: list[dict[str, str]] = field(default_factory=list)


def write_index(
    root: str | Path,
    image: str,
    out: str | Path,
    label: str | None = None,
    label_names: str | Mapping[int, str] | None = None,
    name: str | None = None,
    overwrite: bool = False,
    validation: int = 0,
    seed: int = 0,
) -> IndexResult:
    """Match the patterns under ``root`` and write an MSD dataset.json at ``out``.

    Labelled cases go to ``training``; images without a label (when ``label`` is given) go to
    ``test``. Label names: ``label_names`` (``"0=background,1=tumour"`` or a mapping), else read
    from the label values. ``validation`` labelled cases, drawn by a seeded shuffle, go to
    ``validation`` instead of ``training`` (held out, so fine-tuning reports a Dice on them). An
    existing ``out`` is refused unless ``overwrite``.
    """
    r = Path(root).expanduser().resolve()
    if not r.is_dir():
        raise DataError(f"{r}: ROOT must be a folder.", r)
    dst = Path(out).expanduser().resolve()
    if dst.exists() and not overwrite:
        raise DataError(f"{dst}: exists; pass --overwrite to replace it, or choose another --out.", dst)
    if dst.is_dir():
        raise DataError(f"{dst}: --out is a folder; give the json's path, e.g. {dst / 'dataset.json'}.", dst)
    images = match_pattern(r, image, "image")
    labels = match_pattern(r, label, "label") if label else {}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DataError(
            f"{r}: label(s) without an image: {[str(labels[i]) for i in orphans[:5]]}. The wildcards of "
            "--image and --label must match the same text (the case id) for a pair.",
            r,
        )
    training = [{"id": i, "image": str(p), "label": str(labels[i])} for i, p in images.items() if i in labels]
    unlabelled = [{"id": i, "image": str(p)} for i, p in images.items() if i not in labels]
    if not label:
        training, unlabelled = [{"id": i, "image": str(p)} for i, p in images.items()], []
    if validation < 0 or (validation and validation >= len(training)):
        raise DataError(
            f"{r}: --validation {validation} needs at least {validation + 1} labelled cases "
            f"(found {len(training)}); choose 0 <= N < {len(training)}.",
            r,
        )
    held_out: list[dict[str, str]] = []
    if validation:
        order = random.Random(seed).sample(range(len(training)), len(training))
        picked = set(order[:validation])
        held_out = [c for k, c in enumerate(training) if k in picked]
        training = [c for k, c in enumerate(training) if k not in picked]
    notes = []
    if label and unlabelled:
        notes.append(f"{len(unlabelled)} image(s) have no label and are listed under 'test'")
    if isinstance(label_names, str):
        names = parse_label_names_arg(label_names)
    elif label_names:
        names = dict(label_names)
    else:
        names = label_names_from_values(labels) if labels else {}
    path = write_datalist_json(
        dst,
        {"training": training, "validation": held_out, "test": unlabelled},
        name=name or r.name,
        label_names=names,
        description=f"indexed by asa3d data index: --image {image!r}"
        + (f" --label {label!r}" if label else ""),
        keep_ids=True,
    )
    return IndexResult(path, training, unlabelled, names, notes, held_out)

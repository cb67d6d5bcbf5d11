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
from asa3d.data.io import IMAGE_SUFFIXES, case_id_from_path, is_dicom_dir

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
        from asa3d.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.split_record, indent=2))


def unique_ids(paths: Sequence[str | Path]) -> list[str]:
    """Case ids from file names; where names repeat, as many parent folders as make them unique are
    prefixed (``A/CT_image.nii.gz``, ``B/CT_image.nii.gz`` -> ``A_CT_image``, ``B_CT_image``)."""
    ps = [Path(p) for p in paths]
    # folder names only: the anchor ("/" or "C:\\") would put a separator into an id, and an id
    # names an output file (``predict`` writes ``<id>_seg.nii.gz``)
    folders = [p.parent.parts[len(p.anchor) > 0 :] for p in ps]
    ids = [case_id_from_path(p) for p in ps]
    for depth in range(1, 1 + max((len(f) for f in folders), default=0)):
        repeated = {i for i in ids if ids.count(i) > 1}
        if not repeated:
            break
        ids = [
            "_".join([*f[-depth:], case_id_from_path(p)]) if i in repeated else i
            for p, f, i in zip(ps, folders, ids, strict=True)
        ]
    return ids


# --------------------------------------------------------------------------------------------
# MSD dataset.json
# --------------------------------------------------------------------------------------------
def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel).expanduser()
    p = p if p.is_absolute() else (base / p).resolve()
    if not p.exists():
        # nnU-Net v1 / MSD-converted lists name "imagesTr/case.nii.gz" for case_0000.nii.gz
        name = p.name
        for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
            if name.endswith(suf):
                alt = p.with_name(name[: -len(suf)] + NNUNET_CHANNEL_SUFFIX + suf)
                if alt.exists():
                    return alt
                break
    return p


def _schema_error(where: Path, what: str, got: Any) -> DataError:
    shown = repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return DataError(
        f"{where}: {what}, got {type(got).__name__} {shown}. See docs/data.md (MSD dataset.json) for "
        'the expected form, e.g. {"training": [{"image": "./imagesTr/a.nii.gz", "label": '
        '"./labelsTr/a.nii.gz"}], "labels": {"0": "background", "1": "liver"}}.',
        where,
    )


def check_dataset_json(doc: Any, where: Path) -> None:
    """The schema of an MSD / nnU-Net dataset.json: a string where a list belongs (which would
    otherwise be read one character per case) and similar slips are refused, naming the key."""
    if not isinstance(doc, Mapping):
        raise _schema_error(
            where, "the top level must be a JSON object with 'training'/'validation'/'test'", doc
        )
    for key in ("training", "validation", "test"):
        section = doc.get(key)
        if section is None:
            continue
        if not isinstance(section, list):
            raise _schema_error(where, f"'{key}' must be a list of cases", section)
        for i, e in enumerate(section):
            if isinstance(e, str):
                continue
            if not isinstance(e, Mapping) or "image" not in e:
                raise _schema_error(
                    where, f"entry {i} of '{key}' must be a path or a mapping with an 'image' key", e
                )
            img = e["image"]
            if not (
                isinstance(img, str)
                or (isinstance(img, list) and img and all(isinstance(x, str) for x in img))
            ):
                raise _schema_error(
                    where, f"'{key}'[{i}].image must be a path (or a list of channel paths)", img
                )
            if e.get("label") is not None and not isinstance(e["label"], str):
                raise _schema_error(where, f"'{key}'[{i}].label must be a path", e["label"])
            if e.get("id") is not None and not isinstance(e["id"], (str, int)):
                raise _schema_error(where, f"'{key}'[{i}].id must be a string", e["id"])
    labels = doc.get("labels")
    if labels is not None and not isinstance(labels, Mapping):
        raise _schema_error(
            where, '\'labels\' must map class index to name ({"0": "background", ...})', labels
        )
    for key in ("file_ending", "name"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise _schema_error(where, f"'{key}' must be a string", doc[key])


def _entries(doc: Mapping[str, Any], key: str, base: Path, where: Path) -> list[dict[str, str]]:
    out = []
    for e in doc.get(key) or []:
        if isinstance(e, str):
            e = {"image": e}
        img = e["image"]
        if isinstance(img, list):  # multi-modal MSD tasks list channels; we use CT = first
            img = img[0]
        item = {"image": str(_resolve(base, img))}
        if e.get("label"):
            item["label"] = str(_resolve(base, e["label"]))
        if e.get("id") is not None:
            item["id"] = str(e["id"])
        out.append(item)
    return out


def is_nnunet_json(doc: Mapping[str, Any]) -> bool:
    """nnU-Net v2's dataset.json lists no cases: channel_names, labels, numTraining, file_ending."""
    return "file_ending" in doc and not doc.get("training")


def _nnunet_sections(doc: Mapping[str, Any], base: Path, where: Path) -> dict[str, list[dict[str, str]]]:
    """Cases of an nnU-Net v2 raw dataset: imagesTr/<case>_0000<ending> (+ labelsTr/<case><ending>),
    imagesTs -> test. Only channel 0 is used (CT)."""
    ending = str(doc.get("file_ending") or ".nii.gz")
    suffix = NNUNET_CHANNEL_SUFFIX + ending

    def cases(folder: str, labels: str | None) -> list[dict[str, str]]:
        d = base / folder
        if not d.is_dir():
            return []
        out = []
        for f in sorted(d.iterdir()):
            if f.name.startswith(".") or not f.name.endswith(suffix):
                continue
            case = f.name[: -len(suffix)]
            item = {"id": case, "image": str(f)}
            if labels:
                lab = base / labels / f"{case}{ending}"
                if not lab.is_file():
                    raise DataError(
                        f"{where}: nnU-Net case {case!r} has no label {lab}. Every imagesTr case needs "
                        f"labelsTr/<case>{ending}.",
                        lab,
                    )
                item["label"] = str(lab)
            out.append(item)
        return out

    training = cases("imagesTr", "labelsTr")
    n = doc.get("numTraining")
    if isinstance(n, int) and n != len(training):
        log.warning(
            "%s: numTraining is %d but imagesTr holds %d case(s); using the files", where, n, len(training)
        )
    return {"training": training, "validation": [], "test": cases("imagesTs", None)}


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
    check_dataset_json(doc, p)
    base = p.parent
    if is_nnunet_json(doc):
        sections = _nnunet_sections(doc, base, p)
    else:
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
        source="nnU-Net dataset.json" if is_nnunet_json(doc) else "dataset.json",
    )


def write_datalist_json(
    path: str | Path,
    splits: Mapping[str, Datalist | Sequence[Mapping[str, str]]],
    name: str,
    label_names: Mapping[int, str],
    description: str = "",
    keep_ids: bool = False,
) -> Path:
    """Write splits as an MSD dataset.json (paths relative to the json when below it; each
    entry's ``id`` too with ``keep_ids``)."""
    from asa3d.data.msd_json import write_dataset_json

    p = Path(path).resolve()

    def rel(s: str) -> str:
        try:
            return "./" + str(Path(s).resolve().relative_to(p.parent))
        except ValueError:
            return str(s)

    def conv(entries, keep_ids: bool) -> list[dict[str, str]]:
        items = entries.items if isinstance(entries, Datalist) else entries
        return [
            {
                **({"id": it["id"]} if keep_ids and it.get("id") else {}),
                "image": rel(it["image"]),
                **({"label": rel(it["label"])} if it.get("label") else {}),
            }
            for it in items
        ]

    test = [e if "id" in e else e["image"] for e in conv(splits.get("test", []), keep_ids)]
    return write_dataset_json(
        p,
        name=name,
        labels=label_names,
        training=conv(splits.get("training", []), keep_ids),
        validation=conv(splits.get("validation", []), keep_ids),
        test=test,
        description=description,
    )


# --------------------------------------------------------------------------------------------
# plain folders
# --------------------------------------------------------------------------------------------
def list_scans(folder: Path) -> list[Path]:
    """Scans directly inside ``folder``: image files and DICOM series sub-folders, the latter
    recognised by content, not by a ``.dcm`` suffix (sorted)."""
    out = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue  # e.g. .asa3d_cache
        if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES) or f.is_dir() and is_dicom_dir(f):
            out.append(f)
    return out


LAYOUTS_UNDERSTOOD = (
    "a dataset.json (MSD: training/validation/test lists; nnU-Net v2: imagesTr/labelsTr with "
    "case_0000 images, channel_names/labels/numTraining/file_ending)",
    "a folder holding imagesTr/ (and labelsTr/), as MSD and nnU-Net ship them",
    "a folder of scans (.nii/.nii.gz/.mhd/.mha/.nrrd/.nhdr files, or DICOM series sub-folders) "
    "with --labels FOLDER for label maps of the same names",
    "a dataset preset's download (--preset btcv | amos22_paper | amos22_ct | lits | pancreas_ct | luna16)",
)


def suggest_index_command(d: Path) -> str | None:
    """An ``asa3d data index`` command for a folder of patient folders (``P1/CT.nii.gz``...)."""
    names: dict[str, int] = {}
    subdirs = [s for s in sorted(d.iterdir()) if s.is_dir() and not s.name.startswith(".")]
    for s in subdirs:
        for f in s.iterdir():
            if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES):
                names[f.name] = names.get(f.name, 0) + 1
    common = sorted((n for n, c in names.items() if c >= max(1, len(subdirs) // 2)), key=lambda n: -names[n])
    if not common:
        return None
    label_words = ("mask", "seg", "label", "gt")
    labels = [n for n in common if any(w in n.lower() for w in label_words)]
    images = [n for n in common if n not in labels]
    if not images:
        return None
    cmd = f'asa3d data index {d} --image "*/{images[0]}"'
    if labels:
        cmd += f' --label "*/{labels[0]}"'
    import os

    out = d / "dataset.json" if os.access(d, os.W_OK) else Path("dataset.json")
    return cmd + f" --out {out}"


def no_scans_message(d: Path) -> str:
    msg = (
        f"{d}: no scans found directly inside this folder (looked for {', '.join(IMAGE_SUFFIXES)} files "
        "and DICOM series folders). Layouts asa3d reads as they come:\n"
        + "\n".join(f"  - {layout}" for layout in LAYOUTS_UNDERSTOOD)
        + "\nFor any other layout (e.g. one folder per patient), write a dataset.json with `asa3d data "
        'index ROOT --image "*/IMAGE_NAME" [--label "*/MASK_NAME"] --out ROOT/dataset.json`'
    )
    cmd = suggest_index_command(d)
    return msg + (f"; here probably:\n  {cmd}" if cmd else ".")


def load_folder(folder: str | Path, labels: str | Path | None = None, split: str = "training") -> Datalist:
    d = Path(folder).expanduser().resolve()
    if split not in ("training", "all"):
        raise DataError(
            f"{d}: a plain folder has only one split ('training'); got {split!r}. Write a "
            "dataset.json with training/validation/test sections to use others.",
            d,
        )
    scans = list_scans(d)
    if not scans and is_dicom_dir(d):
        scans = [d]  # the folder is itself one DICOM series
    if not scans:
        raise DataError(no_scans_message(d), d)
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
    if not labels and (r / "imagesTr").is_dir() and not list_scans(r):
        # MSD / nnU-Net folder without its dataset.json: images and labels by file name
        lab = r / "labelsTr"
        return load_folder(r / "imagesTr", labels=lab if lab.is_dir() else None, split=split)
    return load_folder(r, labels=labels, split=split)

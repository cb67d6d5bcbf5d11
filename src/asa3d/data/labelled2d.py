"""Labelled 2D images for downstream tasks (``asa3d finetune`` / ``asa3d evaluate`` on radiographs).

A ``Labelled2D`` index is what the downstream side reads, like the 3D cache's ``CacheIndex``:
``cases`` (each with ``id``, ``image()`` -> (H, W) float32 in [0, 1], ``label()``, ``spacing``)
and ``label_names``. The task decides what a label is:

- ``segmentation``: an integer label map (H, W), 0 = background, ``label_names`` with background;
- ``classification``: a multi-hot vector over ``label_names`` (index -> finding; one image may
  have several findings or none).

Sources (``data:``):

- ``preset: phantom_drr`` (the embedded default, nothing downloaded): phantom radiographs made in
  memory from subjects the 2D pretraining never sees (phantom seeds ``(1, i)``; pretraining uses
  ``(0, i)``), ``PHANTOM_TRAIN`` in ``training`` and ``PHANTOM_TEST`` in ``validation``.
  Segmentation: the projected organ masks of ``SEG_CLASSES`` flattened into one label map, later
  classes painted over earlier ones (a radiograph's organs overlap: the spine over the lungs).
  Classification: each finding of ``asa3d.data.drr.FINDINGS`` present with probability 0.5 per
  image, drawn from the subject's seed, painted into the CT before projection.
- ``preset: chestxray14``: the official split lists (``training`` = train_val, ``test``), the 14
  findings of ``Data_Entry_2017.csv`` (classification only).
- a 2D ``dataset.json`` (``"spatial_dims": 2``): entries with ``"mask"`` (``.npz`` holding
  ``masks`` (C, H, W) and ``names``, as ``asa3d.data.drr.write_drr_dataset`` writes, flattened in
  channel order) for segmentation, or ``"findings"`` (a list of names, the json's top-level
  ``"findings"`` listing them all) for classification.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asa3d.config_sections import DataConfig
from asa3d.data.errors import DataError

__all__ = [
    "PHANTOM_TEST",
    "PHANTOM_TRAIN",
    "SEG_CLASSES",
    "Case2D",
    "Labelled2D",
    "flatten_masks",
    "labelled_2d",
]

TASKS = ("segmentation", "classification")
SEG_CLASSES: tuple[str, ...] = ("lungs", "liver", "spleen", "vertebrae")  # painting order
PHANTOM_TRAIN = 24
PHANTOM_TEST = 16
FINDING_RATE = 0.5


@dataclass
class Case2D:
    id: str
    load: Callable[[], np.ndarray]  # -> (H, W) float32 in [0, 1]
    target: np.ndarray  # (H, W) int16 label map, or (K,) float32 multi-hot
    spacing: tuple[float, float] = (1.0, 1.0)

    def image(self) -> np.ndarray:
        return self.load()

    def label(self) -> np.ndarray:
        return self.target


@dataclass
class Labelled2D:
    cases: list[Case2D]
    label_names: dict[int, str]
    task: str
    name: str = ""


def flatten_masks(masks: np.ndarray, names: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """(C, H, W) 0/1 masks -> (H, W) int16 label map: ``classes[i]`` -> i + 1, later over earlier."""
    index = {n: i for i, n in enumerate(names)}
    missing = [c for c in classes if c not in index]
    if missing:
        raise ValueError(f"masks lack {missing}; they hold {list(names)}")
    out = np.zeros(masks.shape[1:], np.int16)
    for k, c in enumerate(classes, start=1):
        out[masks[index[c]] > 0] = k
    return out


def labelled_2d(data: DataConfig, task: str, split: str | None = None) -> Labelled2D:
    """The labelled 2D images of ``split`` (default ``data.split``) for ``task``."""
    if task not in TASKS:
        raise DataError(f"task={task!r}: one of {list(TASKS)}.")
    split = split or data.split
    if data.preset == "phantom_drr":
        return _phantom(task, split)
    if data.root is None:
        raise DataError(f"data.root is not set: give the folder or dataset.json of the {task} images.")
    root = Path(data.root).expanduser()
    if data.preset == "chestxray14":
        return _chestxray14(root, task, split)
    js = root if root.suffix.lower() == ".json" else root / "dataset.json"
    if not js.is_file():
        raise DataError(
            f"{root}: no dataset.json. Labelled 2D data need a dataset.json with 'spatial_dims': 2 "
            "(mask or findings per entry) or a 2D preset (phantom_drr, chestxray14).",
            root,
        )
    return _json(js, task, split)


def _check_split(split: str, known: Sequence[str], where: str) -> None:
    if split not in known:
        raise DataError(f"{where}: no split {split!r}; use one of {list(known)}.")


@functools.lru_cache(maxsize=8)
def _phantom_case(i: int, findings: tuple[str, ...]) -> Any:
    from asa3d.data.dataset2d import DRR_SPACING, DRR_VOLUME
    from asa3d.data.drr import phantom_drr

    return phantom_drr((1, i), DRR_VOLUME, DRR_SPACING, findings=findings)


@functools.lru_cache(maxsize=4)
def _phantom(task: str, split: str) -> Labelled2D:
    from asa3d.data.drr import FINDINGS

    _check_split(split, ("training", "validation"), "data.preset=phantom_drr")
    first, n = (0, PHANTOM_TRAIN) if split == "training" else (PHANTOM_TRAIN, PHANTOM_TEST)
    cases = []
    for i in range(first, first + n):
        if task == "segmentation":
            d = _phantom_case(i, ())
            target = flatten_masks(d.masks, d.names, SEG_CLASSES)
        else:
            draw = np.random.default_rng([1, i, 11]).random(len(FINDINGS)) < FINDING_RATE
            present = tuple(f for f, on in zip(FINDINGS, draw, strict=True) if on)
            d = _phantom_case(i, present)
            target = draw.astype(np.float32)
        image = d.image.astype(np.float32)
        cases.append(Case2D(f"drr_{i:03d}", lambda im=image: im, target, d.spacing))
    names = (
        {0: "background", **{k + 1: c for k, c in enumerate(SEG_CLASSES)}}
        if task == "segmentation"
        else dict(enumerate(FINDINGS))
    )
    return Labelled2D(cases, names, task, f"phantom_drr/{split}")


def _reader(path: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from asa3d.data.io2d import read_image2d

        return read_image2d(path).to_unit().astype(np.float32)

    return load


def _chestxray14(root: Path, task: str, split: str) -> Labelled2D:
    from asa3d.data.presets_2d import CHESTXRAY14_CLASSES, load_preset_2d, multi_hot

    if task != "classification":
        raise DataError(f"{root}: ChestX-ray14 has image-level findings only: use task=classification.", root)
    dl = load_preset_2d("chestxray14", root, split)
    cases = [Case2D(it["id"], _reader(it["image"]), multi_hot(it["findings"])) for it in dl.items]
    return Labelled2D(cases, dict(enumerate(CHESTXRAY14_CLASSES)), task, f"chestxray14/{split}")


def _json(js: Path, task: str, split: str) -> Labelled2D:
    doc = json.loads(js.read_text())
    if int(doc.get("spatial_dims", 3)) != 2:
        raise DataError(f'{js}: not a 2D dataset.json (set "spatial_dims": 2).', js)
    lists = sorted(
        k for k, v in doc.items() if isinstance(v, list) and k not in ("mask_channels", "findings")
    )
    _check_split(split, lists, str(js))
    cases = []
    if task == "segmentation":
        classes = list(doc.get("mask_channels") or [])
        if not classes:
            raise DataError(f"{js}: segmentation needs 'mask_channels' (the names of the mask channels).", js)
        for e in doc[split]:
            if "mask" not in e:
                raise DataError(
                    f"{js}: entry {e.get('id', e['image'])} has no 'mask' (.npz with masks, names).", js
                )
            with np.load(js.parent / e["mask"]) as z:
                target = flatten_masks(z["masks"], [str(n) for n in z["names"]], classes)
            cases.append(Case2D(str(e["id"]), _reader(str(js.parent / e["image"])), target))
        names = {0: "background", **{k + 1: c for k, c in enumerate(classes)}}
    else:
        findings = list(doc.get("findings") or [])
        if not findings:
            raise DataError(f"{js}: classification needs a top-level 'findings' list of class names.", js)
        index = {f: k for k, f in enumerate(findings)}
        for e in doc[split]:
            unknown = [f for f in e.get("findings", []) if f not in index]
            if unknown:
                raise DataError(f"{js}: entry {e['id']} has findings {unknown} not in 'findings'.", js)
            target = np.zeros(len(findings), np.float32)
            target[[index[f] for f in e.get("findings", [])]] = 1.0
            cases.append(Case2D(str(e["id"]), _reader(str(js.parent / e["image"])), target))
        names = dict(enumerate(findings))
    if not cases:
        raise DataError(f"{js}: split {split!r} is empty.", js)
    return Labelled2D(cases, names, task, f"{js.name}/{split}")

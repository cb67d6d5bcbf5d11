"""``asa3d predict``: apply a fine-tuned model to new scans; write label maps in each scan's
ORIGINAL geometry (same shape and affine as the input, NIfTI).

Per scan: read (``asa3d.data.io.read_volume``) -> the canonical preprocessing recorded in the
run's ``model.json`` (``asa3d.data.preprocess.preprocess_volumes``: RAS, spacing, HU window) ->
sliding-window inference -> argmax -> labels back on the source grid (``asa3d.eval.inference``;
the network is rebuilt from the backbone spec ``model.json`` records).

Outputs are named by case id (``<id>_seg.nii.gz``), so two scans with one file name never share
an output; an existing output is refused unless ``overwrite``. ``predictions.json`` lists only
outputs of finished runs: before a run replaces outputs an earlier one listed, their entries are
taken out of it, so a killed run never leaves a list that mixes old and new files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asa3d.config import ConfigError
from asa3d.engine.distributed import resolve_device
from asa3d.eval.inference import (
    labels_to_source,
    load_finetuned,
    predict_volume,
    preprocess_config_from_contract,
)

log = logging.getLogger(__name__)


MANIFEST = "predictions.json"  # written last, atomically: its presence means the run finished
SEG_SUFFIX = "_seg.nii.gz"


def resolve_inputs(inputs: Sequence[str | Path], split: str = "all") -> list[dict[str, str]]:
    """``[{"id", "image"}]`` for every scan named by ``inputs``: scan files, DICOM series folders,
    folders of scans (any layout ``asa3d.data.datalist.load_datalist`` reads) and dataset.json
    files (their ``split`` section, default every case). Ids are the datalists' unique ids; scans
    given one by one get file-name ids, folder-prefixed where names repeat
    (``A/CT_image.nii.gz``, ``B/CT_image.nii.gz`` -> ``A_CT_image``, ``B_CT_image``)."""
    from asa3d.data.datalist import load_datalist, unique_ids
    from asa3d.data.errors import DataError
    from asa3d.data.io import IMAGE_SUFFIXES, is_dicom_dir, volume_kind

    singles: list[Path] = []
    items: list[dict[str, str]] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise DataError(f"--input {p}: not found.", p)
        if p.is_file() and p.suffix.lower() == ".json":
            items += [{"id": it["id"], "image": it["image"]} for it in load_datalist(p, split=split).items]
        elif p.is_dir() and is_dicom_dir(p):
            singles.append(p)
        elif p.is_dir():
            items += [{"id": it["id"], "image": it["image"]} for it in load_datalist(p, split=split).items]
        elif p.name.lower().endswith(IMAGE_SUFFIXES) or volume_kind(p) == "dicom":
            singles.append(p.parent if volume_kind(p) == "dicom" else p)
        else:
            raise DataError(
                f"--input {p}: not a scan (NIfTI, MetaImage, NRRD, DICOM), a folder of scans or a "
                "dataset.json.",
                p,
            )
    # one scan named twice (or a slice and its series) is one case: ids are made unique only
    # between different scans (otherwise every parent folder, even "/", would join the id)
    first: dict[Path, Path] = {}
    for s in singles:
        first.setdefault(s.resolve(), s)
    singles = list(first.values())
    items += [{"id": i, "image": str(s)} for s, i in zip(singles, unique_ids(singles), strict=True)]
    seen: dict[str, str] = {}
    for it in items:
        if it["id"] in seen and seen[it["id"]] != it["image"]:
            raise DataError(
                f"case id {it['id']!r} names two different scans ({seen[it['id']]} and {it['image']}); "
                "both would be written to the same output. Predict them in separate runs (another "
                "--out) or give them ids in a dataset.json (`asa3d data index`).",
                it["image"],
            )
        seen[it["id"]] = it["image"]
    unique = list({it["id"]: it for it in items}.values())  # one scan listed twice: predicted once
    if not unique:
        raise DataError(f"no scans found in {[str(i) for i in inputs]}.")
    return unique


def prepare_out_dir(out_dir: str | Path, ids: Sequence[str], overwrite: bool) -> Path:
    """Check ``--out`` before any work: creatable, writable, and holding no output of these cases
    (unless ``overwrite``). Errors are ``ConfigError`` (exit 2) naming the folder and the fix."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder for the label maps.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--out {out}: cannot create this folder ({exc.strerror}); choose a writable one."
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: this folder is not writable; choose another --out.")
    from asa3d.atomic import remove_stale_tmp

    remove_stale_tmp(out)  # temp files of a killed run (no other writer shares a predict --out)
    existing = [out / f"{i}{SEG_SUFFIX}" for i in ids if (out / f"{i}{SEG_SUFFIX}").exists()]
    if existing and not overwrite:
        listed = {c.get("output") for c in _manifest_cases(out)}
        finished = all(p.name in listed for p in existing)
        raise ConfigError(
            f"--out {out}: {len(existing)} output(s) already exist ({', '.join(p.name for p in existing[:3])}"
            f"{', ...' if len(existing) > 3 else ''}) from an earlier "
            f"{'run' if finished else 'run that did not finish (no ' + MANIFEST + ')'}. Pass "
            "--overwrite to replace them, or choose another --out."
        )
    return out


def predict_files(
    model: torch.nn.Module | str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    info: Mapping[str, Any] | None = None,
    device: str = "auto",
    overlap: float | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    split: str = "all",
    progress: bool = False,
    report: dict[str, Any] | None = None,
) -> list[Path]:
    """Segment every input scan; returns the written ``<case id>_seg.nii.gz`` paths.

    Every scan is validated as ``asa3d data prepare`` validates it (readable, 3D, finite voxels, a
    sane affine): a bad one raises ``DataError`` naming it, or with ``skip_bad`` is listed in
    ``predictions.json`` (and ``report["skipped"]``) while the others are written. Outputs are
    written atomically; ``predictions.json`` last, so its presence marks a finished run.
    """
    from asa3d.atomic import atomic_write_json
    from asa3d.data.errors import DataError
    from asa3d.data.io import read_volume, write_volume
    from asa3d.data.preprocess import preprocess_volumes
    from asa3d.data.validate import validate_image

    cases = resolve_inputs(inputs, split=split)
    out = prepare_out_dir(out_dir, [c["id"] for c in cases], overwrite)
    dev = resolve_device(device)
    if not isinstance(model, torch.nn.Module):
        model, info = load_finetuned(model, str(dev))
    if info is None:
        raise ConfigError("predict_files: pass the run's model.json contents with a bare model")
    # cases of earlier finished runs into this folder stay listed (their outputs are kept); those
    # this run will write are unlisted first, so a killed run leaves no list mixing old and new
    this_run = {c["id"] for c in cases}
    previous = _manifest(out)
    earlier = [c for c in previous.get("cases", []) if c.get("id") not in this_run]
    if previous and len(earlier) < len(previous.get("cases", [])):
        kept_skips = [c for c in previous.get("skipped", []) if c.get("id") not in this_run]
        atomic_write_json(out / MANIFEST, {**previous, "cases": earlier, "skipped": kept_skips})
    pre_cfg = preprocess_config_from_contract(info["preprocessing"])
    inf = info.get("inference", {})
    written: list[Path] = []
    done: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    from tqdm.auto import tqdm

    bar = tqdm(cases, desc="predict", unit="scan", file=sys.stderr, disable=None if progress else True)
    for case in bar:
        bar.set_postfix_str(case["id"], refresh=False)
        try:
            vol = read_volume(case["image"])
            for w in validate_image(vol, emit=False):
                log.warning(w)
            try:
                img, _, pre_affine = preprocess_volumes(vol, None, pre_cfg)
            except Exception as exc:  # MONAI's errors carry long traces; name the scan instead
                raise DataError(
                    f"{case['image']}: preprocessing failed ({type(exc).__name__}: {exc}).", case["image"]
                ) from exc
        except DataError as exc:
            if not skip_bad:
                raise
            log.warning("skipped %s: %s", case["id"], exc)
            skipped.append({"id": case["id"], "image": case["image"], "reason": str(exc)})
            continue
        pred = predict_volume(
            model,
            img,
            inf.get("roi_size", [96, 96, 96]),
            inf.get("overlap", 0.5) if overlap is None else overlap,
            inf.get("mode", "gaussian"),
            int(inf.get("sw_batch_size", 1)),
            dev,
        )
        seg = labels_to_source(pred, pre_affine, vol.affine, vol.shape)
        dst = out / f"{case['id']}{SEG_SUFFIX}"
        write_volume(seg, dst, affine=vol.affine)
        labels = np.unique(seg).tolist()
        log.debug("%s -> %s (%s, labels %s)", case["image"], dst, seg.shape, labels)
        written.append(dst)
        done.append({"id": case["id"], "image": case["image"], "output": dst.name, "labels": labels})
    bar.close()
    if not written:
        raise DataError(
            f"no scan could be predicted: all {len(cases)} were rejected (first: {skipped[0]['reason']})."
        )
    atomic_write_json(
        out / MANIFEST,
        {
            "format": "asa3d-predictions/1",
            "model": model_path_of(info),
            "preprocessing": dict(info["preprocessing"]),
            "cases": earlier + done,
            "skipped": skipped,
        },
    )
    if report is not None:
        report.update(written=written, skipped=skipped, manifest=out / MANIFEST)
    return written


def _manifest(out: Path) -> dict[str, Any]:
    """The folder's ``predictions.json`` ({} when absent or unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads((out / MANIFEST).read_text())
        if isinstance(doc, dict) and isinstance(doc.get("cases"), list):
            return doc
    return {}


def _manifest_cases(out: Path) -> list[dict[str, Any]]:
    return [c for c in _manifest(out).get("cases", []) if isinstance(c, dict)]


def model_path_of(info: Mapping[str, Any]) -> str:
    return str(info.get("run_dir") or info.get("weights") or "")

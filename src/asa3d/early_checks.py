"""Checkpoint arguments (``--init``, ``--resume``, ``--model``) checked before any long work.

A verb reads the file a flag names the moment it starts, before it builds a cache, a model or an
output folder's contents, so an unreadable, truncated, garbage or unsafe file fails at once (exit
2, ``CheckpointError`` naming the flag and the file) instead of after minutes of preprocessing.
Files are opened the way the run will open them: ``torch.load(weights_only=True)`` (tensors
memory-mapped, not read, for zip-format files) or safetensors' header, so nothing in them runs.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from asa3d.engine.checkpoint import CheckpointError, load_checkpoint

INIT_FILES_IN_A_FOLDER = ("model_final.pt", "teacher.safetensors")  # as eval.transfer.read_source


def _readable(path: Path, flag: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{flag} {path}: no such file. Fix: check the path.")
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: is a folder, not a checkpoint file. Fix: check the path.")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise CheckpointError(
            f"{flag} {path}: cannot be read ({exc.strerror or exc}). Fix: check the file's permissions."
        ) from None


def check_torch_file(path: str | Path, flag: str) -> dict[str, Any]:
    """``path`` loads with ``torch.load(weights_only=True)``; returns its (memory-mapped) dict."""
    p = Path(path).expanduser()
    _readable(p, flag)
    try:
        return load_checkpoint(p, mmap=zipfile.is_zipfile(p))  # mmap: tensors are not read
    except CheckpointError as exc:
        raise CheckpointError(f"{flag} {exc}") from None


def check_safetensors_file(path: str | Path, flag: str) -> None:
    """``path`` is a complete safetensors file (its header parses and covers the file)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    _readable(p, flag)
    try:
        with safe_open(str(p), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{flag} {p}: not a readable safetensors file ({exc}). Fix: check the path, or export the "
            "checkpoint again (asa3d export)."
        ) from None


def _check_sidecar(weights: Path, flag: str) -> None:
    side = weights.with_name(weights.name + ".json")
    if side.is_file():
        try:
            json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{flag} {side}: the export's JSON sidecar cannot be read ({exc}). Fix: export the "
                "checkpoint again (asa3d export)."
            ) from None


def check_init_source(source: str | None, flag: str = "--init") -> None:
    """The fine-tuning init (``scratch``, a checkpoint, an export, a run folder, a state dict)."""
    if not source or source == "scratch":
        return
    p = Path(source).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"{flag} {source}: no such file or folder. Fix: give a checkpoint (.pt), an export "
            "(.safetensors), a run folder, or scratch."
        )
    if p.is_dir():
        named = [p / n for n in INIT_FILES_IN_A_FOLDER if (p / n).is_file()]
        found = named or sorted(p.glob("*.safetensors"))
        if not found:
            return  # the run says what such a folder lacks (eval.transfer.read_source)
        p = found[0]
    if p.suffix == ".safetensors":
        check_safetensors_file(p, flag)
    else:
        check_torch_file(p, flag)
    _check_sidecar(p, flag)


def check_resume(
    run_dir: Path, resume: bool | str | Path | None, fmt: str | None, flag: str = "--resume"
) -> None:
    """The checkpoint a run will resume from (``resume`` as ``engine.run_dir.resolve_resume``
    takes it: a path, True, None = automatic, False = fresh), read now; ``fmt``: its format."""
    from asa3d.engine.run_dir import resolve_resume

    path = resolve_resume(run_dir, resume)
    if path is None:
        return
    ck = check_torch_file(path, flag if isinstance(resume, (str, Path)) else f"{flag} (found in {run_dir})")
    if fmt is not None and ck.get("format") != fmt:
        raise CheckpointError(
            f"{flag} {path}: format {ck.get('format')!r} is not {fmt!r}, so this is not a checkpoint of "
            "this kind of run. Fix: give the checkpoint this run wrote, or start fresh with --no-resume."
        )


def check_finetune_inputs(init_source: str | None, ckpt_dir: Path, resume: bool | str | Path | None) -> None:
    """``finetune``/``probe``: the init and the checkpoint to resume from."""
    from asa3d.eval.finetune import CKPT_FORMAT

    check_init_source(init_source)
    check_resume(ckpt_dir, resume, CKPT_FORMAT)


def check_pretrain_inputs(run_dir: Path, resume: bool | str | Path | None) -> None:
    """``pretrain``: the checkpoint to resume from."""
    from asa3d.engine.checkpoint import FORMAT

    check_resume(run_dir, resume, FORMAT)


def check_predict_model(model: str | Path, flag: str = "--model") -> None:
    """``predict``: a fine-tune/probe run folder (or a weights file in one) with a readable
    ``model.json`` and readable weights."""
    p = Path(model).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"{flag} {p}: no such file or folder. Fix: give a fine-tune/probe run folder (it holds "
            "model.json) or its model_final.pt."
        )
    run = p if p.is_dir() else p.parent
    info_path = run / "model.json"
    if not info_path.is_file():
        raise CheckpointError(
            f"{flag} {p}: no model.json in {run}. Fix: give a fine-tune/probe run folder or a model "
            "file in one."
        )
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{flag} {info_path}: not a readable model.json ({exc}). Fix: use the run folder as "
            "finetune wrote it, or fine-tune again."
        ) from None
    if not isinstance(info, dict) or not {"model_kwargs", "n_classes"} <= set(info):
        raise CheckpointError(
            f"{flag} {info_path}: lacks model_kwargs / n_classes; not a model.json written by asa3d finetune."
        )
    inference = info.get("inference")
    if isinstance(inference, dict) and "image2d" in inference:
        task = info.get("task", "segmentation")
        raise CheckpointError(
            f"{flag} {p}: a 2D {task} model (model.json records image2d); asa3d predict writes 3D "
            "label maps in each scan's geometry. Fix: score 2D models with asa3d finetune / asa3d "
            "evaluate (eval.split), which write per-image results; 2D predict is not built yet."
        )
    weights = p if p.is_file() else run / str(info.get("weights", "model_final.pt"))
    if not weights.exists():
        raise CheckpointError(
            f"{flag} {weights}: the run has no weights (evaluate grids drop them unless "
            "grid.keep_models=true)."
        )
    check_torch_file(weights, flag)


__all__ = [
    "check_finetune_inputs",
    "check_init_source",
    "check_predict_model",
    "check_pretrain_inputs",
    "check_resume",
    "check_safetensors_file",
    "check_torch_file",
]

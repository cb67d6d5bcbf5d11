"""What an evaluation grid makes for itself before its cells, and the fingerprints that keep it
from reusing stale work: the phantom data set, the pretrained initialisations, and the content
fingerprint of every init's weights.

- **Phantom** (``grid.phantom`` when ``data.root`` is unset): ``OUT/phantom/spec.json`` records the
  spec it was written with (before the data; ``dataset.json`` is written last and marks it done).
- **Pretrained inits** (``pretrain_config``): pretrained in this process through
  ``asa3d.engine.trainer.run_pretrain``, the entry point of ``asa3d pretrain``, into
  ``OUT/pretrain/<name>``. ``fingerprint.json`` records the resolved pretraining config's
  fingerprint before training starts (so a killed run resumes from its checkpoint only for the
  same config), ``DONE`` (written atomically, last) the fingerprint and the checkpoint's content
  hash.
- **Init fingerprints**: sha256 of the weights file(s) an init reads, so a cell's fingerprint
  changes when the weights do, whatever their path.

A recorded fingerprint that differs from the current one is refused (``StaleWorkError``, naming
the folder and ``--overwrite``); with ``overwrite`` the stale folder is removed and made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asa3d.atomic import atomic_write_json
from asa3d.config import ConfigError, load_config, to_dict
from asa3d.eval.config_sections import EvaluateConfig, InitSpec
from asa3d.progress import BarFactory

log = logging.getLogger(__name__)


class StaleWorkError(ConfigError):
    """A folder holds work made with other settings than the current ones (exit 2)."""


def stale(what: str, folder: Path, why: str) -> StaleWorkError:
    return StaleWorkError(
        f"{folder}: {what} {why}, so it cannot be reused for this configuration. Pass --overwrite to "
        "redo it in place (only what differs is redone), or choose another --out."
    )


def fingerprint(doc: Any) -> str:
    blob = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when absent; {} when it is no JSON object (e.g. the
    bare ``ok`` an older asa3d wrote as DONE)."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (ValueError, OSError):
        return {}
    return doc if isinstance(doc, dict) else {}


# --------------------------------------------------------------------------------------------
# content fingerprints
# --------------------------------------------------------------------------------------------
_FILE_SHA: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime within the process)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_SHA[key] = h.hexdigest()
    return _FILE_SHA[key]


def source_files(source: str) -> list[Path]:
    """The files an init source is read from (``asa3d.eval.transfer.read_source``): the file and
    its JSON sidecar, or a folder's weights and ``model.json``."""
    p = Path(source).expanduser()
    if p.is_dir():
        names = ["model_final.pt", "teacher.safetensors", "model.json"]
        files = [p / n for n in names if (p / n).is_file()] + sorted(p.glob("*.safetensors"))
        files += [f.with_name(f.name + ".json") for f in files if f.with_name(f.name + ".json").is_file()]
        return sorted(set(files))
    if not p.is_file():
        raise ConfigError(f"init source {source!r} not found (use source: scratch or a file path)")
    side = p.with_name(p.name + ".json")
    run_info = p.parent / "model.json"
    extra = [side] if side.is_file() else []
    if p.name.startswith("model_") and run_info.is_file():
        extra.append(run_info)
    return [p, *extra]


def source_fingerprint(source: str) -> str:
    """What an init's weights are, by content: ``scratch`` or a hash of its files' sha256."""
    if source in ("", "scratch", None):
        return "scratch"
    return fingerprint([(f.name, file_sha256(f)) for f in source_files(source)])


# --------------------------------------------------------------------------------------------
# phantom
# --------------------------------------------------------------------------------------------
def make_phantom(out: Path, spec: Mapping[str, Any], overwrite: bool = False) -> Path:
    """OUT/phantom/dataset.json, written once per spec (the phantom is deterministic per seed);
    a phantom written with another spec is refused (``overwrite``: written again)."""
    from asa3d.data.phantom import write_phantom_dataset

    folder = out / "phantom"
    target = folder / "dataset.json"
    want = json.loads(json.dumps(dict(spec), sort_keys=True))
    recorded = _read_json(folder / "spec.json")
    if target.exists():
        if recorded == want:
            return target
        if not overwrite:
            why = (
                "was written before its spec was recorded"
                if recorded is None
                else f"was written with grid.phantom={recorded}, not {want}"
            )
            raise stale("the phantom data set", folder, why)
        log.info("grid.phantom changed: writing %s again", folder)
    if folder.exists():  # another spec (with overwrite), or a write that was killed midway
        shutil.rmtree(folder)
    atomic_write_json(folder / "spec.json", want)  # first: dataset.json (last) marks the data complete
    kw = dict(spec)
    for k in ("shape", "spacing"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return Path(write_phantom_dataset(folder, **kw))


# --------------------------------------------------------------------------------------------
# pretrained inits
# --------------------------------------------------------------------------------------------
def pretrain_config(spec: InitSpec, cfg: EvaluateConfig) -> Any:
    """The resolved pretraining config of ``spec``: its file, the grid's data root and cache, then
    its own overrides."""
    from asa3d.config_sections import PretrainConfig

    overrides = [f"data.root={cfg.data.root}"] if cfg.data.root else []
    if cfg.data.cache_dir:
        overrides.append(f"data.cache_dir={cfg.data.cache_dir}")
    return load_config(PretrainConfig, spec.pretrain_config, [*overrides, *spec.pretrain_overrides])


def pretrain_fingerprint(pcfg: Any) -> str:
    """The resolved pretraining config and the data it reads (by content, not path)."""
    from asa3d.provenance import data_fingerprint

    doc = to_dict(pcfg)
    doc["data"] = {**doc["data"], "root": data_fingerprint(pcfg.data.root), "cache_dir": None}
    doc["train"] = {k: v for k, v in doc["train"].items() if k not in ("progress", "log_every")}
    return fingerprint(doc)


def resolve_init(
    spec: InitSpec,
    out: Path,
    cfg: EvaluateConfig,
    overwrite: bool = False,
    progress: BarFactory | None = None,
) -> tuple[str, str]:
    """(weights source, content fingerprint) of ``spec``; pretrains it first (in this process, as
    ``asa3d pretrain`` does, resuming a killed run of the same config) when ``pretrain_config``
    is set."""
    if not spec.pretrain_config:
        return spec.source, source_fingerprint(spec.source)
    from asa3d.engine.checkpoint import latest_checkpoint
    from asa3d.engine.trainer import run_pretrain

    run = out / "pretrain" / spec.name
    pcfg = pretrain_config(spec, cfg)
    fp = pretrain_fingerprint(pcfg)
    done, started = _read_json(run / "DONE"), _read_json(run / "fingerprint.json")
    recorded = (done or started or {}).get("fingerprint")
    if run.exists() and any(run.iterdir()) and recorded != fp:
        if not overwrite:
            why = (
                "records no pretraining fingerprint (made by an older asa3d)"
                if recorded is None
                else f"was pretrained with another configuration (fingerprint {recorded}, now {fp}: "
                f"{spec.pretrain_config} + {spec.pretrain_overrides} + the grid's data)"
            )
            raise stale(f"the pretraining of init {spec.name!r}", run, why)
        log.info("init %s: pretraining configuration changed, pretraining again in %s", spec.name, run)
        shutil.rmtree(run)
        done = None
    if done and done.get("fingerprint") == fp:
        ckpt = Path(done["checkpoint"])
        if not ckpt.is_absolute():
            ckpt = run / ckpt
        if ckpt.is_file() and file_sha256(ckpt) == done.get("sha256"):
            return str(ckpt), done["sha256"]
        if not overwrite:
            why = f"no longer holds the checkpoint it recorded ({ckpt}, sha256 {done.get('sha256')})"
            raise stale(f"the pretraining of init {spec.name!r}", run, why)
        shutil.rmtree(run)
    atomic_write_json(run / "fingerprint.json", {"fingerprint": fp, "config": to_dict(pcfg)})
    log.info("pretraining init %s (%s) in %s", spec.name, spec.pretrain_config, run)
    run_pretrain(pcfg, run, resume=None, progress=progress)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ConfigError(f"pretraining of init {spec.name} in {run} left no checkpoint")
    sha = file_sha256(ckpt)
    rel = ckpt.relative_to(run) if ckpt.is_relative_to(run) else ckpt
    atomic_write_json(run / "DONE", {"fingerprint": fp, "checkpoint": str(rel), "sha256": sha})
    return str(ckpt), sha

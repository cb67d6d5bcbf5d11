"""``ensure_cache``: the one call trainers make (DataConfig -> CacheIndex, building what is missing)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from asa3d.config_sections import DataConfig
from asa3d.data.cache import CacheIndex, build_cache
from asa3d.data.datalist import Datalist, load_datalist
from asa3d.data.errors import DataError

log = logging.getLogger(__name__)

CACHE_FOLDER = ".asa3d_cache"
CACHE_ENV = "ASA3D_CACHE_DIR"  # one cache folder per user, for every dataset


def default_cache_dir(root: str | Path) -> Path:
    """Where a dataset's cache lives when ``data.cache_dir`` is not set:
    ``$ASA3D_CACHE_DIR/<folder>-<hash>`` when that variable is set, else ``<root folder>/.asa3d_cache``
    when that folder is writable, else ``$XDG_CACHE_HOME/asa3d/<folder>-<hash>`` (``~/.cache``)."""
    r = Path(root).expanduser().resolve()
    folder = r.parent if r.is_file() else r
    tag = hashlib.blake2b(str(folder).encode(), digest_size=4).hexdigest()
    if os.environ.get(CACHE_ENV):
        # named after the dataset: the json's stem (a json that is not "dataset.json"), else its folder
        named = r.is_file() and r.name != "dataset.json"
        name = r.name.removesuffix(".json") if named else folder.name
        if named:
            tag = hashlib.blake2b(str(r).encode(), digest_size=4).hexdigest()
        return Path(os.environ[CACHE_ENV]).expanduser() / f"{name}-{tag}"
    if os.access(folder, os.W_OK):
        return folder / CACHE_FOLDER
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asa3d" / f"{folder.name}-{tag}"


def cache_dir_of(data_cfg: DataConfig) -> Path:
    """The cache folder a run with this ``data:`` section reads (``data.cache_dir`` or the default)."""
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    if data_cfg.root is None:
        raise DataError("data.root is not set: cannot tell where its cache lives.")
    return default_cache_dir(data_cfg.root)


def datalist_from_config(data_cfg: DataConfig) -> Datalist:
    return load_datalist(
        root=data_cfg.root, split=data_cfg.split, labels=data_cfg.labels, preset=data_cfg.preset
    )


def ensure_cache(
    data_cfg: DataConfig,
    with_labels: bool,
    workers: int | None = None,
    progress: bool = False,
    crop: tuple[int, int, int] | None = None,
) -> CacheIndex:
    """Load the datalist of ``data_cfg`` and build/reuse its cache. A preset's split is written to
    ``<cache_dir>/splits/<preset>.json``. ``crop``: the training crop; each case smaller than it
    on some axis is logged as a warning naming it (training zero-pads it)."""
    if data_cfg.root is None:
        raise DataError(
            "data.root is not set: give a folder of scans, a dataset.json or a preset download "
            "folder (data.root=PATH), or make a phantom with `asa3d data phantom --out DIR`."
        )
    datalist = datalist_from_config(data_cfg)
    if with_labels and not datalist.has_labels:
        missing = [it["id"] for it in datalist.items if "label" not in it]
        raise DataError(
            f"{datalist.root}: labels are needed but {len(missing)} case(s) have none "
            f"({missing[:5]}). Give label maps (dataset.json 'label', data.labels=FOLDER) or use a "
            "labelled split.",
            datalist.root,
        )
    cache_dir = cache_dir_of(data_cfg)
    index = build_cache(
        datalist,
        data_cfg.preprocess,
        cache_dir,
        workers=workers or data_cfg.num_workers,
        skip_bad=data_cfg.skip_bad,
        with_labels=with_labels,
        progress=progress,
    )
    if datalist.split_record:
        p = datalist.write_split(cache_dir / "splits" / f"{datalist.name}.json")
        log.info("split of preset %s written to %s", datalist.name, p)
    if crop is not None:
        from asa3d.data.validate import smaller_than_crop

        for msg in smaller_than_crop({c.id: c.shape for c in index.cases}, tuple(crop)):
            log.warning(msg)
    log.info(
        "cache %s: %d cases (%d reused, %d built, %d rejected)",
        cache_dir,
        len(index),
        index.reused,
        index.built,
        len(index.rejected),
    )
    return index

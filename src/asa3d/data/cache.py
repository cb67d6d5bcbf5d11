"""On-disk cache of canonically preprocessed volumes (built once, read by every epoch and method).

Layout: ``<cache_dir>/<case id>-<key>/{image.b2nd, label.b2nd, fg.npy, meta.json}`` plus
``index.json``. ``key`` = blake2b over the bytes of the image (and label) file(s), the
preprocessing contract and the storage format, so editing a scan or changing a parameter gives a
new entry and the stale one is never read. Each entry is written into a temporary folder and
renamed into place (atomic on one filesystem): an interrupted build leaves only complete entries,
and the next build reuses them (and removes the temporary folders of writers that died). Each
entry's ``meta.json`` records a blake2b checksum of every array file; it is verified the first
time a process opens the entry, so flipped bytes or a truncated file are found and the entry
rebuilt (``ensure_cache``) or refused with the file named (a reader), never decoded wrongly.

Storage: blosc2 NDArrays (chunked + compressed, as nnU-Net v2 stores its preprocessed data), so a
crop decodes only the chunks it touches. The image in [0, 1] is quantised to uint16 (step 1/65535,
i.e. 0.0065 HU for the default 425 HU window: far below CT noise) and converted to float32 on
read; float16 would be coarser (up to 0.2 HU) at about the same size. Labels are uint8 (int16 when
a class index exceeds 255).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asa3d.atomic import atomic_write_text
from asa3d.config_sections import PreprocessConfig
from asa3d.data.datalist import Datalist
from asa3d.data.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = "asa3d-cache/2"  # 2: per-file checksums in meta.json
INDEX_FORMAT = "asa3d-cache-index/1"
UINT16_SCALE = 1.0 / 65535.0
CHUNKS = (64, 64, 64)  # about one 96^3 crop touches 8-27 chunks; whole reads are unaffected
BLOCKS = (32, 32, 32)
MAX_FG_COORDS = 20000  # foreground voxel sample per case, for label-balanced crops
HASH_CHUNK = 1 << 22
ARRAY_FILES = ("image.b2nd", "label.b2nd", "fg.npy")
TMP_PREFIX = ".tmp-"  # .tmp-<entry>-<host>-<pid>-<rand>: an entry being written
STALE_TMP_AGE_S = 24 * 3600  # another host's temporary entry older than this is abandoned
_VERIFIED: set[tuple[str, int, int]] = set()  # (file, size, mtime_ns) checked in this process


def file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def verify_entry_files(entry_dir: Path, checksums: dict[str, str]) -> str | None:
    """None when every array file of an entry matches its recorded checksum, else why not.
    Each file is hashed once per process (keyed by size and mtime)."""
    if not checksums:
        return "no checksums recorded"
    for name, expected in checksums.items():
        f = entry_dir / name
        try:
            st = f.stat()
        except OSError:
            return f"{f} is missing"
        key = (str(f), st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            continue
        try:
            got = file_checksum(f)
        except OSError as exc:
            return f"{f} cannot be read ({exc})"
        if got != expected:
            return f"{f} does not match its checksum (flipped bytes or a truncated file)"
        _VERIFIED.add(key)
    return None


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------
def _source_files(path: str | Path) -> list[Path]:
    """Every file whose bytes define the scan (MHD + its data file; all slices of a DICOM folder)."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file())
    files = [p]
    if p.suffix.lower() in (".mhd", ".nhdr"):
        try:
            text = p.read_text(errors="replace")
        except OSError:
            text = ""
        m = re.search(r"^\s*(?:ElementDataFile|data file|datafile)\s*[=:]\s*(.+?)\s*$", text, re.M | re.I)
        if m and m.group(1).upper() != "LOCAL":
            files.append(p.parent / m.group(1))
    return files


def content_hash(path: str | Path) -> str:
    """blake2b over the full bytes (size + mtime can miss an in-place edit)."""
    h = hashlib.blake2b(digest_size=16)
    for f in _source_files(path):
        h.update(f.name.encode())
        try:
            with open(f, "rb") as fh:
                while block := fh.read(HASH_CHUNK):
                    h.update(block)
        except OSError as exc:
            raise DataError(
                f"{f}: cannot read ({exc}). Check that the file exists and is readable.", f
            ) from None
    return h.hexdigest()


def cache_key(image_hash: str, label_hash: str | None, cfg: PreprocessConfig) -> str:
    doc = {
        "format": CACHE_FORMAT,
        "image": image_hash,
        "label": label_hash,
        "preprocess": {**cfg.contract(), "image_interp": cfg.image_interp},
    }
    return hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=8).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
@dataclass
class CachedCase:
    """One preprocessed case. Arrays are read lazily; ``slices`` reads only the chunks needed."""

    id: str
    dir: Path
    key: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source: str
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    label_source: str | None = None
    has_label: bool = False
    label_values: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)  # array file name -> blake2b

    def _open(self, name: str):
        import blosc2

        problem = verify_entry_files(self.dir, self.checksums)
        if problem is not None:
            raise DataError(
                f"cache entry of case {self.id!r} is damaged: {problem}. Run `asa3d data prepare` with "
                "the same data settings (it rebuilds damaged entries), or delete the folder "
                f"{self.dir}.",
                self.dir / name,
            )
        try:
            return blosc2.open(str(self.dir / name), mode="r")
        except Exception as exc:  # blosc2 raises bare RuntimeError/ValueError on damaged files
            raise DataError(
                f"{self.dir / name}: cannot decode this cache file ({type(exc).__name__}: {exc}). "
                f"Delete {self.dir} and run `asa3d data prepare` again.",
                self.dir / name,
            ) from None

    def image(self, slices: tuple[slice, ...] | None = None) -> np.ndarray:
        arr = self._open("image.b2nd")
        raw = arr[tuple(slices)] if slices is not None else arr[:]
        return raw.astype(np.float32) * np.float32(UINT16_SCALE)

    def label(self, slices: tuple[slice, ...] | None = None) -> np.ndarray | None:
        if not self.has_label:
            return None
        arr = self._open("label.b2nd")
        return arr[tuple(slices)] if slices is not None else arr[:]

    def foreground_coords(self) -> np.ndarray:
        """(N, 3) int sample of voxels with label > 0 (empty when there is no label/foreground)."""
        f = self.dir / "fg.npy"
        return np.load(f) if f.is_file() else np.zeros((0, 3), dtype=np.int32)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "dir": self.dir.name, "key": self.key, "shape": list(self.shape),
            "spacing": list(self.spacing), "affine": np.asarray(self.affine).tolist(), "source": self.source,
            "source_affine": np.asarray(self.source_affine).tolist(), "source_shape": list(self.source_shape),
            "label_source": self.label_source, "has_label": self.has_label, "label_values": self.label_values,
            "warnings": self.warnings, "stats": self.stats, "checksums": self.checksums,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any], cache_dir: Path) -> CachedCase:
        return cls(
            id=d["id"], dir=cache_dir / d["dir"], key=d["key"], shape=tuple(d["shape"]),
            spacing=tuple(d["spacing"]), affine=np.asarray(d["affine"]), source=d["source"],
            source_affine=np.asarray(d["source_affine"]), source_shape=tuple(d["source_shape"]),
            label_source=d.get("label_source"), has_label=bool(d.get("has_label")),
            label_values=list(d.get("label_values") or []), warnings=list(d.get("warnings") or []),
            stats=dict(d.get("stats") or {}), checksums=dict(d.get("checksums") or {}),
        )  # fmt: skip


@dataclass
class CacheIndex:
    """The cases of one datalist split in a cache (``index.json`` holds one entry per split)."""

    cache_dir: Path
    cases: list[CachedCase]
    label_names: dict[int, str]
    preprocess: dict[str, Any]
    name: str = ""
    split: str = "training"
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"id", "path", "reason"}
    reused: int = 0
    built: int = 0

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> CachedCase:
        return self.cases[i]

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cases]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "preprocess": self.preprocess,
            "label_names": {str(k): v for k, v in self.label_names.items()},
            "cases": [c.to_json() for c in self.cases],
            "rejected": self.rejected,
        }

    def save(self) -> Path:
        """Merge this split into ``<cache_dir>/index.json`` (atomic replace)."""
        path = self.cache_dir / "index.json"
        doc: dict[str, Any] = {"format": INDEX_FORMAT, "datalists": {}}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
                if old.get("format") == INDEX_FORMAT:
                    doc = old
            except (OSError, json.JSONDecodeError):
                pass  # a damaged index is rebuilt from the entries
        doc["datalists"][f"{self.name}/{self.split}"] = self.to_json()
        atomic_write_text(path, json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, cache_dir: str | Path, name: str | None = None, split: str = "training") -> CacheIndex:
        d = Path(cache_dir)
        path = d / "index.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(
                f"{path}: cannot read the cache index ({exc}). Rebuild with `asa3d data prepare`.", path
            ) from None
        lists = doc.get("datalists", {})
        keys = [k for k in lists if k.endswith(f"/{split}") and (name is None or k == f"{name}/{split}")]
        if not keys:
            raise DataError(
                f"{path}: no datalist {name or '*'}/{split} in this cache (have {sorted(lists)}).", path
            )
        e = lists[keys[0]]
        return cls(
            cache_dir=d,
            cases=[CachedCase.from_json(c, d) for c in e["cases"]],
            label_names={int(k): v for k, v in e["label_names"].items()},
            preprocess=e["preprocess"],
            name=e["name"],
            split=e["split"],
            rejected=e.get("rejected", []),
        )


def _write_b2nd(array: np.ndarray, path: Path) -> None:
    import blosc2

    chunks = tuple(min(c, s) for c, s in zip(CHUNKS, array.shape, strict=False))
    blocks = tuple(min(b, c) for b, c in zip(BLOCKS, chunks, strict=False))
    cparams = blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=3, filters=[blosc2.Filter.SHUFFLE])
    blosc2.asarray(
        np.ascontiguousarray(array),
        chunks=chunks,
        blocks=blocks,
        urlpath=str(path),
        mode="w",
        cparams=cparams,
    )


def lookup_entry(
    item: dict[str, str], cfg: PreprocessConfig, cache_dir: Path, with_labels: bool
) -> tuple[str, CachedCase | None]:
    """(content key, the valid cached case or None). Hashes the source bytes."""
    if with_labels and not item.get("label"):
        raise DataError(
            f"{item['image']}: no label map listed for this case, but labels were requested. Add its label "
            "(dataset.json 'label' / --labels folder) or build without labels.",
            item["image"],
        )
    label_path = item.get("label") if with_labels else None
    image_hash = content_hash(item["image"])
    key = cache_key(image_hash, content_hash(label_path) if label_path else None, cfg)
    found = _read_entry(cache_dir / f"{_safe(item['id'])}-{key}", cache_dir)
    if found is None and not with_labels and item.get("label") and Path(item["label"]).is_file():
        # an image-only request is served by an existing labelled entry (no second preprocessing)
        with_label_key = cache_key(image_hash, content_hash(item["label"]), cfg)
        found = _read_entry(cache_dir / f"{_safe(item['id'])}-{with_label_key}", cache_dir)
    return key, found


def _read_entry(final: Path, cache_dir: Path) -> CachedCase | None:
    """The entry in ``final`` when it is complete and its checksums match; a damaged one is
    removed (and so rebuilt by ``build_entry``), with a warning naming it."""
    meta_file = final / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        case = CachedCase.from_json(json.loads(meta_file.read_text()), cache_dir)
        problem = verify_entry_files(final, case.checksums)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        problem = f"{meta_file} is unreadable ({type(exc).__name__})"
    if problem is None:
        return case
    log.warning("cache entry %s is damaged (%s): rebuilding it", final, problem)
    shutil.rmtree(final, ignore_errors=True)
    return None


def _host_tag() -> str:
    return _safe(socket.gethostname()).replace("-", "_")[:32]  # no "-": the tag is parsed back


def _tmp_owner_tag() -> str:
    return f"{_host_tag()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_entries(cache_dir: Path) -> list[Path]:
    """Delete what killed builders left in ``cache_dir``: temporary entry folders whose writer
    (on this host) is dead, or that are older than a day (another host's), and the hidden
    ``.*.tmp`` files of an interrupted ``index.json`` write.
    Live writers' folders are kept, so concurrent builds of one cache stay safe."""
    removed = []
    host = _host_tag()
    now = time.time()
    for d in cache_dir.glob(TMP_PREFIX + "*"):
        m = re.search(r"-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$", d.name)
        try:
            age = now - d.stat().st_mtime
        except OSError:
            continue
        if m and m.group("host") == host:
            stale = not _pid_alive(int(m.group("pid")))
        else:
            stale = age > STALE_TMP_AGE_S
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    # an index.json write (asa3d.atomic's hidden .<name>.<random>.tmp) takes milliseconds: a temp
    # file older than a minute is abandoned (a blanket remove_stale_tmp could hit a live writer's)
    for p in cache_dir.glob(".index.json.*.tmp"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > 60:
                p.unlink()
                removed.append(p)
    if removed:
        log.info(
            "removed %d leftover temporary item(s) of an interrupted build in %s", len(removed), cache_dir
        )
    return removed


def build_entry(
    item: dict[str, str], cfg: PreprocessConfig, cache_dir: Path, with_labels: bool, classes: list[int] | None
) -> tuple[CachedCase, bool]:
    """Build (or reuse) one case's entry. Returns (case, reused). Raises DataError for a bad scan."""
    from asa3d.data.io import read_volume
    from asa3d.data.preprocess import preprocess_volumes
    from asa3d.data.validate import validate_image, validate_label

    key, found = lookup_entry(item, cfg, cache_dir, with_labels)
    if found is not None:
        return found, True
    label_path = item.get("label") if with_labels else None
    final = cache_dir / f"{_safe(item['id'])}-{key}"

    image = read_volume(item["image"])
    warns = validate_image(image, emit=False)  # logged by build_cache
    label = None
    if label_path:
        label = read_volume(label_path)
        validate_label(label, image, classes)
    a = image.array
    stats = {
        "min": float(a.min()),
        "max": float(a.max()),
        "mean": float(a.mean()),
        "p01": float(np.percentile(a, 1)),
        "p99": float(np.percentile(a, 99)),
    }
    try:
        img, lab, affine = preprocess_volumes(image, label, cfg)
    except Exception as exc:  # MONAI errors carry long traces; the user needs the file and the reason
        raise DataError(
            f"{item['image']}: preprocessing failed ({type(exc).__name__}: {exc}).", item["image"]
        ) from exc

    tmp = cache_dir / f"{TMP_PREFIX}{final.name}-{_tmp_owner_tag()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        _write_b2nd(np.rint(np.clip(img, 0.0, 1.0) * 65535.0).astype(np.uint16), tmp / "image.b2nd")
        values: list[int] = []
        if lab is not None:
            _write_b2nd(lab, tmp / "label.b2nd")
            values = [int(v) for v in np.unique(lab)]
            fg = np.argwhere(lab > 0).astype(np.int32)
            if len(fg) > MAX_FG_COORDS:
                fg = fg[np.random.default_rng(0).choice(len(fg), MAX_FG_COORDS, replace=False)]
            np.save(tmp / "fg.npy", fg)
        case = CachedCase(
            id=item["id"], dir=final, key=key, shape=tuple(int(s) for s in img.shape),
            spacing=tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)), affine=affine,
            source=str(item["image"]), source_affine=image.affine, source_shape=image.shape,
            label_source=str(label_path) if label_path else None, has_label=lab is not None,
            label_values=values, warnings=warns, stats=stats,
            checksums={f: file_checksum(tmp / f) for f in ARRAY_FILES if (tmp / f).is_file()},
        )  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(case.to_json(), indent=1))  # written last
        try:
            os.rename(tmp, final)  # the commit point
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent identical build
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return case, False


def _worker(item, cfg, cache_dir, with_labels, classes):
    try:
        return build_entry(item, cfg, cache_dir, with_labels, classes)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{item['image']}: {type(exc).__name__}: {exc}", item["image"]) from None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent_pid: int) -> None:
    """Make this worker exit when the process that started the build dies, even by SIGKILL (an
    orphaned worker would keep decoding and writing, about 1 GB each). Linux: the kernel sends
    SIGKILL when our parent (the fork server, which exits with the main process) goes; everywhere:
    a watchdog thread polls the main process."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if not _pid_alive(parent_pid) or os.getppid() == 1:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="asa3d-parent-watchdog").start()


def _init_worker(parent_pid: int) -> None:
    import torch

    _die_with(parent_pid)
    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal only, so logs and CI output stay quiet
    return tqdm(total=total, desc=desc, unit="scan", file=sys.stderr, disable=None if enabled else True)


def _build_parallel(
    datalist, todo, preprocess_cfg, cdir, with_labels, classes, workers, skip_bad, results, errors, bar
) -> None:
    # Not plain fork: forking a parent whose torch/OpenMP thread pool is running can deadlock.
    # A fork server that has only imported the heavy modules forks workers quickly and safely.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["asa3d.data.cache", "asa3d.data.preprocess"])
    with ProcessPoolExecutor(
        max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)
    ) as pool:
        futures = {
            pool.submit(_worker, datalist.items[i], preprocess_cfg, cdir, with_labels, classes): i
            for i in todo
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                i = futures[f]
                exc = f.exception()
                if exc is None:
                    results[i] = f.result()
                elif isinstance(exc, DataError):
                    errors[i] = exc
                else:
                    errors[i] = DataError(f"{datalist.items[i]['image']}: {type(exc).__name__}: {exc}")
                bar.update(1)
            if errors and not skip_bad:
                for f in pending:
                    f.cancel()  # running ones finish (their writes are atomic)
                break


def build_cache(
    datalist: Datalist,
    preprocess_cfg: PreprocessConfig,
    cache_dir: str | Path,
    workers: int = 1,
    skip_bad: bool = False,
    with_labels: bool = False,
    progress: bool = False,
) -> CacheIndex:
    """Preprocess every case of ``datalist`` into ``cache_dir`` (reusing valid entries).

    ``workers`` > 1 builds in that many processes (which die with this one). ``progress``: a
    tqdm bar with ETA on stderr (shown only on a terminal). A bad scan raises ``DataError`` naming the file
    (entries already written stay), or with ``skip_bad`` is recorded in ``index.rejected``.
    """
    cdir = Path(cache_dir).expanduser()
    try:
        cdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{cdir}: cannot create the cache folder ({exc}). Set data.cache_dir / --cache-dir to a "
            "writable folder.",
            cdir,
        ) from None
    remove_stale_entries(cdir)
    classes = sorted(datalist.label_names) if datalist.label_names else None
    n = len(datalist.items)
    results: list[tuple[CachedCase, bool] | None] = [None] * n
    errors: dict[int, DataError] = {}

    todo = []
    for i, item in enumerate(datalist.items):
        try:
            _, found = lookup_entry(item, preprocess_cfg, cdir, with_labels)
        except DataError as exc:
            if not skip_bad:
                raise
            errors[i] = exc
            continue
        if found is not None:
            results[i] = (found, True)
        else:
            todo.append(i)

    bar = _progress_bar(len(todo), progress, f"caching {datalist.name}")
    try:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                item = datalist.items[i]
                bar.set_postfix_str(item["id"], refresh=False)
                try:
                    results[i] = _worker(item, preprocess_cfg, cdir, with_labels, classes)
                except DataError as exc:
                    if not skip_bad:
                        raise
                    errors[i] = exc
                bar.update(1)
        else:
            _build_parallel(
                datalist,
                todo,
                preprocess_cfg,
                cdir,
                with_labels,
                classes,
                workers,
                skip_bad,
                results,
                errors,
                bar,
            )
            if errors and not skip_bad:
                raise errors[min(errors)]
    finally:
        bar.close()

    rejected = []
    for i, exc in sorted(errors.items()):
        it = datalist.items[i]
        log.warning("skipped %s: %s", it["id"], exc)
        rejected.append({"id": it["id"], "path": it["image"], "reason": str(exc)})
    cases = [r[0] for r in results if r is not None]
    for c, reused in (r for r in results if r is not None):
        if not reused:
            for w in c.warnings:
                log.warning(w)
    label_names = dict(datalist.label_names)
    if with_labels and not label_names:
        values = sorted({v for c in cases for v in c.label_values} | {0})
        label_names = {v: ("background" if v == 0 else f"class_{v}") for v in values}
    index = CacheIndex(
        cache_dir=cdir, cases=cases, label_names=label_names if with_labels else {},
        preprocess={**preprocess_cfg.contract(), "image_interp": preprocess_cfg.image_interp},
        name=datalist.name, split=datalist.split, rejected=rejected,
        reused=sum(1 for r in results if r is not None and r[1]),
        built=sum(1 for r in results if r is not None and not r[1]),
    )  # fmt: skip
    if not cases:
        raise DataError(
            f"no usable scans in {datalist.root}: all {n} were rejected "
            f"(first: {rejected[0]['reason'] if rejected else 'none'}).",
            datalist.root,
        )
    index.save()
    return index

"""Cache faults: flipped or truncated entry bytes, leftovers of a killed build, workers that
outlive a SIGKILLed parent. Each test builds its own bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asa3d.config_sections import PreprocessConfig
from asa3d.data import cache as cache_mod
from asa3d.data.cache import build_cache
from asa3d.data.datalist import load_datalist
from asa3d.data.errors import DataError
from asa3d.data.msd_json import write_dataset_json

CFG = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, n: int = 2, shape=(20, 18, 12)) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(-1000, 1200, shape).astype(np.int16)
        nib.save(
            nib.Nifti1Image(img, np.diag([4.0, 4.0, 4.0, 1.0])), str(root / "imagesTr" / f"case{i}.nii.gz")
        )
        entries.append({"image": f"imagesTr/case{i}.nii.gz"})
    return write_dataset_json(root / "dataset.json", "toy", {}, entries)


def _forget_verified() -> None:
    cache_mod._VERIFIED.clear()  # what a fresh process would know


def test_flipped_bytes_are_detected_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dl = load_datalist(make_dataset(tmp_path / "d"))
    idx = build_cache(dl, CFG, tmp_path / "c")
    good = idx.cases[0].image()
    f = idx.cases[0].dir / "image.b2nd"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the compressed data
    st = f.stat()
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the bytes differ
    _forget_verified()
    # a reader refuses it, naming the entry, instead of decoding wrong voxels
    with pytest.raises(DataError, match="does not match its checksum") as exc:
        idx.cases[0].image()
    assert str(idx.cases[0].dir) in str(exc.value) and "asa3d data prepare" in str(exc.value)
    # the next build finds it, says so, and rebuilds it
    _forget_verified()
    again = build_cache(dl, CFG, tmp_path / "c")
    assert (again.built, again.reused) == (1, 1)
    assert any("damaged" in r.message and "case0" in r.message for r in caplog.records)
    np.testing.assert_array_equal(again.cases[0].image(), good)


def test_truncated_entry_gives_a_named_error_not_a_blosc2_traceback(tmp_path: Path) -> None:
    dl = load_datalist(make_dataset(tmp_path / "d"))
    idx = build_cache(dl, CFG, tmp_path / "c")
    f = idx.cases[1].dir / "image.b2nd"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    _forget_verified()
    with pytest.raises(DataError) as exc:
        idx.cases[1].image((slice(0, 4), slice(0, 4), slice(0, 4)))
    assert str(f) in str(exc.value) and "truncated" in str(exc.value)
    _forget_verified()
    assert build_cache(dl, CFG, tmp_path / "c").built == 1


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_a_killed_build_are_removed(tmp_path: Path) -> None:
    dl = load_datalist(make_dataset(tmp_path / "d"))
    cdir = tmp_path / "c"
    cdir.mkdir()
    host = cache_mod._host_tag()
    dead = cdir / f".tmp-case0-abc-{host}-{_dead_pid()}-0123abcd"
    live = cdir / f".tmp-case1-abc-{host}-{os.getpid()}-4567abcd"  # a concurrent live writer's
    for d in (dead, live):
        d.mkdir()
        (d / "image.b2nd").write_bytes(b"half written")
    stale_index = cdir / ".index.json.x1y2.tmp"
    stale_index.write_text("{")
    old = time.time() - 3600
    os.utime(stale_index, (old, old))
    idx = build_cache(dl, CFG, cdir)
    assert not dead.exists() and not stale_index.exists()
    assert live.exists()  # never removed while its writer lives
    assert len(idx) == 2 and not [p for p in cdir.iterdir() if p.name.startswith(".stale-")]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_sigkill_of_prepare_leaves_no_orphaned_workers(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "d", n=6, shape=(160, 160, 120))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "asa3d.cli", "data", "prepare", str(ds), "--workers", "2",
           "--spacing", "1", "1", "1", "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(workers) < 3:  # fork server + 2 workers
            workers = _descendants(proc.pid)
            time.sleep(0.2)
        assert len(workers) >= 3, f"workers never started: {workers}"
        time.sleep(1.0)  # let them start writing
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not [p for p in workers if _alive(p)], "workers outlived their SIGKILLed parent"
    finally:
        for p in workers | _descendants(proc.pid):  # never leave our own strays behind
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    # the next run cleans the half-written entries the killed one left and finishes the cache
    idx = build_cache(load_datalist(ds), PreprocessConfig(spacing=(8.0, 8.0, 8.0)), tmp_path / "c")
    assert len(idx) == 6
    assert not list((tmp_path / "c").glob(".tmp-*"))

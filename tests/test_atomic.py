"""The atomic-write helpers: a failed write leaves the old file and no temp file behind."""

from __future__ import annotations

import json

import pytest

from asa3d.atomic import atomic_open, atomic_write_json, atomic_write_text, remove_stale_tmp


def test_write_replaces_whole_file(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [q.name for q in p.parent.iterdir()] == ["a.json"]


def test_exception_keeps_old_content_and_removes_tmp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError), atomic_open(p, "w") as f:
        f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["a.txt"]


def test_remove_stale_tmp_removes_only_tmp(tmp_path):
    (tmp_path / ".a.txt.abc.tmp").write_text("stale")
    (tmp_path / ".dir.tmp").mkdir()
    (tmp_path / "keep.txt").write_text("keep")
    (tmp_path / "keep.tmp").write_text("not hidden: not ours")
    removed = remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in removed) == [".a.txt.abc.tmp", ".dir.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "keep.txt"]


def test_written_files_get_the_mode_open_would_give(tmp_path) -> None:
    """Results are readable by whoever could read a file ``open()`` made (mkstemp's 0o600 is not
    kept), for every writer."""
    import os

    from asa3d.atomic import atomic_path, atomic_write_json, atomic_write_text

    old = os.umask(0o022)
    try:
        import asa3d.atomic as atomic

        atomic._FILE_MODE = None  # read the umask set here
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        with atomic_path(tmp_path / "c.txt") as p:
            p.write_text("y")
        for name in ("a.txt", "b.json", "c.txt"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(old)
        atomic._FILE_MODE = None

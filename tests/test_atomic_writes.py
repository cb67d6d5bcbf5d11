"""Every result asa3d writes goes through ``asa3d.atomic``: a guard that parses ``src/`` for raw
writes, and the path helper for writers that need a file name (savefig, SimpleITK, nibabel)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from asa3d.atomic import atomic_path, remove_stale_tmp

SRC = Path(__file__).resolve().parents[1] / "src" / "asa3d"

# (file, enclosing function) -> why a raw write is right there. Anything else fails the guard.
ALLOWED = {
    ("engine/metrics_log.py", "__init__"): "metrics.jsonl is an append-only log that grows during the "
    "run (line-buffered, so a kill loses at most the last line); a whole-file rewrite per step "
    "would be quadratic",
    ("data/cache.py", "build_entry"): "a cache entry is written into a private temp folder that one "
    "os.rename commits (folder-level atomicity; meta.json written last inside it)",
}

# (owner, attribute) or attribute alone -> index of the destination argument (None: the receiver)
DEST_ARG = {
    ("np", "save"): 0,
    ("np", "savez"): 0,
    ("np", "savez_compressed"): 0,
    ("np", "savetxt"): 0,
    ("numpy", "save"): 0,
    ("torch", "save"): 1,
    ("sitk", "WriteImage"): 1,
    ("SimpleITK", "WriteImage"): 1,
    ("nib", "save"): 1,
    ("nibabel", "save"): 1,
    "savefig": 0,
    "write_text": None,
    "write_bytes": None,
    "to_filename": 0,
}
WRITE_MODES = set("wax+")


def _mode(call: ast.Call, pos: int) -> str | None:
    for kw in call.keywords:
        if kw.arg == "mode" and isinstance(kw.value, ast.Constant):
            return str(kw.value.value)
    if len(call.args) > pos and isinstance(call.args[pos], ast.Constant):
        return str(call.args[pos].value)
    return None


def _safe_names(tree: ast.AST) -> set[str]:
    """Names a write may target: lambda parameters (``atomic_write_with(p, lambda f: ...)``), names
    bound by ``with atomic_*(...) as name``, and in-memory buffers (``io.BytesIO()``)."""
    safe: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Lambda):
            safe |= {a.arg for a in node.args.args}
        elif isinstance(node, ast.With):
            for item in node.items:
                ctx = item.context_expr
                fn = ctx.func if isinstance(ctx, ast.Call) else None
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name.startswith("atomic_") and isinstance(item.optional_vars, ast.Name):
                    safe.add(item.optional_vars.id)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            fn = node.value.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("BytesIO", "StringIO"):
                safe |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return safe


def raw_writes(path: Path) -> list[tuple[str, int, str]]:
    """(enclosing function, line, call) of every write in ``path`` that bypasses asa3d.atomic."""
    tree = ast.parse(path.read_text())
    safe = _safe_names(tree)
    found: list[tuple[str, int, str]] = []

    def dest_ok(node: ast.AST | None) -> bool:
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("str", "os.fspath") and node.args:
            node = node.args[0]  # str(tmp): the same path
        return isinstance(node, ast.Name) and node.id in safe

    def check(call: ast.Call, func: str) -> None:
        f = call.func
        what = ast.unparse(f)
        if isinstance(f, ast.Name) and f.id == "open":
            mode = _mode(call, 1)
            if mode and WRITE_MODES & set(mode) and not dest_ok(call.args[0] if call.args else None):
                found.append((func, call.lineno, f"open(..., {mode!r})"))
            return
        if not isinstance(f, ast.Attribute):
            return
        if f.attr == "open":  # Path.open("w")
            mode = _mode(call, 0)
            if mode and WRITE_MODES & set(mode) and not dest_ok(f.value):
                found.append((func, call.lineno, f"{what}({mode!r})"))
            return
        owner = f.value.id if isinstance(f.value, ast.Name) else None
        key = (owner, f.attr) if (owner, f.attr) in DEST_ARG else f.attr
        if key not in DEST_ARG:
            return
        pos = DEST_ARG[key]
        target = f.value if pos is None else (call.args[pos] if len(call.args) > pos else None)
        if not dest_ok(target):
            found.append((func, call.lineno, what))

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            if isinstance(child, ast.Call):
                check(child, func)
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_no_raw_write_outside_asa3d_atomic() -> None:
    bad, used = [], set()
    for p in sorted(SRC.rglob("*.py")):
        rel = str(p.relative_to(SRC))
        if rel == "atomic.py":
            continue
        for func, line, call in raw_writes(p):
            if (rel, func) in ALLOWED:
                used.add((rel, func))
            else:
                bad.append(f"{rel}:{line} ({func}): {call}")
    assert not bad, (
        "results must be written through asa3d.atomic (atomic_write_text/_json/_bytes, atomic_open, "
        "atomic_write_with, atomic_path), or be allowed with a reason in ALLOWED:\n" + "\n".join(bad)
    )
    assert used == set(ALLOWED), f"stale ALLOWED entries: {sorted(set(ALLOWED) - used)}"


def test_the_guard_sees_raw_writes_and_passes_atomic_ones(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "import io, json, csv, numpy as np, torch, nibabel as nib, SimpleITK as sitk\n"
        "from asa3d.atomic import atomic_open, atomic_path, atomic_write_with\n"
        "def bad(p, fig, img, out):\n"
        "    open(p, 'w').write('x')\n"
        "    p.write_text('x')\n"
        "    (out / 'a.csv').open('a')\n"
        "    np.savez_compressed(out / 'x.npz', a=1)\n"
        "    fig.savefig(p)\n"
        "    torch.save({}, p)\n"
        "    sitk.WriteImage(img, str(p))\n"
        "    nib.save(img, p)\n"
        "def good(p, fig, img):\n"
        "    open(p).read()\n"
        "    atomic_write_with(p, lambda f: torch.save({}, f))\n"
        "    with atomic_path(p) as tmp:\n"
        "        fig.savefig(tmp)\n"
        "        nib.save(img, tmp)\n"
        "        sitk.WriteImage(img, str(tmp))\n"
        "    with atomic_open(p, 'w') as fh:\n"
        "        json.dump({}, fh)\n"
        "    buf = io.BytesIO()\n"
        "    np.savez_compressed(buf, a=1)\n"
        "    s = 'p.write_text(x)'\n"
    )
    found = raw_writes(f)
    assert {fn for fn, _, _ in found} == {"bad"} and len(found) == 8, found


def test_atomic_path_renames_into_place_target_last_and_cleans_up(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = tmp_path / "plots" / "a.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    with atomic_path(png) as tmp:
        assert tmp.name == "a.png" and tmp.parent != png.parent and tmp.parent.name.endswith(".tmp")
        fig.savefig(tmp)  # the suffix picks the format
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in png.parent.iterdir()) == ["a.png"]
    # a writer that fails leaves neither the target nor its temp folder
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.png") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert not (tmp_path / "b.png").exists() and not remove_stale_tmp(tmp_path)


def test_metaimage_pair_is_written_atomically_with_its_raw(tmp_path: Path) -> None:
    """SimpleITK writes a header and a (compressed) data file; both arrive under their final
    names, the header naming the data file by its final name."""
    from asa3d.data.io import read_volume, write_volume

    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    out = write_volume(arr, tmp_path / "seg.mhd", affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.mhd", "seg.zraw"]
    assert "ElementDataFile = seg.zraw" in out.read_text()
    np.testing.assert_array_equal(read_volume(out).array, arr)

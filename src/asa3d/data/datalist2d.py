"""Datalists of 2D images: a folder of PNG / JPEG / DICOM files (searched recursively).

The result is the same ``Datalist`` the 3D data layer uses; items are ``{"image": abs path,
"id": str}``. Ids are the file's path below the folder without its suffix, with ``/`` replaced by
``__`` (so ``images_001/images/00000001_000.png`` -> ``images_001__images__00000001_000``) unless
every file name is unique, in which case the bare stem is used.
"""

from __future__ import annotations

from pathlib import Path

from asa3d.data.datalist import Datalist
from asa3d.data.errors import DataError
from asa3d.data.io2d import IMAGE2D_SUFFIXES

__all__ = ["image2d_id", "list_images2d", "load_folder_2d"]


def image2d_id(path: Path) -> str:
    name = path.name
    for suf in IMAGE2D_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def list_images2d(folder: str | Path) -> list[Path]:
    """PNG / JPEG / DICOM files below ``folder`` (recursive, hidden entries skipped), sorted."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder. Point data.root at the folder that holds the images.", root)
    out = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if f.is_file() and f.name.lower().endswith(IMAGE2D_SUFFIXES):
            out.append(f)
    return out


def load_folder_2d(folder: str | Path, split: str = "training") -> Datalist:
    """Every 2D image below ``folder`` as one ``training`` split (unlabelled pretraining data)."""
    root = Path(folder).expanduser().resolve()
    if split not in ("training", "all"):
        raise DataError(f"{root}: a plain image folder has only one split ('training'); got {split!r}.", root)
    files = list_images2d(root)
    if not files:
        raise DataError(
            f"{root}: no 2D images found (looked for {', '.join(IMAGE2D_SUFFIXES)} files, recursively).",
            root,
        )
    stems = [image2d_id(f) for f in files]
    if len(set(stems)) != len(stems):
        rels = [f.relative_to(root) for f in files]
        stems = ["__".join((*r.parts[:-1], image2d_id(r))) for r in rels]
    items = [{"image": str(f), "id": i} for f, i in zip(files, stems, strict=True)]
    return Datalist(items=items, label_names={}, name=root.name, split=split, root=root, source="folder2d")

"""The two images Eve compares, as the network saw its training data, with their landmarks.

2D: PNG / JPEG / DICOM through ``asa3d.data.io2d`` (grey, scaled to [0, 1], native size: Adam-2D
decomposes and crops the native image). 3D: any scan ``asa3d.data.io`` reads, through the
canonical preprocessing the checkpoint records (RAS, spacing, HU window to [0, 1]), then resized
to the cube the method trained on (``volume_size``; anisotropic voxels, their size is kept so
crops can be given in millimetres).

Landmarks: centroids of labelled structures when label maps are given (2D: a DRR mask ``.npz``
with ``masks`` (C, H, W) and ``names``, or an integer label PNG; 3D: a label volume, preprocessed
with its scan), else a grid fallback (nine points: 3 x 3 in 2D, the eight octant centres and the
centre in 3D), whose cross-image scores assume the two images are roughly aligned.

``augmented_copy`` makes the within-patient pair of Adam's supplement: the image rotated by 10
degrees (3D: about z) and cropped, its landmarks mapped through the same transform exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from asa3d.data.errors import DataError
from asa3d.eve.landmarks import label_landmarks, mask_landmarks

__all__ = ["EveInput", "augmented_copy", "common_landmarks", "grid_landmarks", "read_input"]

MAX_LANDMARKS = 10  # one tab10 colour each
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class EveInput:
    name: str  # "A", "B", "A'" (augmented copy)
    path: Path
    image: torch.Tensor  # (1, *spatial) float32 in [0, 1], the frame the network sees
    pixel_size: np.ndarray  # (D,) size of one pixel / voxel in ``unit``
    unit: str  # "mm", or "px" (pixels of the original image: 2D files without spacing)
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> centre, pixel coords
    landmark_source: str = "grid"  # "labels" | "grid"
    landmark_pixels: dict[str, int] = field(default_factory=dict)  # structure sizes (choosing landmarks)
    patient: int = 0  # copies share their original's (leave-one-patient-out scores)
    transform: str | None = None  # how a copy was made
    # a copy's map from its original's pixel coordinates: p_copy = c + inv(a) (p - c - t)
    copy_map: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (a, t, c)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.image.shape[1:])

    @property
    def dims(self) -> int:
        return self.image.ndim - 1

    def from_original(self, points: np.ndarray) -> np.ndarray:
        """(N, D) pixel coordinates of the original image -> this copy's (identity for originals)."""
        pts = np.asarray(points, np.float64).reshape(-1, self.dims)
        if self.copy_map is None:
            return pts
        a, t, c = self.copy_map
        return c + (pts - c - t) @ np.linalg.inv(a).T

    def size_px(self, size: float) -> np.ndarray:
        """(D,) pixels of a crop of side ``size`` ``unit``."""
        return np.full(self.dims, float(size)) / self.pixel_size


def grid_landmarks(shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Nine fallback landmarks: a 3 x 3 grid at 1/4, 1/2, 3/4 (2D); the eight octant centres and the
    centre (3D)."""
    s = np.asarray(shape, np.float64)
    if len(shape) == 2:
        fr = [(a, b) for a in (0.25, 0.5, 0.75) for b in (0.25, 0.5, 0.75)]
    else:
        fr = [(a, b, c) for a in (0.25, 0.75) for b in (0.25, 0.75) for c in (0.25, 0.75)] + [(0.5, 0.5, 0.5)]
    return {f"grid {i + 1}": np.asarray(f) * s - 0.5 for i, f in enumerate(fr)}


def _label_names(label_path: Path, given: Path | None) -> dict[int, str] | None:
    """Class names: ``--label-names`` (a dataset.json with "labels", or a {"1": "liver"} map), else
    a dataset.json beside the label map's folder (the MSD layout), else None."""
    cands = (
        [given]
        if given is not None
        else [label_path.parent / "dataset.json", label_path.parent.parent / "dataset.json"]
    )
    for js in cands:
        if js is None or not js.is_file():
            if given is not None:
                raise DataError(
                    f"{given}: file not found. Fix: give a dataset.json or a JSON map of class names.", given
                )
            continue
        try:
            doc = json.loads(js.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{js}: not readable JSON ({exc}). Fix: give a dataset.json or a JSON map.", js
            ) from None
        labels = doc.get("labels", doc) if isinstance(doc, dict) else None
        if isinstance(labels, dict):
            out = {}
            for k, v in labels.items():
                if str(k).lstrip("-").isdigit():
                    out[int(k)] = str(v)
                elif str(v).lstrip("-").isdigit():  # {"liver": 1} layouts
                    out[int(v)] = str(k)
            if out:
                return out
        if given is not None:
            raise DataError(f"{js}: no class names found (expected a 'labels' map). Fix: add one.", js)
    return None


def _check_label_shape(label: np.ndarray, shape: Sequence[int], path: Path, image: Path) -> None:
    if tuple(label.shape[-len(shape) :]) != tuple(shape):
        raise DataError(
            f"{path}: label shape {tuple(label.shape)} does not match its image {image} {tuple(shape)}. "
            "Fix: give the label map made for that image (same grid).",
            path,
        )


def _read_2d(path: Path, labels: Path | None, label_names: Path | None) -> EveInput:
    from asa3d.data.io2d import image2d_kind, read_image2d

    if image2d_kind(path) == "unknown":
        from asa3d.data.io import volume_kind

        if volume_kind(path) != "unknown":
            raise DataError(
                f"{path}: a 3D scan, but the checkpoint's network is 2D. Fix: give 2D images (PNG, JPEG "
                "or DICOM radiographs), or a checkpoint of a 3D method (e.g. Adam-3D, ASA).",
                path,
            )
    img = read_image2d(path)
    arr = img.to_unit()
    spacing = img.spacing
    inp = EveInput(
        name="",
        path=path,
        image=torch.from_numpy(np.ascontiguousarray(arr))[None],
        pixel_size=np.asarray(spacing if spacing else (1.0, 1.0), np.float64),
        unit="mm" if spacing else "px",
    )
    if labels is None:
        return inp
    if not labels.is_file():
        raise DataError(f"{labels}: label file not found. Check the path.", labels)
    if labels.suffix == ".npz":
        try:
            with np.load(labels, allow_pickle=False) as z:
                masks, names = np.asarray(z["masks"]), [str(n) for n in z["names"]]
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(
                f"{labels}: expected an .npz with 'masks' (C, H, W) and 'names' (as asa3d.data.drr writes) "
                f"({type(exc).__name__}: {exc}).",
                labels,
            ) from None
        _check_label_shape(masks, arr.shape, labels, path)
        counts: dict[str, int] = {}
        lms = mask_landmarks(masks, names, counts=counts)
    else:
        lab = read_image2d(labels).array
        _check_label_shape(lab, arr.shape, labels, path)
        names = _label_names(labels, label_names) or {int(k): f"label {int(k)}" for k in np.unique(lab) if k}
        counts = {}
        lms = label_landmarks(lab, names, counts=counts)
    return replace(inp, landmarks=lms, landmark_source="labels", landmark_pixels=counts)


def _read_3d(
    path: Path,
    labels: Path | None,
    label_names: Path | None,
    preprocessing: Mapping[str, Any] | None,
    volume_size: int,
) -> EveInput:
    from asa3d.config_sections import PreprocessConfig
    from asa3d.data.io import read_volume
    from asa3d.data.preprocess import preprocess_volumes

    if path.is_file() and path.suffix.lower() in IMAGE_2D_SUFFIXES:
        raise DataError(
            f"{path}: a 2D image, but the checkpoint's network is 3D. Fix: give CT volumes (NIfTI, "
            "MetaImage, NRRD or a DICOM series folder), or a checkpoint of a 2D method (Adam-2D).",
            path,
        )
    vol = read_volume(path)
    lab_vol = read_volume(labels) if labels is not None else None
    if lab_vol is not None and lab_vol.shape != vol.shape:
        raise DataError(
            f"{labels}: label shape {lab_vol.shape} does not match its scan {path} {vol.shape}. "
            "Fix: give the label map of that scan.",
            labels,
        )
    pre = preprocessing or {}
    cfg = PreprocessConfig(
        orientation=pre.get("orientation", "RAS"),
        spacing=tuple(float(s) for s in pre.get("spacing_mm", PreprocessConfig().spacing)),  # type: ignore[arg-type]
        window=tuple(float(w) for w in pre.get("hu_window", PreprocessConfig().window)),  # type: ignore[arg-type]
    )
    img, lab, _ = preprocess_volumes(vol, lab_vol, cfg)
    shape = np.asarray(img.shape, np.float64)
    cube = torch.from_numpy(img)[None, None]
    cube = F.interpolate(cube, size=(volume_size,) * 3, mode="trilinear", align_corners=False)[0]
    scale = volume_size / shape  # new voxels per old voxel, per axis
    inp = EveInput(
        name="",
        path=path,
        image=cube.clamp(0, 1).contiguous(),
        pixel_size=np.asarray(cfg.spacing, np.float64) / scale,
        unit="mm",
    )
    if lab is None or labels is None:
        return inp
    names = _label_names(labels, label_names) or {int(k): f"label {int(k)}" for k in np.unique(lab) if k}
    counts: dict[str, int] = {}
    lms = {k: (v + 0.5) * scale - 0.5 for k, v in label_landmarks(lab, names, counts=counts).items()}
    return replace(inp, landmarks=lms, landmark_source="labels", landmark_pixels=counts)


def read_input(
    path: str | Path,
    spatial_dims: int,
    labels: str | Path | None = None,
    label_names: str | Path | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    volume_size: int = 128,
    name: str = "",
    patient: int = 0,
) -> EveInput:
    """Read one image (2D) or scan (3D) for a network of ``spatial_dims``; see the module doc."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: file not found. Check the path.", p)
    lp = Path(labels).expanduser() if labels is not None else None
    if lp is not None and not lp.exists():
        raise DataError(f"{lp}: label file not found. Check the path (--labels gives one per image).", lp)
    names = Path(label_names).expanduser() if label_names is not None else None
    inp = _read_2d(p, lp, names) if spatial_dims == 2 else _read_3d(p, lp, names, preprocessing, volume_size)
    if not inp.landmarks:
        if lp is not None:
            raise DataError(
                f"{lp}: no labelled structure of at least a few pixels. Fix: check that it is the label "
                "map of its image, or leave --labels out to use grid landmarks.",
                lp,
            )
        inp = replace(inp, landmarks=grid_landmarks(inp.shape), landmark_source="grid")
    return replace(inp, name=name, patient=patient)


def common_landmarks(inputs: Sequence[EveInput], wanted: Sequence[str] | None = None) -> list[str]:
    """Landmark names present in every input: ``wanted``'s in its order, else the ``MAX_LANDMARKS``
    largest structures (mean pixel count; small ones have unstable centroids and few distinct
    patches), in the first input's order."""
    shared = [n for n in inputs[0].landmarks if all(n in i.landmarks for i in inputs)]
    if wanted:
        missing = [n for n in wanted if n not in shared]
        if missing:
            raise DataError(
                f"--landmarks {missing}: not labelled in every image (shared: {shared}). "
                "Fix: choose among those."
            )
        return list(wanted)[:MAX_LANDMARKS]
    size = {n: float(np.mean([i.landmark_pixels.get(n, 0) for i in inputs])) for n in shared}
    keep = set(sorted(shared, key=lambda n: -size[n])[:MAX_LANDMARKS])
    return [n for n in shared if n in keep]


def _rotation(dims: int, degrees: float) -> np.ndarray:
    """Rotation in the plane of the first two axes (2D: the image; 3D (x, y, z): about z)."""
    t = math.radians(degrees)
    r = np.eye(dims)
    r[0, 0], r[0, 1], r[1, 0], r[1, 1] = math.cos(t), -math.sin(t), math.sin(t), math.cos(t)
    return r


def augmented_copy(
    inp: EveInput, degrees: float = 10.0, zoom: float = 0.85, shift: float = 0.04, seed: int = 0
) -> EveInput:
    """``inp`` rotated by ``degrees`` and cropped to ``zoom`` of its extent (magnified back to its
    size) at a random offset of up to ``shift`` of the extent, with landmarks mapped exactly;
    landmarks that leave the image are dropped. Output pixel p shows input point
    c + zoom * R (p - c) + t, with c the centre."""
    dims = inp.dims
    shape = np.asarray(inp.shape, np.float64)
    rng = np.random.default_rng(seed)
    c = (shape - 1) / 2
    a = zoom * _rotation(dims, degrees)
    t = rng.uniform(-shift, shift, dims) * shape
    axes = [torch.arange(int(n), dtype=torch.float64) for n in shape]
    p_out = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (*shape, D)
    p_in = torch.from_numpy(c + t) + (p_out - torch.from_numpy(c)) @ torch.from_numpy(a).T
    norm = (p_in + 0.5) * 2.0 / torch.from_numpy(shape) - 1.0
    grid = norm.flip(-1)[None].float()  # grid_sample wants the last axis first
    img = F.grid_sample(
        inp.image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]
    out = replace(inp, copy_map=(a, t, c))
    lms = {}
    for k, v in inp.landmarks.items():
        q = out.from_original(np.asarray(v, np.float64))[0]
        if np.all(q >= 0) and np.all(q <= shape - 1):
            lms[k] = q
    return replace(
        out,
        name=inp.name + "'",
        image=img.contiguous(),
        pixel_size=inp.pixel_size * zoom,
        landmarks=lms,
        transform=f"rotated {degrees:g} degrees{' about z' if dims == 3 else ''}, cropped to {zoom:g} of "
        f"the extent (seed {seed})",
    )

"""Digitally reconstructed radiographs (DRRs): the embedded 2D default data set.

A DRR is a parallel-beam projection of a CT along the anterior-posterior axis (y of an RAS
volume): attenuation from HU, ``mu = mu_water * (1 + HU / 1000)`` clipped at 0, summed along
each ray times the voxel length (the line integral ``p = -log(I / I0)``), then windowed to
[0, 1] like a radiograph: dense (bone) bright, air dark. Organ label maps are projected too: a
pixel belongs to an organ if any voxel along its ray does, so overlapping organs give a
multi-label mask (C, H, W), one channel per organ.

Images are laid out like a frontal chest radiograph (as ``asa3d.data.montage`` shows coronal
slices): rows run superior to inferior, columns from the patient's right to left. The pixel
spacing is (z, x) of the volume. ``phantom_drr`` projects the upper half of a tall phantom (lung
bases, heart, ribs, diaphragm, upper abdomen); ``write_drr_dataset`` writes 16-bit PNGs, masks as
``.npz`` and a ``dataset.json`` listing them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from asa3d.atomic import atomic_write_json, atomic_write_with
from asa3d.data.errors import DataError
from asa3d.data.phantom import PHANTOM_LABELS, make_phantom

__all__ = [
    "DRR",
    "MU_WATER_PER_MM",
    "FINDINGS",
    "add_findings",
    "body_mask",
    "phantom_drr",
    "project_labels",
    "radiograph",
    "write_drr_dataset",
]

MU_WATER_PER_MM = 0.0193  # linear attenuation of water at ~70 keV (0.193 / cm)
BODY_HU = -400.0  # body voxels are above this (air -1000, lung -850 are enclosed by the body)


@dataclass
class DRR:
    image: np.ndarray  # (H, W) float32 in [0, 1]
    masks: np.ndarray  # (C, H, W) uint8 0/1, channel c = organ ``names[c]``
    names: list[str]
    spacing: tuple[float, float]  # (row, col) mm
    line_integral: np.ndarray  # (H, W) float32 -log(I/I0), before windowing


def _to_radiograph_layout(plane_xz: np.ndarray) -> np.ndarray:
    """(x, z) -> (rows = z from superior down, cols = x from the patient's right to left)."""
    return np.ascontiguousarray(plane_xz[::-1, ::-1].T)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: the largest connected component above ``BODY_HU``, holes (lungs, bowel gas)
    filled axial slice by axial slice. Leaves out the CT table and air."""
    dense = hu > BODY_HU
    lab, n = ndimage.label(dense)
    if n == 0:
        return dense
    sizes = np.bincount(lab.ravel())[1:]
    body = lab == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(body, structure=np.ones((3, 3, 1), bool))


def radiograph(
    hu: np.ndarray,
    spacing: Sequence[float],
    mu_water: float = MU_WATER_PER_MM,
    body_only: bool = True,
    window: tuple[float, float] = (0.5, 99.5),
) -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1], line integral), both (H, W) in the radiograph layout.

    ``window``: percentiles of the line integral over the body's shadow mapped to 0 and 1
    (clipped), the way a radiograph's display window is set; ``None`` divides by the maximum.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected an (x, y, z) volume, got shape {tuple(hu.shape)}")
    mu = np.clip(mu_water * (1.0 + hu.astype(np.float32) / 1000.0), 0.0, None)
    if body_only:
        mu *= body_mask(hu)
    p = _to_radiograph_layout(mu.sum(axis=1) * float(spacing[1])).astype(np.float32)
    if window is None:
        lo, hi = 0.0, float(p.max())
    else:
        shadow = p[p > 0.05 * float(p.max())] if p.max() > 0 else p.ravel()
        lo, hi = (float(v) for v in np.percentile(shadow, window))
    img = np.clip((p - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    return img, p


def project_labels(label: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(C, H, W) uint8: pixel on for class ``classes[c]`` when any voxel of its ray has it."""
    out = np.zeros((len(classes), label.shape[2], label.shape[0]), np.uint8)
    for c, k in enumerate(classes):
        out[c] = _to_radiograph_layout((label == k).any(axis=1))
    return out


# Phantom "findings" for the embedded classification task: alterations of the lungs a radiograph
# shows, painted into the CT before it is projected (asa3d.data.labelled2d draws them per image).
FINDINGS: tuple[str, ...] = ("mass", "effusion", "consolidation")
LUNG_LABEL = 13  # PHANTOM_LABELS


def add_findings(
    hu: np.ndarray,
    lab: np.ndarray,
    findings: Sequence[str],
    rng: np.random.Generator,
    spacing: Sequence[float],
) -> np.ndarray:
    """``hu`` with ``findings`` painted into the lungs (label ``LUNG_LABEL``), each in a lung side
    drawn from ``rng``: ``mass`` a soft-tissue ball (radius 30 mm, 40 HU), ``effusion`` fluid (10 HU)
    filling the lowest third of the lung's height, ``consolidation`` its upper third at -100 HU."""
    unknown = sorted(set(findings) - set(FINDINGS))
    if unknown:
        raise ValueError(f"unknown phantom findings {unknown}; known: {list(FINDINGS)}")
    hu = hu.copy()
    lung = lab == LUNG_LABEL
    xs = np.nonzero(lung.any(axis=(1, 2)))[0]
    if xs.size == 0:
        return hu
    mid = (int(xs.min()) + int(xs.max())) // 2
    for name in findings:
        side = lung.copy()
        if rng.random() < 0.5:
            side[mid:] = False
        else:
            side[:mid] = False
        zs = np.nonzero(side.any(axis=(0, 1)))[0]
        lo, hi = int(zs.min()), int(zs.max())
        third = max(1, (hi - lo + 1) // 3)
        if name == "mass":
            pts = np.argwhere(side)
            c = pts[rng.integers(len(pts))]
            grid = np.indices(hu.shape).astype(np.float32)
            d2 = sum(((grid[a] - c[a]) * float(spacing[a])) ** 2 for a in range(3))
            hu[(d2 <= 30.0**2) & lung] = 40.0
        elif name == "effusion":
            region = side.copy()
            region[:, :, lo + third :] = False
            hu[region] = 10.0
        else:  # consolidation
            region = side.copy()
            region[:, :, : hi - third + 1] = False
            hu[region] = -100.0
    return hu


def phantom_drr(
    seed: int | Sequence[int],
    shape: Sequence[int] = (96, 80, 96),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    label_names: Mapping[int, str] = PHANTOM_LABELS,
    findings: Sequence[str] = (),
) -> DRR:
    """The DRR of one phantom subject, chest field of view: a phantom twice as tall as
    ``shape[2]`` is generated and its upper half (z from the volume centre up) projected;
    ``findings`` (``FINDINGS``) are painted into its lungs first (``add_findings``, seeded by
    ``seed``)."""
    x, y, z = (int(s) for s in shape)
    hu, lab, _ = make_phantom(seed, (x, y, 2 * z), spacing)
    hu, lab = hu[:, :, z:], lab[:, :, z:]
    if findings:
        seq = list(seed) if isinstance(seed, Sequence) else [int(seed)]
        hu = add_findings(hu, lab, findings, np.random.default_rng([*seq, 7]), spacing)
    classes = [k for k in sorted(label_names) if k != 0]
    image, p = radiograph(hu, spacing)
    return DRR(
        image=image,
        masks=project_labels(lab, classes),
        names=[label_names[k] for k in classes],
        spacing=(float(spacing[2]), float(spacing[0])),
        line_integral=p,
    )


def _png16(image: np.ndarray):
    from PIL import Image

    a = np.rint(np.clip(image, 0, 1) * 65535).astype(np.uint16)

    def write(f) -> None:
        Image.fromarray(a).save(f, format="PNG")

    return write


def write_drr_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    shape: Sequence[int] = (96, 80, 96),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    n_validation: int = 0,
    overwrite: bool = False,
) -> Path:
    """``n`` phantom DRRs as ``imagesTr/drr_XXX.png`` (16-bit grey), ``masksTr/drr_XXX.npz``
    (``masks`` (C, H, W) uint8, ``names``) and ``dataset.json``; the last ``n_validation`` go to
    validation. Subject ``i`` is phantom seed ``(seed, i)``. Refuses to replace an existing
    ``dataset.json`` unless ``overwrite``. Returns the json's path."""
    if n < 1 or not 0 <= n_validation <= n:
        raise ValueError(f"need n >= 1 and 0 <= n_validation <= n, got n={n}, n_validation={n_validation}")
    out = Path(out_dir)
    js = out / "dataset.json"
    if js.exists() and not overwrite:
        raise DataError(
            f"{js}: exists already. Choose another folder or pass overwrite=True (--overwrite).", js
        )
    entries = []
    names: list[str] = []
    for i in range(n):
        d = phantom_drr((seed, i), shape, spacing)
        names = d.names
        stem = f"drr_{i:03d}"
        atomic_write_with(out / "imagesTr" / f"{stem}.png", _png16(d.image))
        atomic_write_with(
            out / "masksTr" / f"{stem}.npz",
            lambda f, d=d: np.savez_compressed(f, masks=d.masks, names=np.array(d.names)),
        )
        entries.append({"id": stem, "image": f"imagesTr/{stem}.png", "mask": f"masksTr/{stem}.npz"})
    n_train = n - n_validation
    doc = {
        "name": "asa3d-phantom-drr",
        "description": (
            f"Digitally reconstructed radiographs of the asa3d phantom, seed {seed}, volume {tuple(shape)} "
            f"at {tuple(spacing)} mm (chest field of view); masks: any voxel along the ray"
        ),
        "modality": {"0": "DX (DRR)"},
        "spatial_dims": 2,
        "pixel_spacing": [float(spacing[2]), float(spacing[0])],
        "mask_channels": names,
        "training": entries[:n_train],
        "validation": entries[n_train:],
        "test": [],
    }
    return atomic_write_json(js, doc, indent=2)

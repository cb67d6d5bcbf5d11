"""``asa3d eve``: one checkpoint, two images -> three pictures and ``scores.json``.

The images are A and B (two patients) and their augmented copies A' and B' (rotated 10 degrees
and cropped: Adam's within-patient setting). Everything is embedded with the checkpoint's pooled
crop embedding (``asa3d.eve.embed``); the correspondence picture's dense features are sliding
windows of that embedding (``dense="window"``, default) or the encoder's feature map
(``dense="map"``).

Outputs (``scores.json`` written last, so its presence marks a finished run):
- ``tsne.png``: landmark patches at three scales of A, B, A', B';
- ``correspondence.png``: top mutual matches A <-> A' (within patient) and A <-> B (across), 3D on
  the three orthogonal slices through the volume centres;
- ``whole_parts.png`` + ``whole_parts.md``: cos(E(whole), mean E(parts)) against a baseline;
- ``scores.json``: the t-SNE scores, cross-scale consistency, landmark localisation (within and,
  with labelled landmarks, across patients), match statistics and the whole-vs-parts table.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["OUTPUTS", "EveOptions", "check_outputs", "run_eve"]

log = logging.getLogger(__name__)

OUTPUTS = ("tsne.png", "correspondence.png", "whole_parts.png", "whole_parts.md", "scores.json")
FORMAT = "asa3d-eve/1"


@dataclass
class EveOptions:
    scales: list[float] | None = None  # three crop sides in the inputs' unit (mm / px)
    grid: int | None = None  # localisation search grid per axis (2D 24, 3D 8)
    match_grid: int | None = None  # correspondence picture grid per axis (2D 16, 3D 10)
    match_size: float | None = None  # correspondence window side (default: the largest scale)
    dense: Literal["window", "map"] = "window"
    top_k: int = 20
    radii: list[float] | None = None  # hit-rate radii in the inputs' unit
    rotate: float = 10.0
    zoom: float = 0.85
    seed: int = 0
    landmarks: list[str] | None = None
    device: str = "cpu"
    input_size: int | None = None
    volume_size: int | None = None
    progress: bool = True
    tensorboard: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def check_outputs(out: Path, overwrite: bool) -> None:
    """Refuse to replace Eve outputs in ``out`` unless ``overwrite`` (before any work)."""
    found = [n for n in OUTPUTS if (out / n).exists()]
    if found and not overwrite:
        raise FileExistsError(
            f"{out} already holds Eve outputs ({', '.join(found)}); pass --overwrite to replace them, "
            "or choose another --out."
        )


def _default_scales(a: Any) -> list[float]:
    if a.dims == 3 and a.unit == "mm":
        return [48.0, 72.0, 96.0]
    side = float(min(np.asarray(a.shape) * a.pixel_size))
    return [round(side / 8, 1), round(side / 4, 1), round(side / 2, 1)]


def _default_radii(a: Any) -> list[float]:
    if a.unit == "mm":
        return [10.0, 20.0]
    side = float(min(a.shape))
    return [round(side * 0.05, 1), round(side * 0.1, 1)]


def _estimate_crops(inputs: Sequence[Any], n_lm: int, o: EveOptions, dims: int, grid: int, mgrid: int) -> int:
    n_img = len(inputs)
    tsne = n_img * n_lm * 3
    loc = n_img * grid**dims + 4 * n_lm * (1 + (9 if dims == 2 else 7))  # grids, queries, refinement
    match = 3 * mgrid**2 * (1 if dims == 2 else 3) if o.dense == "window" else 0  # A, B, A' (3D: 3 planes)
    parts = n_img * n_lm * (10 if dims == 2 else 9)  # whole + 1x2 + 3x1 + 2x2 parts (3D: 2x2x2)
    return tsne + loc + match + parts


def _match_stats(m: Any) -> dict[str, Any]:
    s = m.similarity
    if not len(s):
        return {"n": 0}
    return {
        "n": int(len(s)),
        "cos_min": float(s.min()),
        "cos_max": float(s.max()),
        "cos_mean": float(s.mean()),
    }


def _slice_centre(inp: Any) -> list[int]:
    return [int(round((s - 1) / 2)) for s in inp.shape]


def run_eve(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str | Path] | None = None,
    label_names: str | Path | None = None,
    options: EveOptions | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run Eve (module doc) and return the scores written to ``out/scores.json``."""

    from asa3d.atomic import atomic_write_json
    from asa3d.data.errors import DataError
    from asa3d.eve.correspondence import draw_correspondence_grid
    from asa3d.eve.inputs import augmented_copy, common_landmarks, read_input
    from asa3d.eve.load import describe_source, load_encoder
    from asa3d.eve.localise import _GridCache, localisation_scores, localise, scale_consistency
    from asa3d.eve.tsne import landmark_embeddings, landmark_scores, plot_landmark_tsne, tsne_2d
    from asa3d.eve.whole_parts import draw_whole_parts, whole_parts_similarity

    o = options or EveOptions()
    t0 = time.time()
    out = Path(out).expanduser()
    if len(images) != 2:
        raise DataError(f"--images takes two images (A and B), got {len(images)}.")
    if labels is not None and len(labels) != 2:
        raise DataError(f"--labels takes one label map per image (two), got {len(labels)}.")
    check_outputs(out, overwrite)
    loaded = load_encoder(checkpoint, o.device, o.input_size, o.volume_size)
    enc = loaded.encoder
    dims = enc.spatial_dims
    a, b = (
        read_input(
            p,
            dims,
            labels[i] if labels else None,
            label_names,
            loaded.preprocessing,
            loaded.volume_size,
            name="AB"[i],
            patient=i,
        )
        for i, p in enumerate(images)
    )
    names = common_landmarks([a, b], o.landmarks)
    if len(names) < 2:
        raise DataError(
            f"{labels[1] if labels else images[1]}: A and B share {len(names)} labelled structure(s) "
            f"({names}); Eve needs at least 2. Fix: give label maps with common classes, or leave --labels "
            "out (grid landmarks)."
        )
    for x in (a, b):
        x.landmarks = {n: x.landmarks[n] for n in names}
    a2 = augmented_copy(a, o.rotate, o.zoom, seed=o.seed)
    b2 = augmented_copy(b, o.rotate, o.zoom, seed=o.seed + 1)
    inputs = [a, b, a2, b2]
    scales = list(o.scales) if o.scales else _default_scales(a)
    if len(scales) != 3 or min(scales) <= 0:
        raise DataError(f"--scales {scales}: give three positive crop sides ({a.unit}).")
    radii = list(o.radii) if o.radii else _default_radii(a)
    # 3D: every grid cell is a crop through the 3D network (about 0.5 s for a 64^3 SwinUNETR-48
    # crop on a CPU core): coarser defaults, refined by the localisation's second pass
    grid = o.grid or (24 if dims == 2 else 8)
    mgrid = o.match_grid or (16 if dims == 2 else 10)
    unit = a.unit
    labelled = a.landmark_source == "labels" and b.landmark_source == "labels"

    from tqdm.auto import tqdm

    bar = tqdm(
        total=_estimate_crops(inputs, len(names), o, dims, grid, mgrid),
        desc="eve",
        unit="crop",
        file=sys.stderr,
        disable=None if o.progress else True,
    )
    enc.on_batch = lambda n: bar.update(n)
    try:
        # (a) landmark patches at three scales
        bar.set_postfix_str("t-SNE")
        vec_sets = []
        for inp in inputs:
            side = np.stack([inp.size_px(s) for s in scales])
            vec_sets.append(
                landmark_embeddings(enc, [inp.image], [inp.landmarks], scales, sizes=side, unit=unit)
            )
        le = _merge(vec_sets, [x.patient for x in inputs])
        scores_tsne = landmark_scores(le)
        xy = tsne_2d(le.vectors, seed=o.seed)
        plot_landmark_tsne(
            xy,
            le,
            out / "tsne.png",
            title=f"Eve ({loaded.method or 'checkpoint'}): landmark patches of A, B and their copies, t-SNE",
            scores=scores_tsne,
        )
        consistency = scale_consistency(le, 1, 2)

        # (b) localisation and dense matches
        bar.set_postfix_str("localisation")
        cache = _GridCache(enc, grid)
        size = scales[1]
        within = [
            localise(enc, a, a2, size, grid, names, cache),
            localise(enc, b, b2, size, grid, names, cache),
        ]
        across = (
            [localise(enc, a, b, size, grid, names, cache), localise(enc, b, a, size, grid, names, cache)]
            if labelled
            else []
        )
        bar.set_postfix_str("matches")
        match_size = o.match_size or scales[2]  # the most context: fewer look-alike windows
        panels, stats, col_titles = _correspondence_panels(enc, a, b, a2, match_size, mgrid, o, radii[0])
        loc_w = localisation_scores(within, radii)
        loc_a = localisation_scores(across, radii) if across else None
        key = f"median_error_{unit}"
        cap = f"Landmark localisation, median error: within {loc_w[key]:.1f} {unit}"
        cap += f", across {loc_a[key]:.1f} {unit}" if loc_a else " (across patients needs labelled landmarks)"
        feat = "sliding-window crop embeddings" if o.dense == "window" else "feature map"
        which = enc.describe()["crop_embedding" if o.dense == "window" else "dense_map"]
        cap += f". Dense features: {feat} ({which})"
        cap += "; colour: cosine of mean-centred features; flat background cells left out."
        draw_correspondence_grid(
            panels,
            out / "correspondence.png",
            f"Eve ({loaded.method or 'checkpoint'}): dense correspondence, top mutual matches",
            column_titles=col_titles,
            caption=cap,
        )

        # (c) whole vs parts
        bar.set_postfix_str("whole vs parts")
        wholes = [[(inp.landmarks[n], inp.size_px(scales[2])) for n in inp.landmarks] for inp in inputs]
        wp = whole_parts_similarity(enc, [x.image for x in inputs], wholes)
        draw_whole_parts(
            wp,
            out / "whole_parts.png",
            out / "whole_parts.md",
            title=f"Eve ({loaded.method or 'checkpoint'}): whole vs parts cosine similarity",
        )
    finally:
        enc.on_batch = None
        bar.close()

    scores = {
        "format": FORMAT,
        "checkpoint": str(checkpoint),
        "encoder": describe_source(loaded),
        "spatial_dims": dims,
        "images": {
            x.name: {
                "path": str(x.path),
                "shape": list(x.shape),
                "pixel_size": x.pixel_size.tolist(),
                "copy_of": None,
            }
            if x.transform is None
            else {"copy_of": x.name[:-1], "transform": x.transform, "shape": list(x.shape)}
            for x in inputs
        },
        "unit": unit,
        "scales": scales,
        "landmarks": {
            "source": "labels" if labelled else "grid",
            "names": names,
            "positions_px": {
                x.name: {n: np.round(v, 2).tolist() for n, v in x.landmarks.items()} for x in inputs
            },
        },
        "tsne": {
            **scores_tsne,
            "points": int(len(le.vectors)),
            "knn": "leave-one-patient-out (A, A' vs B, B')",
        },
        "scale_consistency": {**consistency, "small": scales[1], "large": scales[2]},
        "localisation": {
            "crop": size,
            "search_grid": grid,
            "within_patient": loc_w,
            "across_patients": loc_a,
        },
        "correspondence": {
            "dense": o.dense,
            "grid": mgrid if o.dense == "window" else None,
            "matches": stats,
        },
        "whole_parts": wp.table(),
        "options": {k: v for k, v in asdict(o).items() if k not in ("progress", "extra")},
        "seconds": round(time.time() - t0, 1),
    }
    scores = _finite(scores)
    if o.tensorboard:
        _tensorboard(out, scores)
    atomic_write_json(out / "scores.json", scores, indent=2)
    return scores


def _correspondence_panels(
    enc: Any, a: Any, b: Any, a2: Any, size: float, mgrid: int, o: EveOptions, radius: float
) -> tuple[list[list[tuple[str, np.ndarray, np.ndarray, Any]]], dict[str, Any], list[str]]:
    """Matches A <-> A' (within patient) and A <-> B (across), 2D on the images, 3D on the three
    orthogonal slices (A' sliced through the copy of A's centre). Within the patient the true
    location of every match is known: ``correct`` counts those within ``radius`` of it."""
    import torch

    from asa3d.eve.correspondence import (
        display_to_voxel,
        informative_cells,
        match_features,
        orthogonal_feature_slices,
        window_features,
    )

    dims = a.dims
    centre = {id(a): _slice_centre(a), id(b): _slice_centre(b)}
    centre[id(a2)] = [
        int(round(v))
        for v in np.clip(a2.from_original(np.asarray(centre[id(a)]))[0], 0, np.asarray(a2.shape) - 1)
    ]

    def feats(inp: Any) -> torch.Tensor:
        if o.dense == "map":
            return enc.feature_map(inp.image[None])[0].cpu()
        return window_features(enc, inp.image, inp.size_px(size), mgrid, centre[id(inp)])

    def to_voxel(inp: Any, view: str | None, pts: np.ndarray) -> np.ndarray:
        return pts if view is None else display_to_voxel(view, inp.shape, centre[id(inp)], pts)

    f = {id(x): feats(x) for x in (a, b, a2)}
    if dims == 2:
        views: dict[str | None, dict[int, tuple[np.ndarray, torch.Tensor]]] = {
            None: {id(x): (x.image[0].numpy(), f[id(x)]) for x in (a, b, a2)}
        }
    else:
        views = {}
        for x in (a, b, a2):
            for v, sl in orthogonal_feature_slices(x.image[0].numpy(), f[id(x)], centre[id(x)]).items():
                views.setdefault(v, {})[id(x)] = sl
    panels, stats = [], {"within": {}, "across": {}}
    for view, imgs in views.items():
        row = []
        for tag, (x, y) in (("within", (a, a2)), ("across", (a, b))):
            (ix, gx), (iy, gy) = imgs[id(x)], imgs[id(y)]
            side = float(np.mean(x.size_px(size)))
            m = match_features(
                gx, gy, ix.shape, iy.shape,
                top_k=o.top_k if dims == 2 else max(4, o.top_k // 2),
                centre=True,
                valid_a=informative_cells(ix, gx.shape[1:], [side] * 2),
                valid_b=informative_cells(iy, gy.shape[1:], [side] * 2),
            )  # fmt: skip
            st = _match_stats(m)
            label = view or f"{x.name} | {y.name}"
            if tag == "within" and len(m.similarity):  # the copy's transform gives every match's truth
                truth = y.from_original(to_voxel(x, view, m.points_a))
                err = np.linalg.norm((truth - to_voxel(y, view, m.points_b)) * y.pixel_size, axis=1)
                # a match is a grid cell: "correct" within one cell (or the first hit radius, if larger)
                r = max(
                    radius,
                    float(np.mean(np.asarray(iy.shape) / np.asarray(gy.shape[1:])))
                    * float(y.pixel_size.mean()),
                )
                st.update(
                    correct=int((err <= r).sum()), radius=round(r, 1), median_error=float(np.median(err))
                )
            stats[tag][view or "image"] = st
            note = (
                [f"{st['correct']} within {st['radius']:g} {y.unit} of the true point"]
                if "correct" in st
                else []
            )
            row.append((label, ix, iy, m, *note))
        panels.append(row)
    rot = f"{o.rotate:g} deg{' about z' if dims == 3 else ''}, crop"
    titles = [f"within patient: A | A' ({rot})", "across patients: A | B"]
    if dims == 2:
        stats = {k: v["image"] for k, v in stats.items()}
    return panels, stats, titles


def _merge(sets: Sequence[Any], patients: Sequence[int]) -> Any:
    """One ``LandmarkEmbeddings`` of several images' (landmark names aligned to the first's order)."""
    from asa3d.eve.tsne import LandmarkEmbeddings

    names: list[str] = []
    for s in sets:
        names += [n for n in s.names if n not in names]
    vec, lm, sc, im, ids = [], [], [], [], []
    for i, s in enumerate(sets):
        vec.append(s.vectors)
        lm.append(np.array([names.index(s.names[k]) for k in s.landmark]))
        sc.append(s.scale)
        im.append(np.full(len(s.vectors), patients[i]))
        ids.append(np.full(len(s.vectors), i))
    first = sets[0]
    return LandmarkEmbeddings(
        np.concatenate(vec), np.concatenate(lm), np.concatenate(sc), np.concatenate(im), names,
        first.scales, np.concatenate(ids), first.unit,
    )  # fmt: skip


def _finite(x: Any) -> Any:
    """JSON-safe: NaN / inf become None (a score undefined for these inputs)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float | np.floating) and not np.isfinite(x):
        return None
    if isinstance(x, np.floating | np.integer):
        return x.item()
    return x


def _flat(prefix: str, x: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(x, dict):
        for k, v in x.items():
            out.update(_flat(f"{prefix}/{k}" if prefix else str(k), v))
    elif isinstance(x, int | float) and not isinstance(x, bool):
        out[prefix] = float(x)
    return out


def _tensorboard(out: Path, scores: dict[str, Any]) -> None:
    """The scalar scores as TensorBoard scalars under ``out/tb`` (step 0)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # a dependency, but never worth failing a finished analysis for
        log.warning("tensorboard is not installed; scores.json only")
        return
    keep = ("tsne", "scale_consistency", "localisation")
    flat = {k: v for k, v in _flat("", {k: scores[k] for k in keep}).items() if "positions" not in k}
    with SummaryWriter(log_dir=str(out / "tb")) as w:
        for k, v in flat.items():
            w.add_scalar(f"eve/{k}", v, 0)

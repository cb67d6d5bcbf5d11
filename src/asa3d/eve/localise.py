"""Quantitative Eve: landmark localisation by embedding search, and cross-scale consistency.

**Localisation** (the correspondence measure of the Adam notes made quantitative): for each
landmark of a source image, the crop around it is embedded and compared with the crops centred on
a regular grid over the target; the arg-max cosine centre, refined once at a third of the grid
step around it (2D: its 3 x 3 neighbourhood; 3D: its 6 axis neighbours), is the predicted
location. Reported: mean and median error (in the target's
unit, mm where known, and in target pixels) and the hit rate within radii. Run within a patient
(an image and its rotated, cropped copy) and across patients (A <-> B; only with labelled
landmarks: grid landmarks of two different images need not correspond).

**Cross-scale consistency** (the Eve property "a structure maps to the same vector at every
scale"): for a patch P around a landmark and the larger crop L around the same point, is
cos(E(P), E(L)) above cos(E(P), E(U)) for unrelated patches U (patches of P's size around the
other landmarks, in every image)? Reported as the mean margin (cosine of the pair minus the mean
cosine to unrelated patches), the AUC (fraction of unrelated patches beaten) and top-1 (all beaten).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from asa3d.eve.embed import EveEncoder, crop_embeddings
from asa3d.eve.inputs import EveInput
from asa3d.eve.tsne import LandmarkEmbeddings

__all__ = ["Localisation", "grid_centres", "localise", "localisation_scores", "scale_consistency"]


def grid_centres(shape: Sequence[int], n: int) -> np.ndarray:
    """(n^D, D) centres of an n^D grid of equal cells over ``shape`` pixels, in pixel coordinates."""
    axes = [(np.arange(n) + 0.5) * (s / n) - 0.5 for s in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))


@dataclass
class Localisation:
    source: str
    target: str
    names: list[str]
    predicted: np.ndarray  # (L, D) target pixel coordinates
    truth: np.ndarray  # (L, D)
    error_px: np.ndarray  # (L,)
    error: np.ndarray  # (L,) in ``unit``
    unit: str
    grid_step: float  # coarse grid step, target pixels (the refined search is 3x finer)


class _GridCache:
    """Embeddings of each target's grid crops, computed once per (target, size)."""

    def __init__(self, enc: EveEncoder, n: int) -> None:
        self.enc, self.n, self.store = enc, n, {}

    def get(self, inp: EveInput, size: float) -> tuple[np.ndarray, torch.Tensor]:
        key = (id(inp), float(size))
        if key not in self.store:
            centres = grid_centres(inp.shape, self.n)
            vec = crop_embeddings(self.enc, inp.image, centres, inp.size_px(size)[None])
            self.store[key] = (centres, F.normalize(vec.float(), dim=1))
        return self.store[key]


def localise(
    enc: EveEncoder,
    src: EveInput,
    dst: EveInput,
    size: float,
    grid: int,
    names: Sequence[str] | None = None,
    cache: _GridCache | None = None,
) -> Localisation:
    """Predict every landmark of ``src`` (in ``names``, present in both) in ``dst``; ``size``: crop side
    in the inputs' unit."""
    cache = cache or _GridCache(enc, grid)
    names = [n for n in (names or list(src.landmarks)) if n in src.landmarks and n in dst.landmarks]
    if not names:
        raise ValueError(f"{src.name} and {dst.name} share no landmark")
    q = F.normalize(
        crop_embeddings(
            enc, src.image, np.stack([src.landmarks[n] for n in names]), src.size_px(size)[None]
        ).float(),
        dim=1,
    )
    centres, cand = cache.get(dst, size)
    best = centres[(q @ cand.T).argmax(1).numpy()]
    step = np.asarray(dst.shape, np.float64) / grid
    if dst.dims == 2:  # the 3 x 3 neighbourhood at a third of the step
        offs = np.stack(np.meshgrid(*[np.array([-1.0, 0.0, 1.0])] * 2, indexing="ij"), -1).reshape(-1, 2)
    else:  # 3D: the centre and its 6 axis neighbours (27 crops per landmark cost more than the grid)
        offs = np.concatenate([np.zeros((1, 3)), np.eye(3), -np.eye(3)])
    pred = np.empty_like(best)
    for i in range(len(names)):  # one refinement at a third of the step around the coarse best
        local = best[i] + offs * step / 3
        e = F.normalize(crop_embeddings(enc, dst.image, local, dst.size_px(size)[None]).float(), dim=1)
        pred[i] = local[int((e @ q[i]).argmax())]
    truth = np.stack([dst.landmarks[n] for n in names])
    err_px = np.linalg.norm(pred - truth, axis=1)
    err = np.linalg.norm((pred - truth) * dst.pixel_size, axis=1)
    return Localisation(
        src.name, dst.name, list(names), pred, truth, err_px, err, dst.unit, float(step.mean())
    )


def localisation_scores(results: Sequence[Localisation], radii: Sequence[float]) -> dict[str, object]:
    """Pooled errors of several localisations: n, mean / median error (unit and px), hit rates."""
    if not results:
        return {"n": 0}
    err = np.concatenate([r.error for r in results])
    px = np.concatenate([r.error_px for r in results])
    unit = results[0].unit
    return {
        "n": int(err.size),
        "pairs": [f"{r.source} -> {r.target}" for r in results],
        "unit": unit,
        f"mean_error_{unit}": float(err.mean()),
        f"median_error_{unit}": float(np.median(err)),
        "mean_error_px": float(px.mean()),
        "median_error_px": float(np.median(px)),
        "hit_rate": {f"{r:g}{unit}": float((err <= r).mean()) for r in radii},
        "search_grid_step_px": float(np.mean([r.grid_step for r in results])),
        "per_landmark": {
            n: float(np.mean([r.error[r.names.index(n)] for r in results if n in r.names]))
            for n in dict.fromkeys(n for r in results for n in r.names)
        },
    }


def scale_consistency(le: LandmarkEmbeddings, small: int, large: int) -> dict[str, float]:
    """Cross-scale consistency of landmark embeddings (module doc): the patch at scale index
    ``small`` against the crop at ``large`` around the same landmark of the same image, versus
    patches at ``small`` around the other landmarks in every image."""
    v = torch.from_numpy(le.vectors).double()
    v = F.normalize(v, dim=1)
    sm = np.flatnonzero(le.scale == small)
    key = {(int(le.ids[i]), int(le.landmark[i])): i for i in np.flatnonzero(le.scale == large)}
    margins, aucs, tops = [], [], []
    for i in sm:
        j = key.get((int(le.ids[i]), int(le.landmark[i])))
        if j is None:
            continue
        unrelated = sm[le.landmark[sm] != le.landmark[i]]
        if len(unrelated) == 0:
            continue
        pos = float(v[i] @ v[j])
        neg = (v[unrelated] @ v[i]).numpy()
        margins.append(pos - float(neg.mean()))
        aucs.append(float((pos > neg).mean()))
        tops.append(float(pos > neg.max()))
    if not margins:
        return {"n": 0, "margin": float("nan"), "auc": float("nan"), "top1": float("nan")}
    return {
        "n": len(margins),
        "margin": float(np.mean(margins)),
        "auc": float(np.mean(aucs)),
        "top1": float(np.mean(tops)),
    }

"""Landmark t-SNE (Adam supplement B): patches around landmarks at three scales, embedded and
mapped to 2D. A good Eve gives one cluster per landmark with its scales close together.

The picture is made quantitative by three scores: the silhouette of the landmark clusters
(scikit-learn, cosine distance), the k-NN (k = 5) landmark accuracy with every neighbour drawn
from another image, or another patient when images are grouped (augmented copies share their
original's group), and the mean cosine between embeddings of the same landmark at different
scales against that between different landmarks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asa3d.eve.embed import EveEncoder, crop_embeddings
from asa3d.eve.figure_io import MIN_DPI, new_figure, save_png

__all__ = ["LandmarkEmbeddings", "landmark_embeddings", "landmark_scores", "plot_landmark_tsne", "tsne_2d"]

MARKERS = ("o", "s", "^", "D", "v", "P")


@dataclass
class LandmarkEmbeddings:
    vectors: np.ndarray  # (N, F) float32
    landmark: np.ndarray  # (N,) int index into names
    scale: np.ndarray  # (N,) int index into scales
    image: np.ndarray  # (N,) int index of the source image (its patient: copies share it)
    names: list[str]
    scales: list[float]
    image_id: np.ndarray | None = None  # (N,) int index of the image itself (None: ``image``)
    unit: str = "px"  # of ``scales``

    @property
    def ids(self) -> np.ndarray:
        return self.image_id if self.image_id is not None else self.image


def landmark_embeddings(
    net: nn.Module | EveEncoder,
    images: Sequence[torch.Tensor],
    landmarks: Sequence[Mapping[str, Sequence[float]]],
    scales: Sequence[float],
    input_size: int | None = None,
    stage: int | None = None,
    sizes: np.ndarray | None = None,
    groups: Sequence[int] | None = None,
    unit: str = "px",
) -> LandmarkEmbeddings:
    """Eve vectors of a patch of side ``scales[s]`` pixels around every landmark of every image
    (``images[i]`` (C, *spatial), ``landmarks[i]`` {name: centre in pixels}); names are ordered as
    first met. ``sizes`` (S, D): per-axis sides in pixels instead (e.g. millimetres on an
    anisotropic grid; ``scales`` then only label them). ``groups[i]``: the patient of image ``i``
    (augmented copies share their original's), used by the leave-one-patient-out k-NN score."""
    names: list[str] = []
    vecs, lm, sc, im, ids = [], [], [], [], []
    dims = images[0].ndim - 1 if images else 2
    side = (
        np.asarray(sizes, np.float32)
        if sizes is not None
        else np.repeat(np.asarray(scales, np.float32)[:, None], dims, 1)
    )
    for i, (img, points) in enumerate(zip(images, landmarks, strict=True)):
        for name, centre in points.items():
            if name not in names:
                names.append(name)
            cs = [list(map(float, centre))] * len(scales)
            vecs.append(crop_embeddings(net, img, cs, side, input_size, stage))
            lm += [names.index(name)] * len(scales)
            sc += list(range(len(scales)))
            im += [int(groups[i]) if groups is not None else i] * len(scales)
            ids += [i] * len(scales)
    if not vecs:
        raise ValueError("no landmarks given")
    return LandmarkEmbeddings(
        vectors=torch.cat(vecs).cpu().numpy().astype(np.float32),
        landmark=np.array(lm),
        scale=np.array(sc),
        image=np.array(im),
        names=names,
        scales=[float(s) for s in scales],
        image_id=np.array(ids),
        unit=unit,
    )


def tsne_2d(vectors: np.ndarray, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """(N, 2) t-SNE map (scikit-learn, cosine metric, PCA init); perplexity defaults to
    min(30, (N - 1) / 3) so small sets work."""
    from sklearn.manifold import TSNE

    n = vectors.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 embeddings, got {n}")
    perp = perplexity if perplexity is not None else min(30.0, max(1.0, (n - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perp, metric="cosine", init="pca", random_state=seed)
    return tsne.fit_transform(vectors.astype(np.float64)).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def landmark_scores(le: LandmarkEmbeddings, k: int = 5) -> dict[str, float]:
    """``silhouette``, ``knn_accuracy`` (leave-one-image-out), ``same_landmark_cos`` (across
    scales and images) and ``other_landmark_cos``; NaN where a score is undefined."""
    from sklearn.metrics import silhouette_score

    u = _unit(le.vectors.astype(np.float64))
    cos = u @ u.T
    n = len(u)
    same = le.landmark[:, None] == le.landmark[None, :]
    off = ~np.eye(n, dtype=bool)
    n_lm = len(set(le.landmark.tolist()))
    sil = float(silhouette_score(u, le.landmark, metric="cosine")) if 2 <= n_lm < n else float("nan")
    hits, tried = 0, 0
    for i in range(n):
        cand = np.flatnonzero(le.image != le.image[i])
        if len(cand) == 0:
            continue
        nn_idx = cand[np.argsort(-cos[i, cand], kind="stable")[:k]]
        votes = np.bincount(le.landmark[nn_idx], minlength=len(le.names))
        hits += int(np.argmax(votes) == le.landmark[i])
        tried += 1
    return {
        "silhouette": sil,
        "knn_accuracy": hits / tried if tried else float("nan"),
        "same_landmark_cos": float(cos[same & off].mean()) if (same & off).any() else float("nan"),
        "other_landmark_cos": float(cos[~same].mean()) if (~same).any() else float("nan"),
    }


def plot_landmark_tsne(
    xy: np.ndarray,
    le: LandmarkEmbeddings,
    path: str | Path,
    title: str = "Eve: landmark patches at three scales (t-SNE)",
    scores: Mapping[str, float] | None = None,
    dpi: int = MIN_DPI,
) -> Path:
    """Scatter coloured by landmark, marker by scale; scores in the caption."""
    import matplotlib

    fig = new_figure(8.0, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    colours = matplotlib.colormaps["tab10"]
    for li in range(len(le.names)):
        for si in range(len(le.scales)):
            sel = (le.landmark == li) & (le.scale == si)
            if sel.any():
                ax.scatter(
                    xy[sel, 0], xy[sel, 1], s=28, c=[colours(li % 10)], marker=MARKERS[si % len(MARKERS)],
                    edgecolors="k", linewidths=0.3,
                )  # fmt: skip
    line = matplotlib.lines.Line2D
    handles = [
        line([], [], ls="", marker="o", color=colours(li % 10), label=n) for li, n in enumerate(le.names)
    ]
    handles += [
        line([], [], ls="", marker=MARKERS[si % len(MARKERS)], color="grey", label=f"{s:g} {le.unit}")
        for si, s in enumerate(le.scales)
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if scores:
        ax.set_xlabel(
            f"silhouette {scores['silhouette']:.2f} · 5-NN accuracy (other patients) "
            f"{scores['knn_accuracy']:.2f} · cos same landmark {scores['same_landmark_cos']:.3f} "
            f"vs other {scores['other_landmark_cos']:.3f}",
            fontsize=7,
        )
    fig.tight_layout()
    return save_png(fig, path, dpi)

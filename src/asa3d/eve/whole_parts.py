"""Whole vs parts (Adam's compositionality figure): cos(E(W), mean_i E(P_i)) for wholes W split
into parts (1x2, 3x1, 2x2 in 2D; 2x2x2 in 3D). The baseline pairs each whole with the parts of
another whole (another location or image): a composable embedding scores well above it. The
mean is used as the aggregate; cosine does not change with scale, so a sum gives the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asa3d.atomic import atomic_write_text
from asa3d.eve.embed import EveEncoder, crop_embeddings
from asa3d.eve.figure_io import MIN_DPI, new_figure, save_png

__all__ = ["SPLITS_2D", "SPLITS_3D", "WholePartsResult", "draw_whole_parts", "whole_parts_similarity"]

SPLITS_2D: dict[str, tuple[int, ...]] = {"1x2": (1, 2), "3x1": (3, 1), "2x2": (2, 2)}
SPLITS_3D: dict[str, tuple[int, ...]] = {"2x2x2": (2, 2, 2)}


@dataclass
class WholePartsResult:
    cosine: dict[str, np.ndarray]  # split -> (N,) cos(E(W), mean E(parts of W))
    baseline: dict[str, np.ndarray]  # split -> (N,) cos(E(W), mean E(parts of another whole))

    def table(self) -> list[dict[str, float | str | int]]:
        return [
            {
                "split": k,
                "n": len(v),
                "cos_mean": float(v.mean()),
                "cos_sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "baseline_mean": float(self.baseline[k].mean()),
                "baseline_sd": float(self.baseline[k].std(ddof=1)) if len(v) > 1 else 0.0,
            }
            for k, v in self.cosine.items()
        ]

    def markdown(self) -> str:
        lines = [
            "| split | wholes | cos(E(W), mean E(parts)) | baseline (parts of another whole) |",
            "|---|---|---|---|",
        ]
        for r in self.table():
            lines.append(
                f"| {r['split']} | {r['n']} | {r['cos_mean']:.3f} ± {r['cos_sd']:.3f} | "
                f"{r['baseline_mean']:.3f} ± {r['baseline_sd']:.3f} |"
            )
        return "\n".join(lines) + "\n"


def _part_boxes(centre: np.ndarray, size: np.ndarray, split: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Centres (P, D) and sizes (D,) of the parts of the box (centre, size) split per axis."""
    part = size / np.asarray(split, np.float64)
    lo = centre - size / 2
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in split], indexing="ij"), -1).reshape(-1, len(split))
    return lo + (idx + 0.5) * part, part


def whole_parts_similarity(
    net: nn.Module | EveEncoder,
    images: Sequence[torch.Tensor],
    wholes: Sequence[Sequence[tuple[Sequence[float], Sequence[float] | float]]],
    input_size: int | None = None,
    splits: Mapping[str, Sequence[int]] | None = None,
    stage: int | None = None,
) -> WholePartsResult:
    """``wholes[i]``: (centre, size) boxes in pixels of ``images[i]`` (C, *spatial). Each whole and
    each of its parts is cropped, resized to ``input_size`` and embedded (``crop_embeddings``)."""
    dims = images[0].ndim - 1
    splits = dict(splits) if splits is not None else dict(SPLITS_2D if dims == 2 else SPLITS_3D)
    cos: dict[str, list[torch.Tensor]] = {k: [] for k in splits}
    e_whole_all: list[torch.Tensor] = []
    e_parts_all: dict[str, list[torch.Tensor]] = {k: [] for k in splits}
    for img, boxes in zip(images, wholes, strict=True):
        for centre, size in boxes:
            c = np.asarray(centre, np.float64)
            s = np.broadcast_to(np.asarray(size, np.float64), c.shape).copy()
            e_whole_all.append(crop_embeddings(net, img, [c], [s], input_size, stage)[0])
            for name, split in splits.items():
                pc, ps = _part_boxes(c, s, split)
                e = crop_embeddings(net, img, pc, np.broadcast_to(ps, pc.shape).copy(), input_size, stage)
                e_parts_all[name].append(e.mean(0))
    if len(e_whole_all) < 2:
        raise ValueError(
            "whole vs parts needs at least 2 wholes (the baseline pairs a whole with another's parts)"
        )
    ew = torch.stack(e_whole_all)
    base: dict[str, np.ndarray] = {}
    for name in splits:
        ep = torch.stack(e_parts_all[name])
        cos[name] = F.cosine_similarity(ew, ep, dim=1)
        base[name] = F.cosine_similarity(ew, ep.roll(1, dims=0), dim=1).numpy()
    return WholePartsResult({k: v.numpy() for k, v in cos.items()}, base)


def draw_whole_parts(
    result: WholePartsResult,
    png_path: str | Path,
    md_path: str | Path | None = None,
    title: str = "Eve: whole vs parts cosine similarity",
    dpi: int = MIN_DPI,
) -> Path:
    """Histograms per split (parts of the same whole vs the baseline) above the table; the
    table also goes to ``md_path`` as markdown."""
    rows = result.table()
    fig = new_figure(7.0, 3.2 + 0.3 * len(rows))
    ax = fig.add_axes((0.09, 0.42, 0.88, 0.48))
    values = np.concatenate([*result.cosine.values(), *result.baseline.values()])
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.02 * (hi - lo), 1e-4)
    bins = np.linspace(lo - pad, min(hi + pad, 1.0 + pad), 41)  # the data's range: trained or not
    for i, (name, v) in enumerate(result.cosine.items()):
        ax.hist(v, bins=bins, alpha=0.55, label=f"{name}: own parts", color=f"C{i}")
        ax.hist(
            result.baseline[name],
            bins=bins,
            histtype="step",
            lw=1.2,
            label=f"{name}: baseline",
            color=f"C{i}",
        )
    ax.set_xlabel("cosine similarity", fontsize=8)
    ax.set_ylabel("wholes", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    tab = fig.add_axes((0.09, 0.02, 0.88, 0.22))
    tab.axis("off")
    cells = [
        [str(r["split"]), str(r["n"]), f"{r['cos_mean']:.3f} ± {r['cos_sd']:.3f}",
         f"{r['baseline_mean']:.3f} ± {r['baseline_sd']:.3f}"]
        for r in rows
    ]  # fmt: skip
    t = tab.table(
        cellText=cells, colLabels=["split", "wholes", "cos(E(W), mean E(parts))", "baseline"], loc="center"
    )
    t.set_fontsize(8)
    if md_path is not None:
        atomic_write_text(md_path, result.markdown())
    return save_png(fig, png_path, dpi)

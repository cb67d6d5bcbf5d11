"""Paired comparisons between initialisations: Wilcoxon signed-rank + bootstrap CI of the mean
difference. Pairs are (case, seed) at the same mode and label fraction, so each pair saw the same
training subset and the same test case; only the initialisation differs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sstats


def bootstrap_ci(
    diffs: Sequence[float], n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``diffs`` (resampling the pairs)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_test(a: Sequence[float], b: Sequence[float], n_boot: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Compare paired samples ``a`` (e.g. ASA) and ``b`` (e.g. scratch). Pairs with a NaN on
    either side are dropped. Returns n, mean difference (a - b), its bootstrap CI, the Wilcoxon
    signed-rank statistic and two-sided p-value (scipy's default zero handling)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    d = x[ok] - y[ok]
    out: dict[str, Any] = {
        "n": int(d.size),
        "mean_a": _f(x[ok].mean()) if d.size else None,
        "mean_b": _f(y[ok].mean()) if d.size else None,
    }
    out["mean_diff"] = _f(d.mean()) if d.size else None
    lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    out["ci95"] = [_f(lo), _f(hi)]
    if d.size == 0 or np.all(d == 0):
        out["wilcoxon_stat"], out["p_value"] = None, None if d.size == 0 else 1.0
    else:
        res = sstats.wilcoxon(x[ok], y[ok])
        out["wilcoxon_stat"], out["p_value"] = _f(res.statistic), _f(res.pvalue)
    return out


def _f(v: Any) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v

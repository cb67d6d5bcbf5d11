"""Paired comparisons between initialisations, with the test case as the unit of inference.

A grid cell (init, mode, fraction, seed) scores every test case; the seed fixes the labelled
subset and the training randomness, and is shared by both sides of a comparison. The seeds of one
case are not independent draws of the case population, so each case is first averaged over its
seeds and the Wilcoxon signed-rank test (Wilcoxon 1945) runs over cases. The confidence interval of
the mean difference comes from a two-level bootstrap (cases, then seeds within each drawn case;
Efron & Tibshirani 1993; Saravanan, Berman & Sober 2020), the seed-to-seed spread is reported
beside it, and the p-values of one grid's comparisons are Holm-corrected (Holm 1979).
See docs/evaluation.md."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sstats

from asa3d.atomic import atomic_write_text

TEST_DESCRIPTION = (
    "unit = test case (each case averaged over seeds); two-sided Wilcoxon signed-rank test over "
    "cases (scipy.stats.wilcoxon); mean difference = init - reference with a {level:g}% two-level "
    "bootstrap CI (cases, then seeds within cases); seed sd = sd over seeds of the per-seed mean "
    "difference; p (Holm) = Holm-adjusted over the init x mode x fraction comparisons of each metric"
)


def case_means(x: np.ndarray) -> np.ndarray:
    """Mean over seeds (axis 1) of a (cases, seeds) array, ignoring NaN; NaN for an all-NaN case."""
    x = np.asarray(x, dtype=float)
    n = (~np.isnan(x)).sum(axis=1)
    return np.where(n > 0, np.nansum(x, axis=1) / np.maximum(n, 1), np.nan)


def hierarchical_bootstrap_ci(
    diffs: np.ndarray,
    n_boot: int = 10000,
    level: float = 0.95,
    seed: int = 0,
    chunk: int = 2000,
) -> tuple[float, float]:
    """Percentile CI of the mean over cases of the per-case seed means of ``diffs`` (cases x seeds,
    NaN = missing). Each replicate draws the cases with replacement, then, within each drawn case,
    as many of its valid seeds as it has, with replacement. Vectorised in chunks of replicates.
    scipy.stats.bootstrap resamples one level only (observations along an axis), so it cannot draw
    seeds within the drawn cases: hence our own."""
    d = np.asarray(diffs, dtype=float)
    if d.ndim == 1:
        d = d[:, None]
    d = d[~np.all(np.isnan(d), axis=1)]
    if d.shape[0] == 0:
        return np.nan, np.nan
    n_cases, n_seeds = d.shape
    packed = np.sort(d, axis=1)  # NaN sorts last: index < k[c] picks one of case c's valid seeds
    k = (~np.isnan(d)).sum(axis=1)
    rng = np.random.default_rng(seed)
    means = np.full(n_boot, np.nan)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        cases = rng.integers(n_cases, size=(b, n_cases))
        kc = k[cases]  # (b, cases): valid seeds of each drawn case
        seeds = (rng.random((b, n_cases, n_seeds)) * kc[..., None]).astype(np.int64)
        vals = packed[cases[..., None], seeds]
        keep = np.arange(n_seeds) < kc[..., None]  # draw k[c] seeds, not n_seeds
        per_case = np.where(keep, vals, 0.0).sum(axis=2) / kc
        means[start : start + b] = per_case.mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_test(
    a: np.ndarray | Sequence[Sequence[float]],
    b: np.ndarray | Sequence[Sequence[float]],
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Compare ``a`` (e.g. ASA) with ``b`` (e.g. scratch), both (cases, seeds): row i is the same
    test case on both sides, column j the same seed (same labelled subset). A (case, seed) entry
    with a NaN on either side is dropped; a case with no valid seed is dropped. Returns n (cases),
    n_seeds, the case-level means, the mean difference (a - b) over cases, its two-level bootstrap
    CI, the per-seed mean differences and their sd, the Wilcoxon statistic and two-sided p."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    x = x[:, None] if x.ndim == 1 else x  # one seed
    y = y[:, None] if y.ndim == 1 else y
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in shape: {x.shape} vs {y.shape}")
    bad = np.isnan(x) | np.isnan(y)
    x, y = np.where(bad, np.nan, x), np.where(bad, np.nan, y)
    d = x - y
    ca, cb, cd = case_means(x), case_means(y), case_means(d)
    ok = ~np.isnan(cd)
    n = int(ok.sum())
    out: dict[str, Any] = {
        "n": n,
        "n_seeds": int(x.shape[1]),
        "mean_a": _f(ca[ok].mean()) if n else None,
        "mean_b": _f(cb[ok].mean()) if n else None,
        "mean_diff": _f(cd[ok].mean()) if n else None,
    }
    lo, hi = hierarchical_bootstrap_ci(d[ok], n_boot=n_boot, level=level, seed=seed)
    out["ci95"] = [_f(lo), _f(hi)]
    out["ci_level"] = level
    # seed-to-seed spread: each seed is one pair of training runs; its mean difference over cases
    per_seed = [_f(np.nanmean(d[ok, j])) if np.any(~np.isnan(d[ok, j])) else None for j in range(d.shape[1])]
    out["per_seed_mean_diff"] = per_seed
    vals = np.array([v for v in per_seed if v is not None])
    out["seed_sd"] = _f(vals.std(ddof=1)) if vals.size > 1 else None
    if n == 0:
        out["wilcoxon_stat"], out["p_value"] = None, None
    elif np.all(cd[ok] == 0):
        out["wilcoxon_stat"], out["p_value"] = None, 1.0
    else:
        res = sstats.wilcoxon(ca[ok], cb[ok])
        out["wilcoxon_stat"], out["p_value"] = _f(res.statistic), _f(res.pvalue)
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979); None stays None and is not counted in the
    family. Our own: scipy.stats.false_discovery_control does Benjamini-Hochberg/Yekutieli only."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):  # type: ignore[arg-type, return-value]
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))  # type: ignore[arg-type]
        out[i] = running
    return out


def case_seed_matrix(
    ra: Mapping[int, Sequence[Mapping[str, Any]]],
    rb: Mapping[int, Sequence[Mapping[str, Any]]],
    value: Callable[[Mapping[str, Any]], float],
) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    """Pair two inits' per-case rows by case id and seed. ``ra``/``rb`` map seed -> that cell's
    per_case rows (each with an ``id``). Returns (a, b) of shape (cases, seeds), the case ids and
    the seeds; a (case, seed) present on one side only is NaN on both."""
    seeds = sorted(set(ra) & set(rb))
    ids: list[str] = []
    for s in seeds:
        in_b = {row["id"] for row in rb[s]}
        ids += [row["id"] for row in ra[s] if row["id"] in in_b and row["id"] not in ids]
    a = np.full((len(ids), len(seeds)), np.nan)
    b = a.copy()  # all NaN so far
    pos = {c: i for i, c in enumerate(ids)}
    for j, s in enumerate(seeds):
        vb = {row["id"]: value(row) for row in rb[s]}
        for row in ra[s]:
            if row["id"] in vb:
                a[pos[row["id"]], j], b[pos[row["id"]], j] = value(row), vb[row["id"]]
    return a, b, ids, seeds


def compare_grid(
    results: Sequence[Mapping[str, Any]],
    reference: str,
    inits: Sequence[str],
    modes: Sequence[str],
    fractions: Sequence[float],
    metrics: Sequence[str],
    value: Callable[[Mapping[str, Any], str], float],
    n_boot: int = 10000,
    level: float = 0.95,
) -> dict[str, Any]:
    """Every init in ``inits`` (other than ``reference``) against ``reference`` per metric, mode
    and fraction. ``results`` are grid cells (init, mode, fraction, seed, per_case);
    ``value(row, metric)`` is one case's score. Holm runs over each metric's comparisons."""
    cells: dict[tuple[str, str, float], dict[int, Sequence[Mapping[str, Any]]]] = {}
    for r in results:
        cells.setdefault((r["init"], r["mode"], float(r["fraction"])), {})[int(r["seed"])] = r["per_case"]
    comps: list[dict[str, Any]] = []
    for metric in metrics:
        family: list[dict[str, Any]] = []
        for name in (i for i in inits if i != reference):
            for mode in modes:
                for frac in fractions:
                    ra = cells.get((name, mode, float(frac)), {})
                    rb = cells.get((reference, mode, float(frac)), {})
                    a, b, ids, seeds = case_seed_matrix(ra, rb, lambda row, m=metric: value(row, m))
                    if not ids:
                        continue
                    res = paired_test(a, b, n_boot=n_boot, level=level)  # seed 0: reproducible
                    res.update(
                        metric=metric, init=name, reference=reference, mode=mode, fraction=frac, seeds=seeds
                    )
                    family.append(res)
        adjusted = holm([c["p_value"] for c in family])
        n_tested = sum(c["p_value"] is not None for c in family)
        for i, res in enumerate(family):
            res["p_holm"] = adjusted[i]
            res["holm_family"] = n_tested
        comps += family
    return {
        "test": TEST_DESCRIPTION.format(level=level * 100),
        "unit": "test case",
        "correction": "holm",
        "comparisons": comps,
    }


def format_stats_md(stats: Mapping[str, Any]) -> str:
    """stats.md: one row per comparison, raw and Holm-adjusted p side by side."""
    lines = [
        f"{stats['test']}\n",
        "| metric | init vs reference | mode | fraction | cases | seeds | mean diff | 95% CI | seed sd "
        "| p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in stats["comparisons"]:
        lo, hi = c["ci95"]
        ci = "–" if lo is None else f"[{lo:+.4f}, {hi:+.4f}]"
        cells = [
            c["metric"],
            f"{c['init']} vs {c['reference']}",
            c["mode"],
            f"{c['fraction'] * 100:g}%",
            str(c["n"]),
            str(c["n_seeds"]),
            _fmt(c["mean_diff"], "+.4f"),
            ci,
            _fmt(c["seed_sd"], ".4f"),
            _fmt(c["p_value"], ".3g"),
            _fmt(c["p_holm"], ".3g"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def write_stats_md(stats: Mapping[str, Any], path: Path) -> None:
    atomic_write_text(path, format_stats_md(stats))


def _f(v: Any) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


# --------------------------------------------------------------------------------------------
# AUC: a property of the whole test set, not of one case
# --------------------------------------------------------------------------------------------
AUC_TEST_DESCRIPTION = (
    "AUC is computed over all test images, so no per-case values exist: paired bootstrap over test "
    "images (the same resampled images for both inits and every seed); statistic = mean over seeds "
    "of the mean AUC over findings (a finding without both classes in a resample is left out), "
    "init - reference; {level:g}% percentile CI; two-sided p from the bootstrap distribution "
    "shifted to a zero mean difference (Hall & Wilson 1991); seed sd = sd over seeds of the "
    "per-seed mean AUC difference; p (Holm) = Holm-adjusted over the init x mode x fraction "
    "comparisons"
)


def _mean_auc(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Mean AUC over findings of (..., N, K) probabilities against (..., N, K) targets -> (...)."""
    from asa3d.eval.tasks2d import auc_per_class

    auc = auc_per_class(probs, targets)
    with np.errstate(invalid="ignore"):
        n = (~np.isnan(auc)).sum(axis=-1)
        return np.where(n > 0, np.nansum(auc, axis=-1) / np.maximum(n, 1), np.nan)


def auc_bootstrap_test(
    a: np.ndarray,
    b: np.ndarray,
    targets: np.ndarray,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    max_elements: int = 20_000_000,
) -> dict[str, Any]:
    """Compare init ``a`` with reference ``b``: (seeds, images, findings) probabilities of the same
    test images (same order) against their (images, findings) targets. Returns the fields of
    ``paired_test`` (``n`` = test images; no Wilcoxon statistic)."""
    a, b, t = np.asarray(a, float), np.asarray(b, float), np.asarray(targets, float)
    if a.shape != b.shape or a.shape[1:] != t.shape:
        raise ValueError(f"paired AUC samples differ in shape: {a.shape}, {b.shape}, targets {t.shape}")
    n_seeds, n = a.shape[0], a.shape[1]
    per_seed = _mean_auc(a, t[None]) - _mean_auc(b, t[None])  # (seeds,)
    ma, mb = _mean_auc(a, t[None]), _mean_auc(b, t[None])
    obs = float(np.nanmean(per_seed)) if np.any(~np.isnan(per_seed)) else np.nan
    out: dict[str, Any] = {
        "n": int(n),
        "n_seeds": int(n_seeds),
        "mean_a": _f(np.nanmean(ma)),
        "mean_b": _f(np.nanmean(mb)),
        "mean_diff": _f(obs),
        "per_seed_mean_diff": [_f(v) for v in per_seed],
        "wilcoxon_stat": None,
    }
    valid = per_seed[~np.isnan(per_seed)]
    out["seed_sd"] = _f(valid.std(ddof=1)) if valid.size > 1 else None
    if np.isnan(obs) or n < 2:
        out.update(ci95=[None, None], ci_level=level, p_value=None)
        return out
    rng = np.random.default_rng(seed)
    chunk = max(1, max_elements // max(1, a[0].size * n_seeds))
    diffs = np.full(n_boot, np.nan)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        idx = rng.integers(n, size=(k, n))  # (k, images): the same draw for both inits and all seeds
        tb = t[idx]  # (k, N, K)
        da = _mean_auc(a[:, idx], tb[None]) - _mean_auc(b[:, idx], tb[None])  # (seeds, k)
        with np.errstate(invalid="ignore"):
            diffs[start : start + k] = np.nanmean(np.where(np.isnan(da), np.nan, da), axis=0)
    diffs = diffs[~np.isnan(diffs)]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    out.update(ci95=[_f(lo), _f(hi)], ci_level=level)
    if obs == 0:
        out["p_value"] = 1.0
    else:
        out["p_value"] = float((1 + np.sum(np.abs(diffs - obs) >= abs(obs))) / (diffs.size + 1))
    return out


def compare_grid_auc(
    results: Sequence[Mapping[str, Any]],
    reference: str,
    inits: Sequence[str],
    modes: Sequence[str],
    fractions: Sequence[float],
    n_boot: int = 10000,
    level: float = 0.95,
) -> dict[str, Any]:
    """``compare_grid`` for classification cells (per-image ``prob`` / ``target`` rows): every init
    against ``reference`` per mode and fraction by ``auc_bootstrap_test``, Holm over them."""
    from asa3d.eval.tasks2d import rows_to_arrays

    cells: dict[tuple[str, str, float], dict[int, Sequence[Mapping[str, Any]]]] = {}
    for r in results:
        cells.setdefault((r["init"], r["mode"], float(r["fraction"])), {})[int(r["seed"])] = r["per_case"]
    family: list[dict[str, Any]] = []
    for name in (i for i in inits if i != reference):
        for mode in modes:
            for frac in fractions:
                ra = cells.get((name, mode, float(frac)), {})
                rb = cells.get((reference, mode, float(frac)), {})
                seeds = sorted(set(ra) & set(rb))
                if not seeds:
                    continue
                ids = [row["id"] for row in rb[seeds[0]]]
                pa, pb, tgt = [], [], None
                for s in seeds:
                    by_a = {row["id"]: row for row in ra[s]}
                    by_b = {row["id"]: row for row in rb[s]}
                    if set(by_a) != set(ids) or set(by_b) != set(ids):
                        raise ValueError(
                            f"{name} vs {reference} ({mode}, {frac}, seed {s}): other test images"
                        )
                    _, xa, tgt = rows_to_arrays([by_a[i] for i in ids])
                    pb.append(rows_to_arrays([by_b[i] for i in ids])[1])
                    pa.append(xa)
                res = auc_bootstrap_test(np.stack(pa), np.stack(pb), tgt, n_boot=n_boot, level=level)
                res.update(
                    metric="auc", init=name, reference=reference, mode=mode, fraction=frac, seeds=seeds
                )
                family.append(res)
    adjusted = holm([c["p_value"] for c in family])
    n_tested = sum(c["p_value"] is not None for c in family)
    for i, res in enumerate(family):
        res["p_holm"] = adjusted[i]
        res["holm_family"] = n_tested
    return {
        "test": AUC_TEST_DESCRIPTION.format(level=level * 100),
        "unit": "test image (bootstrap)",
        "correction": "holm",
        "comparisons": family,
    }

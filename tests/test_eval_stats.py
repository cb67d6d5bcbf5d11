"""The grid's paired statistics on hand-built results: the test case is the unit (seeds averaged
first), Wilcoxon over cases equals scipy's on the per-case vectors, the two-level bootstrap CI
has its stated coverage and resamples seeds within cases, Holm matches a hand example."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import stats as sstats

from asa3d.eval.stats import (
    case_means,
    case_seed_matrix,
    compare_grid,
    format_stats_md,
    hierarchical_bootstrap_ci,
    holm,
    paired_test,
    write_stats_md,
)


def _case_seed_data(n_cases=8, n_seeds=5, mu=0.03, case_sd=0.05, seed_sd=0.01, rng=0):
    """(a, b) of shape (cases, seeds): a = b + mu + case effect + seed noise."""
    g = np.random.default_rng(rng)
    b = g.uniform(0.5, 0.8, size=(n_cases, 1)) + g.normal(0, seed_sd, size=(n_cases, n_seeds))
    a = b + mu + g.normal(0, case_sd, size=(n_cases, 1)) + g.normal(0, seed_sd, size=(n_cases, n_seeds))
    return a, b


def test_case_means_ignore_nan_and_all_nan_case_is_nan():
    x = np.array([[1.0, 3.0, np.nan], [np.nan, np.nan, np.nan], [2.0, 2.0, 5.0]])
    m = case_means(x)
    assert m[0] == 2.0 and np.isnan(m[1]) and m[2] == 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-missing case is NaN without a warning
        m = case_means([[1, None], [None, None]])
    assert m[0] == 1.0 and np.isnan(m[1])


def test_mean_difference_is_over_cases_of_seed_means():
    # unbalanced seeds: case 0 has 1 valid seed, case 1 has 3; the pooled mean over pairs would be
    # (4 + 1 + 1 + 1) / 4 = 1.75, the case-level mean is (4 + 1) / 2 = 2.5
    a = np.array([[5.0, np.nan, np.nan], [2.0, 2.0, 2.0]])
    b = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    r = paired_test(a, b, n_boot=200)
    assert r["mean_diff"] == pytest.approx(2.5)
    assert r["n"] == 2 and r["n_seeds"] == 3
    assert r["mean_a"] == pytest.approx((5 + 2) / 2) and r["mean_b"] == pytest.approx((1 + 1) / 2)
    # a NaN on the b side drops that (case, seed) on both sides
    b2 = b.copy()
    b2[1, 0] = np.nan
    a2 = a.copy()
    a2[1, 0] = 100.0
    r2 = paired_test(a2, b2, n_boot=200)
    assert r2["mean_diff"] == pytest.approx(2.5) and r2["mean_a"] == pytest.approx((5 + 2) / 2)
    # None (a JSON null) is a missing value too
    r3 = paired_test([[0.9, None], [0.8, 0.6]], [[0.5, 0.5], [0.4, None]], n_boot=200)
    assert r3["n"] == 2 and r3["mean_diff"] == pytest.approx((0.4 + 0.4) / 2)


def test_p_equals_scipy_on_per_case_vectors_not_on_pooled_pairs():
    a, b = _case_seed_data(n_cases=10, n_seeds=5)
    r = paired_test(a, b, n_boot=500)
    ref = sstats.wilcoxon(a.mean(axis=1), b.mean(axis=1))
    assert r["n"] == 10
    assert r["p_value"] == pytest.approx(ref.pvalue) and r["wilcoxon_stat"] == pytest.approx(ref.statistic)
    pooled = sstats.wilcoxon(a.ravel(), b.ravel()).pvalue  # n = 50: the too-small p of the old test
    assert pooled < r["p_value"]
    # all six case differences positive and distinct: W- = 0, exact two-sided p = 2 / 2**6
    x = np.array([0.9, 0.8, 0.85, 0.7, 0.95, 0.6])
    y = np.array([0.8, 0.75, 0.70, 0.5, 0.94, 0.3])
    seeds = np.stack([x, x + 0.01], axis=1), np.stack([y, y + 0.01], axis=1)
    assert paired_test(*seeds, n_boot=200)["p_value"] == pytest.approx(2 / 64)


def test_no_difference_gives_p_one_and_empty_gives_none():
    a = np.full((4, 2), 0.7)
    r = paired_test(a, a.copy(), n_boot=100)
    assert r["p_value"] == 1.0 and r["mean_diff"] == 0.0 and r["ci95"] == [0.0, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" on an empty comparison
        e = paired_test(np.full((2, 2), np.nan), np.zeros((2, 2)), n_boot=100)
    assert e["n"] == 0 and e["p_value"] is None and e["mean_diff"] is None and e["ci95"] == [None, None]
    assert e["wilcoxon_stat"] is None and r["wilcoxon_stat"] is None
    # every case better by exactly 1: a real difference (p from the test), not "no difference"
    x = np.array([[0.1], [0.2], [0.3], [0.4], [0.5], [0.6]])
    one = paired_test(x + 1.0, x, n_boot=100)
    assert one["p_value"] == pytest.approx(2 / 64) and one["wilcoxon_stat"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        paired_test(np.zeros((3, 2)), np.zeros((3, 3)))


def test_one_dimensional_input_is_one_seed_per_case():
    x, y = [1.0, float("nan"), 0.5, 0.9], [0.5, 0.2, float("nan"), 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one seed: no "degrees of freedom <= 0" warning
        r = paired_test(x, y, n_boot=200)
    assert r["n"] == 2 and r["n_seeds"] == 1 and r["mean_diff"] == pytest.approx((0.5 + 0.6) / 2)
    assert r["seed_sd"] is None  # one seed: no seed-to-seed spread


def test_swapping_cases_between_inits_changes_the_result():
    a, b = _case_seed_data(n_cases=8, n_seeds=3, mu=0.05)
    r = paired_test(a, b, n_boot=500)
    sa, sb = a.copy(), b.copy()
    sa[:3], sb[:3] = b[:3], a[:3]  # three cases' values attributed to the other init
    s = paired_test(sa, sb, n_boot=500)
    assert s["mean_diff"] != pytest.approx(r["mean_diff"]) and s["p_value"] != pytest.approx(r["p_value"])
    # mis-pairing the cases (b's rows shifted by one) also changes the test
    m = paired_test(a, np.roll(b, 1, axis=0), n_boot=500)
    assert m["p_value"] != pytest.approx(r["p_value"])


def test_seed_spread_is_sd_of_per_seed_mean_differences():
    a = np.array([[0.9, 0.7], [0.8, 0.8], [0.6, 0.4]])
    b = np.array([[0.5, 0.5], [0.5, 0.6], [0.5, 0.5]])
    r = paired_test(a, b, n_boot=200)
    per_seed = (a - b).mean(axis=0)  # [0.2667, 0.1]
    assert r["per_seed_mean_diff"] == pytest.approx(list(per_seed))
    assert r["seed_sd"] == pytest.approx(np.std(per_seed, ddof=1))
    # a seed missing everywhere has no mean difference, silently
    a3, b3 = np.hstack([a, np.full((3, 1), np.nan)]), np.hstack([b, np.zeros((3, 1))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r3 = paired_test(a3, b3, n_boot=200)
    assert (
        r3["per_seed_mean_diff"][:2] == pytest.approx(list(per_seed)) and r3["per_seed_mean_diff"][2] is None
    )
    assert r3["seed_sd"] == pytest.approx(r["seed_sd"]) and r3["n_seeds"] == 3


def test_bootstrap_ci_covers_the_true_difference_at_its_level():
    # 200 simulated grids with a known mean difference: the 90% CI must cover it ~90% of the time
    mu, hits, n_sim = 0.03, 0, 200
    for k in range(n_sim):
        a, b = _case_seed_data(n_cases=12, n_seeds=4, mu=mu, rng=k)
        lo, hi = hierarchical_bootstrap_ci(a - b, n_boot=400, level=0.90, seed=k)
        hits += lo <= mu <= hi
    assert 0.80 <= hits / n_sim <= 0.97


def test_bootstrap_ci_narrows_with_more_cases_and_is_seeded():
    a, b = _case_seed_data(n_cases=64, n_seeds=3, mu=0.02, rng=3)
    d = a - b
    few = hierarchical_bootstrap_ci(d[:8], n_boot=3000, seed=1)
    many = hierarchical_bootstrap_ci(d, n_boot=3000, seed=1)
    assert (many[1] - many[0]) < 0.6 * (few[1] - few[0])
    assert hierarchical_bootstrap_ci(d, n_boot=3000, seed=1) == many
    assert hierarchical_bootstrap_ci(d, n_boot=3000, seed=2) != many
    lo99, hi99 = hierarchical_bootstrap_ci(d, n_boot=3000, level=0.99, seed=1)
    assert lo99 < many[0] and hi99 > many[1]  # a higher level is wider


def test_bootstrap_resamples_seeds_within_cases():
    # one case, two seeds: resampling cases alone could not move the mean; seeds within it must.
    # The replicate mean of two independent draws from {0, 1} is 0, 0.5, 1 with p = 1/4, 1/2, 1/4
    d = np.array([[0.0, 1.0]])
    lo, hi = hierarchical_bootstrap_ci(d, n_boot=4000, seed=0)
    assert lo == 0.0 and hi == 1.0
    # level 0.4: the 30 % and 70 % quantiles both fall on 0.5 (and would not at another alpha)
    assert hierarchical_bootstrap_ci(d, n_boot=4000, level=0.4, seed=0) == (0.5, 0.5)
    # 1-D input is one seed per case; None is missing
    v = np.array([0.1, 0.4, 0.2, 0.8])
    assert hierarchical_bootstrap_ci(v, n_boot=300) == hierarchical_bootstrap_ci(v[:, None], n_boot=300)
    with_none = hierarchical_bootstrap_ci([[0.1, None], [0.4, 0.4]], n_boot=300)
    assert with_none == hierarchical_bootstrap_ci([[0.1, np.nan], [0.4, 0.4]], n_boot=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = hierarchical_bootstrap_ci(np.full((2, 3), np.nan), n_boot=100)
    assert np.isnan(empty[0]) and np.isnan(empty[1])
    # the seeds of a case are drawn as many times as it has valid seeds, never a NaN
    d = np.array([[np.nan, 0.2, np.nan, 0.2], [0.6, np.nan, np.nan, np.nan]])
    lo, hi = hierarchical_bootstrap_ci(d, n_boot=2000, seed=0)
    assert (lo, hi) == pytest.approx((0.2, 0.6))
    # identical cases without seed noise: a degenerate interval at the value
    assert hierarchical_bootstrap_ci(np.full((5, 3), 0.25), n_boot=500) == pytest.approx((0.25, 0.25))
    # case effects dominate: the interval is about the case-level one, not the n = cases x seeds one
    a, b = _case_seed_data(n_cases=10, n_seeds=5, case_sd=0.05, seed_sd=0.001, rng=7)
    d = a - b
    lo, hi = hierarchical_bootstrap_ci(d, n_boot=4000)
    pooled = np.random.default_rng(0).choice(d.ravel(), size=(4000, d.size)).mean(axis=1)
    plo, phi = np.quantile(pooled, [0.025, 0.975])
    assert (hi - lo) > 1.8 * (phi - plo)  # sqrt(5) wider in theory


def test_holm_against_a_hand_example():
    # sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([None, 0.01, 0.5]) == [None, pytest.approx(0.02), pytest.approx(0.5)]
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([]) == [] and holm([0.2]) == [0.2]


def _rows(ids, vals):
    return [
        {"id": c, "dice": {"liver": float(v), "spleen": float(v) + 0.1}}
        for c, v in zip(ids, vals, strict=True)
    ]


def _hand_grid(rng=0):
    """2 inits x 2 modes x 2 fractions x 3 seeds, 5 test cases; 'asa' beats scratch by a
    mode/fraction-dependent margin. The reference's rows come in another order (pairing is by id)."""
    g = np.random.default_rng(rng)
    ids = [f"case{i}" for i in range(5)]
    results, truth = [], {}
    for mode_i, mode in enumerate(["finetune", "probe"]):
        for frac in (0.5, 1.0):
            base = g.uniform(0.4, 0.8, size=(5, 3))
            gain = base + 0.02 * (1 + mode_i) * frac + g.normal(0, 0.03, size=(5, 3))
            truth[(mode, frac)] = (gain + 0.05, base + 0.05)  # value = mean of the two classes
            for s in range(3):
                results.append(
                    {
                        "init": "asa",
                        "mode": mode,
                        "fraction": frac,
                        "seed": s,
                        "per_case": _rows(ids, gain[:, s]),
                    }
                )
                order = [4, 2, 0, 3, 1]
                results.append(
                    {
                        "init": "scratch",
                        "mode": mode,
                        "fraction": frac,
                        "seed": s,
                        "per_case": _rows([ids[i] for i in order], base[order, s]),
                    }
                )
    return results, truth


def _value(row, metric):
    return float(np.mean(list(row[metric].values())))


def test_compare_grid_pairs_by_case_and_seed_and_holm_corrects_the_family(tmp_path):
    results, truth = _hand_grid()
    st = compare_grid(
        results,
        "scratch",
        ["scratch", "asa"],
        ["finetune", "probe"],
        [0.5, 1.0],
        ["dice"],
        _value,
        n_boot=500,
    )
    comps = st["comparisons"]
    assert [(c["mode"], c["fraction"]) for c in comps] == [
        ("finetune", 0.5),
        ("finetune", 1.0),
        ("probe", 0.5),
        ("probe", 1.0),
    ]
    for c in comps:
        a, b = truth[(c["mode"], c["fraction"])]
        assert c["n"] == 5 and c["n_seeds"] == 3 and c["seeds"] == [0, 1, 2]
        assert c["init"] == "asa" and c["reference"] == "scratch"
        assert c["mean_diff"] == pytest.approx((a - b).mean())
        assert c["p_value"] == pytest.approx(sstats.wilcoxon(a.mean(axis=1), b.mean(axis=1)).pvalue)
        assert c["per_seed_mean_diff"] == pytest.approx(list((a - b).mean(axis=0)))
        assert c["holm_family"] == 4
    assert [c["p_holm"] for c in comps] == pytest.approx(holm([c["p_value"] for c in comps]))
    assert st["unit"] == "test case" and st["correction"] == "holm"
    write_stats_md(st, tmp_path / "stats.md")
    md = (tmp_path / "stats.md").read_text()
    assert "| p | p (Holm) |" in md and "seed sd" in md and "Wilcoxon" in md
    row = md.splitlines()[4].split("|")
    assert row[5].strip() == "5" and row[6].strip() == "3"
    assert row[-3].strip() == f"{comps[0]['p_value']:.3g}" and row[-2].strip() == f"{comps[0]['p_holm']:.3g}"
    json.dumps(st)  # stats.json must serialise


def test_compare_grid_holm_family_is_per_metric_and_skips_missing_cells():
    results, _ = _hand_grid()
    for r in results:
        for row in r["per_case"]:
            row["nsd"] = dict(row["dice"])
    kept = [r for r in results if not (r["mode"] == "probe" and r["fraction"] == 0.5 and r["init"] == "asa")]
    st = compare_grid(
        kept,
        "scratch",
        ["scratch", "asa"],
        ["finetune", "probe"],
        [0.5, 1.0],
        ["dice", "nsd"],
        _value,
        n_boot=200,
    )
    assert [c["metric"] for c in st["comparisons"]] == ["dice"] * 3 + ["nsd"] * 3
    assert all(c["holm_family"] == 3 for c in st["comparisons"])
    dice = [c for c in st["comparisons"] if c["metric"] == "dice"]
    assert [c["p_holm"] for c in dice] == pytest.approx(holm([c["p_value"] for c in dice]))


def test_case_seed_matrix_pairs_by_id_and_marks_one_sided_entries_missing():
    ra = {0: _rows(["x", "y"], [0.5, 0.6]), 1: _rows(["x", "y", "z"], [0.7, 0.8, 0.9])}
    rb = {0: _rows(["y", "x"], [0.1, 0.2]), 1: _rows(["z", "x"], [0.3, 0.4]), 2: _rows(["x"], [0.0])}
    a, b, ids, seeds = case_seed_matrix(ra, rb, lambda row: row["dice"]["liver"])
    assert seeds == [0, 1] and ids == ["x", "y", "z"]
    np.testing.assert_allclose(a, [[0.5, 0.7], [0.6, np.nan], [np.nan, 0.9]])
    np.testing.assert_allclose(b, [[0.2, 0.4], [0.1, np.nan], [np.nan, 0.3]])


def test_stats_md_shows_dashes_for_missing_values():
    st = {
        "test": "t",
        "comparisons": [
            {
                "metric": "dice",
                "init": "a",
                "reference": "s",
                "mode": "probe",
                "fraction": 0.5,
                "n": 0,
                "n_seeds": 2,
                "mean_diff": None,
                "ci95": [None, None],
                "seed_sd": None,
                "p_value": None,
                "p_holm": None,
            }
        ],
    }
    assert (
        format_stats_md(st).splitlines()[-1] == "| dice | a vs s | probe | 50% | 0 | 2 | – | – | – | – | – |"
    )


@pytest.mark.parametrize(
    "kwargs", [{}, {"n_boot": 500}, {"n_boot": 500, "level": 0.9}, {"n_boot": 500, "seed": 3}]
)
def test_paired_test_ci_is_the_two_level_bootstrap_with_its_arguments(kwargs):
    a, b = _case_seed_data(n_cases=6, n_seeds=3)
    a[0, 1] = np.nan  # dropped on both sides
    b[2, 0] = np.nan
    r = paired_test(a, b, **kwargs)
    d = a - b
    want = hierarchical_bootstrap_ci(
        d, n_boot=kwargs.get("n_boot", 10000), level=kwargs.get("level", 0.95), seed=kwargs.get("seed", 0)
    )
    assert r["ci95"] == pytest.approx(list(want)) and r["ci_level"] == kwargs.get("level", 0.95)
    # the defaults are the documented ones: 10,000 replicates, level 0.95, seed 0
    assert hierarchical_bootstrap_ci(d) == hierarchical_bootstrap_ci(d, n_boot=10000, level=0.95, seed=0)


def test_compare_grid_passes_its_bootstrap_settings_and_describes_them():
    results, truth = _hand_grid(rng=1)
    st = compare_grid(
        results, "scratch", ["asa", "scratch"], ["finetune"], [0.5], ["dice"], _value, n_boot=300, level=0.9
    )
    (c,) = st["comparisons"]
    a, b = truth[("finetune", 0.5)]
    want = paired_test(a, b, n_boot=300, seed=0, level=0.9)
    assert c["ci95"] == pytest.approx(want["ci95"]) and c["ci_level"] == 0.9
    assert "90% two-level bootstrap" in st["test"] and "init x mode x fraction" in st["test"]
    assert (
        "95% two-level"
        in compare_grid(results, "scratch", ["asa"], ["probe"], [1.0], ["dice"], _value, n_boot=50)["test"]
    )
    # default replicates: 10,000
    d = compare_grid(results, "scratch", ["asa"], ["probe"], [1.0], ["dice"], _value)["comparisons"][0]
    a, b = truth[("probe", 1.0)]
    assert d["ci95"] == pytest.approx(paired_test(a, b)["ci95"])


def test_compare_grid_skips_a_comparison_without_reference_cells():
    results, _ = _hand_grid()
    kept = [r for r in results if not (r["init"] == "scratch" and r["mode"] == "probe")]
    st = compare_grid(
        kept, "scratch", ["scratch", "asa"], ["finetune", "probe"], [0.5, 1.0], ["dice"], _value, n_boot=100
    )
    assert [(c["mode"], c["fraction"]) for c in st["comparisons"]] == [("finetune", 0.5), ("finetune", 1.0)]
    assert all(c["holm_family"] == 2 for c in st["comparisons"])


def test_stats_md_lines_exactly():
    comp = {
        "metric": "dice",
        "init": "asa",
        "reference": "scratch",
        "mode": "finetune",
        "fraction": 0.05,
        "n": 16,
        "n_seeds": 5,
        "mean_diff": 0.012345,
        "ci95": [-0.001, 0.0256],
        "seed_sd": 0.00456,
        "p_value": 0.0000213,
        "p_holm": 0.0000852,
    }
    lines = format_stats_md({"test": "the test", "comparisons": [comp]}).splitlines()
    assert lines == [
        "the test",
        "",
        "| metric | init vs reference | mode | fraction | cases | seeds | mean diff | 95% CI | seed sd | p "
        "| p (Holm) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| dice | asa vs scratch | finetune | 5% | 16 | 5 | +0.0123 | [-0.0010, +0.0256] | 0.0046 | 2.13e-05 "
        "| 8.52e-05 |",
    ]

"""Dice / HD95 / NSD conventions on small hand-made arrays; label fractions; paired statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sstats

from asa3d.eval.metrics import btcv_paper_columns, case_metrics, json_safe, nanmean
from asa3d.eval.splits import nested_subsets, subset_size
from asa3d.eval.stats import bootstrap_ci, paired_test


def _arrays():
    gt = np.zeros((6, 6, 6), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[0:2, 0:2, 0:2] = 1  # 8 voxels
    pred[0:2, 0:2, 0:1] = 1  # 4 voxels, all inside -> Dice 2*4/(8+4) = 2/3
    pred[5, 5, 5] = 2  # class 2 predicted but absent from GT -> 0
    # class 3: absent from both -> NaN
    return pred, gt


def test_dice_by_hand_including_empty_classes():
    pred, gt = _arrays()
    d = case_metrics(pred, gt, n_classes=4)["dice"]
    assert d[0] == pytest.approx(2 / 3)
    assert d[1] == 0.0
    assert math.isnan(d[2])
    assert nanmean(d) == pytest.approx((2 / 3 + 0) / 2)  # NaN excluded from the mean


def test_hausdorff_by_hand():
    # GT: a single voxel at x=0; prediction: single voxels at x=0 and x=3 -> distances {0, 3};
    # directed distances pred->gt {0, 3}, gt->pred {0}; 95th percentile over both directions.
    gt = np.zeros((5, 5, 5), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[0, 0, 0] = 1
    pred[0, 0, 0] = 1
    pred[3, 0, 0] = 1
    h = case_metrics(pred, gt, n_classes=2, spacing=(2.0, 1.0, 1.0), metrics=["hd95"])["hd95"]
    # MONAI takes the max of the two directed 95th percentiles: pred->gt = 95th pct of {0, 6 mm} = 5.7
    assert h[0] == pytest.approx(np.percentile([0.0, 6.0], 95))
    # identical masks: 0; class only in prediction: the volume diagonal (finite worst case)
    same = case_metrics(gt, gt, n_classes=3, spacing=(1, 1, 1), metrics=["hd95", "nsd"])
    assert same["hd95"][0] == 0.0 and math.isnan(same["hd95"][1])
    assert same["nsd"][0] == 1.0 and math.isnan(same["nsd"][1])
    pred2 = gt.copy()
    pred2[4, 4, 4] = 2
    m = case_metrics(pred2, gt, n_classes=3, spacing=(1, 1, 1), metrics=["hd95", "nsd", "dice"])
    assert m["hd95"][1] == pytest.approx(math.sqrt(3 * 25))
    assert m["nsd"][1] == 0.0 and m["dice"][1] == 0.0


def test_btcv_columns_ag_is_mean_of_adrenals():
    from asa3d.data.presets import BTCV_LABELS

    preset = btcv_paper_columns({v: float(k) for k, v in BTCV_LABELS.items() if k > 0})
    assert preset["Vins"] == 10.0 and preset["IVC"] == 9.0 and preset["AG"] == 12.5 and preset["Pan"] == 11.0
    names = [
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "esophagus",
        "liver",
        "stomach",
        "aorta",
        "inferior vena cava",
        "portal vein and splenic vein",
        "pancreas",
        "right adrenal gland",
        "left adrenal gland",
    ]
    vals = {n: 0.5 + 0.01 * i for i, n in enumerate(names)}
    cols = btcv_paper_columns(vals)
    assert len(cols) == 13 and list(cols)[-2:] == ["AG", "Avg"]
    assert cols["AG"] == pytest.approx((vals["right adrenal gland"] + vals["left adrenal gland"]) / 2)
    assert cols["Avg"] == pytest.approx(np.mean([v for k, v in cols.items() if k != "Avg"]))
    assert cols["Vins"] == vals["portal vein and splenic vein"]


def test_json_safe():
    assert json_safe({"a": [float("nan"), 1.0, np.float32(2)]}) == {"a": [None, 1.0, 2.0]}


def test_label_fractions_nested_and_seeded():
    ids = [f"case{i:03d}" for i in range(240)]
    fr = [0.05, 0.1, 0.2, 0.5, 1.0]
    a = nested_subsets(ids, fr, seed=3)
    assert [len(a[f]) for f in fr] == [12, 24, 48, 120, 240]  # the paper's AMOS sizes
    for small, big in zip(fr, fr[1:], strict=False):
        assert a[big][: len(a[small])] == a[small]
    assert nested_subsets(list(reversed(ids)), fr, seed=3) == a  # order of the datalist irrelevant
    assert nested_subsets(ids, fr, seed=4)[0.05] != a[0.05]
    assert subset_size(3, 0.05) == 1 and subset_size(7, 0.5) == 4


def test_wilcoxon_matches_scipy_and_hand_case():
    # all 6 differences positive, distinct: W- = 0; exact two-sided p = 2 / 2**6
    a = [0.9, 0.8, 0.85, 0.7, 0.95, 0.6]
    b = [0.8, 0.75, 0.70, 0.5, 0.94, 0.3]
    r = paired_test(a, b, n_boot=2000)
    assert r["p_value"] == pytest.approx(2 / 64)
    assert r["p_value"] == pytest.approx(sstats.wilcoxon(a, b).pvalue)
    md = np.mean(np.subtract(a, b))
    assert r["mean_diff"] == pytest.approx(md)
    assert r["ci95"][0] <= md <= r["ci95"][1]
    assert r["n"] == 6


def test_paired_test_drops_nan_pairs_and_ci():
    r = paired_test([1.0, float("nan"), 0.5], [0.5, 0.2, float("nan")])
    assert r["n"] == 1
    lo, hi = bootstrap_ci([0.1, 0.2, 0.3, 0.4], n_boot=4000)
    assert lo <= 0.25 <= hi and lo >= 0.1 and hi <= 0.4

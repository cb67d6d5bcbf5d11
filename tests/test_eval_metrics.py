"""Dice / HD95 / NSD conventions on small hand-made arrays; label fractions (statistics:
test_eval_stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asa3d.eval.metrics import btcv_paper_columns, case_metrics, json_safe, mean_over_classes, nanmean
from asa3d.eval.splits import nested_subsets, subset_size


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


CANONICAL = {
    "Spl": "spleen",
    "RKid": "right_kidney",
    "LKid": "left_kidney",
    "Gall": "gallbladder",
    "Eso": "esophagus",
    "Liv": "liver",
    "Sto": "stomach",
    "Aor": "aorta",
    "IVC": "ivc",
    "Vins": "portal_splenic_veins",
    "Pan": "pancreas",
}


@pytest.mark.parametrize(
    "col,spelling",
    [
        ("RKid", "Kidney (right)"),
        ("LKid", "kidney_left"),
        ("IVC", "Inferior Vena Cava"),
        ("IVC", "postcava"),
        ("Vins", "portal_and_splenic_vein"),
        ("Vins", "Portal and Splenic Veins"),
        ("Vins", "portal vein"),
        ("Vins", "portal-splenic veins"),
        ("Eso", "Oesophagus"),
        ("Gall", "gall bladder"),
        ("AG", "adrenal gland right"),
        ("AG", "Adrenal-Gland-Left"),
        ("AG", "right adrenal"),
    ],
)
def test_btcv_columns_find_each_spelling_by_name_not_position(col: str, spelling: str) -> None:
    # classes rotated by one with distinct values: the position fallback would pick a wrong one
    items = list(CANONICAL.items())
    classes = dict(items[1:] + items[:1]) | {"RAG": "right_adrenal", "LAG": "left_adrenal"}
    vals = {name: 0.1 + 0.05 * i for i, name in enumerate(classes.values())}
    if col == "AG":
        old = "right_adrenal" if "right" in spelling.lower() else "left_adrenal"
        other = "left_adrenal" if old == "right_adrenal" else "right_adrenal"
        want = (vals[old] + vals[other]) / 2
    else:
        old = CANONICAL[col]
        want = vals[old]
    renamed = {(spelling if k == old else k): v for k, v in vals.items()}
    cols = btcv_paper_columns(renamed)
    assert cols[col] == pytest.approx(want)
    for other, name in CANONICAL.items():  # every other column still found by its name
        if other != col:
            assert cols[other] == pytest.approx(vals[name]), other
    assert cols["Avg"] == pytest.approx(np.mean([v for k, v in cols.items() if k != "Avg"]))


def test_btcv_columns_fall_back_to_label_order_and_ag_ignores_a_missing_adrenal() -> None:
    vals = {f"class{i}": 0.1 * i for i in range(1, 12)}  # names that match nothing: BTCV order
    cols = btcv_paper_columns(vals)
    assert [cols[c] for c in CANONICAL] == pytest.approx([0.1 * i for i in range(1, 12)])
    assert np.isnan(cols["AG"])  # no adrenal found
    assert cols["Avg"] == pytest.approx(np.mean([0.1 * i for i in range(1, 12)]))
    short = btcv_paper_columns({"class1": 0.5})
    assert short["Spl"] == 0.5 and np.isnan(short["Pan"])
    one = btcv_paper_columns({**{v: 0.5 for v in CANONICAL.values()}, "left_adrenal": 0.3})
    assert one["AG"] == pytest.approx(0.3)


def test_mean_over_classes_leaves_out_none_nan_and_merged_regions() -> None:
    per_class = {"liver": 0.5, "spleen": None, "kidney": 0.7, "gland": float("nan"), "merged": 0.1}
    assert mean_over_classes(per_class, exclude=["merged"]) == pytest.approx(0.6)
    assert mean_over_classes(per_class) == pytest.approx((0.5 + 0.7 + 0.1) / 3)
    assert np.isnan(mean_over_classes({"a": None}))


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


def test_case_metrics_refusals_and_default_metric() -> None:
    gt = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(ValueError) as e:
        case_metrics(gt, gt, 2, metrics=["dice", "iou", "assd"])
    assert str(e.value) == "unknown metric(s) ['assd', 'iou']; choose from ['dice', 'hd95', 'nsd']"
    with pytest.raises(ValueError) as e:
        case_metrics(gt[:2], gt, 2)
    assert str(e.value) == "prediction shape (2, 3, 3) differs from ground truth (3, 3, 3)"
    gt[1, 1, 1] = 1
    assert case_metrics(gt, gt, 2) == {"dice": [1.0]}  # dice only unless asked


def test_hd95_empty_side_is_the_anisotropic_diagonal_and_nsd_uses_the_tolerance() -> None:
    gt = np.zeros((5, 4, 3), np.uint8)
    gt[1, 1, 1] = 1
    pred = np.zeros_like(gt)
    pred[1, 1, 1] = 2  # class 1 missed, class 2 hallucinated
    m = case_metrics(pred, gt, 3, spacing=(2.0, 1.0, 3.0), metrics=["hd95", "nsd"])
    diag = math.sqrt(10.0**2 + 4.0**2 + 9.0**2)
    assert m["hd95"] == [pytest.approx(diag), pytest.approx(diag)]
    assert m["nsd"] == [0.0, 0.0]
    # a one-voxel (1 mm) shift: within a 2 mm tolerance every surface point is close, within 0.5 mm none
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:5, 2:5, 2:5] = 1
    shifted = np.roll(gt, 1, axis=0)
    assert case_metrics(shifted, gt, 2, metrics=["nsd"])["nsd"] == [pytest.approx(1.0)]
    low = case_metrics(shifted, gt, 2, metrics=["nsd"], nsd_tolerance_mm=0.5)["nsd"][0]
    assert low < 0.9


def test_json_safe_and_nanmean_edges() -> None:
    tree = {"a": (1.5, float("inf")), "b": {"c": -float("inf"), "d": np.int64(3)}, "e": "x", "f": None}
    out = json_safe(tree)
    assert out == {"a": [1.5, None], "b": {"c": None, "d": 3}, "e": "x", "f": None}
    assert type(out["b"]["d"]) is int and type(out["a"]) is list
    assert json_safe(np.float64("nan")) is None and json_safe(np.float32(0.5)) == 0.5
    assert nanmean([None, 1.0, float("nan"), 3.0]) == 2.0
    assert math.isnan(nanmean([])) and math.isnan(nanmean([None, float("nan")]))


def test_nsd_default_tolerance_is_2_mm() -> None:
    gt = np.zeros((12, 8, 8), np.uint8)
    gt[3:7, 2:6, 2:6] = 1
    shifted = np.roll(gt, 1, axis=0)  # a 2.5 mm shift at 2.5 mm spacing: inside 3 mm, outside 2 mm
    spacing = (2.5, 1.0, 1.0)
    default = case_metrics(shifted, gt, 2, spacing=spacing, metrics=["nsd"])["nsd"][0]
    assert (
        default
        == case_metrics(shifted, gt, 2, spacing=spacing, metrics=["nsd"], nsd_tolerance_mm=2.0)["nsd"][0]
    )
    assert (
        default
        < case_metrics(shifted, gt, 2, spacing=spacing, metrics=["nsd"], nsd_tolerance_mm=3.0)["nsd"][0]
    )


def test_nanmean_accumulates_in_float64_and_warns_about_nothing() -> None:
    import warnings

    vals = [np.float32(0.1), np.float32(0.2), np.float32(0.7)]
    assert nanmean(vals) == float(np.mean(np.asarray(vals, dtype=np.float64)))  # not float32's mean
    assert nanmean(vals) != float(np.mean(np.asarray(vals, dtype=np.float32)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" in a user's log for an absent class
        assert math.isnan(nanmean([])) and math.isnan(nanmean([float("nan"), None]))

"""Slide-level metrics (equal to scikit-learn's) and CAMELYON16 lesions / FROC (a hand-computed example)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import recall_score, roc_auc_score

from medflow.extract.wsi.annotations import Polygon
from medflow.predict import froc
from medflow.predict.slide_metrics import fold_results, slide_metrics, slide_score


def test_slide_score_aggregations() -> None:
    p = np.array([0.1, np.nan, 0.9, 0.5, 0.7])
    assert slide_score(p, "mean") == pytest.approx(0.55)
    assert slide_score(p, "max") == pytest.approx(0.9)
    assert slide_score(p, "topk", 2) == pytest.approx(0.8)
    assert slide_score(p, "topk", 10) == pytest.approx(0.55)
    assert slide_score(np.array([np.nan]), "mean") is None


@pytest.mark.parametrize("seed", range(5))
def test_slide_metrics_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40) * 0.5 + 0.4 * y, 1)  # ties on purpose
    m = slide_metrics(scores, y, threshold=0.5)
    pred = (scores >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, scores))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["n"] == 40 and m["positives"] == int(y.sum())


def test_slide_metrics_undefined_are_none() -> None:
    m = slide_metrics([0.2, 0.9], [1, 1], 0.5)
    assert m["auc"] is None and m["specificity"] is None and m["sensitivity"] == 0.5


def test_froc_hand_computed_example() -> None:
    # Five slides: A has lesions L1, L2 (L1 hit twice, 0.9 and 0.6; L2 hit at 0.3) and a false positive 0.7;
    # B is normal with detections 0.8 and 0.2; C has lesion L3, missed, and a false positive 0.5; D, E are
    # normal without detections.
    slides = [
        {"tp_probs": [0.9, 0.3], "fp_probs": [0.7], "n_lesions": 2},
        {"tp_probs": [], "fp_probs": [0.8, 0.2], "n_lesions": 0},
        {"tp_probs": [0.0], "fp_probs": [0.5], "n_lesions": 1},
        {"tp_probs": [], "fp_probs": [], "n_lesions": 0},
        {"tp_probs": [], "fp_probs": [], "n_lesions": 0},
    ]
    fps, sens = froc.froc_curve(slides)
    # thresholds 0.2, 0.3, 0.5, 0.7, 0.8, 0.9 (the lowest distinct value, 0, is skipped), then (0, 0):
    # FP ≥ t: 4, 3, 3, 2, 1, 0 over 5 slides; lesions found: 2, 2, 1, 1, 1, 1 of 3.
    np.testing.assert_allclose(fps, [0.8, 0.6, 0.6, 0.4, 0.2, 0.0, 0.0])
    np.testing.assert_allclose(sens, [2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 0.0])
    result = froc.froc(slides)
    # at 1/4 and 1/2 FP per slide: 1/3; at 1, 2, 4, 8 (beyond the last point, 0.8): 2/3.
    np.testing.assert_allclose(result["sensitivity"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert result["score"] == pytest.approx(5 / 9) and result["lesions"] == 3 and result["slides"] == 5
    assert froc.froc(slides[1:2]) is None  # no lesion: FROC undefined


def test_froc_of_a_perfect_detector_is_one() -> None:
    # Every lesion found at 1.0, no false positive: the challenge's code (dropping the lowest distinct
    # probability, here 1.0) would give 0; medflow drops only the 0 of missed lesions.
    slides = [
        {"tp_probs": [1.0, 1.0], "fp_probs": [], "n_lesions": 2},
        {"tp_probs": [], "fp_probs": [], "n_lesions": 0},
    ]
    assert froc.froc(slides)["score"] == 1.0
    missed = [{"tp_probs": [1.0, 0.0], "fp_probs": [0.3], "n_lesions": 2}]
    fps, sens = froc.froc_curve(missed)  # thresholds 0.3, 1.0 (0 dropped, as the challenge's code drops it)
    np.testing.assert_allclose(fps, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(sens, [0.5, 0.5, 0.0])


def _square(x0: float, y0: float, size: float, group: str = "tumour") -> Polygon:
    ring = np.array([[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size]], dtype=float)
    return Polygon(ring, group=group)


def test_lesions_dilate_merge_and_drop_isolated_tumour_cells() -> None:
    mpp = 0.243  # evaluation cells are then 32 level-0 px, as CAMELYON16's level 5
    polygons = [
        _square(1000, 1000, 1600),  # 389 µm: a lesion
        _square(2700, 1000, 1600),  # 100 px (24 µm) to its right: within 75 µm, merged with it
        _square(9000, 9000, 40),  # 10 µm: an isolated tumour cell cluster (< 275 µm after dilation)
        _square(6000, 2000, 2000),  # a second lesion with an excluded part
    ]
    exclude = [_square(6500, 2500, 1000, "_2")]
    lesions = froc.lesion_mask(polygons, exclude, (12000, 12000), mpp)
    assert lesions.cell == pytest.approx(32.0)
    assert lesions.n_components == 3 and lesions.n_lesions == 2 and len(lesions.itc) == 1
    first = lesions.labels[int(1800 / 32), int(1800 / 32)]
    assert first > 0 and lesions.labels[int(1800 / 32), int(3500 / 32)] == first  # merged
    assert lesions.labels[int(3000 / 32), int(7000 / 32)] > 0  # the exclusion hole is filled (binary_fill_holes)
    itc = lesions.labels[int(9020 / 32), int(9020 / 32)]
    assert itc in lesions.itc
    points = np.array(
        [
            [1800, 1800, 0.9],  # lesion 1
            [3500, 1800, 0.95],  # lesion 1 again (the merged part): its probability is the maximum
            [9020, 9020, 0.99],  # ITC: neither TP nor FP
            [500, 11000, 0.4],  # background: FP
        ]
    )
    m = froc.match(points, lesions)
    assert m["fp_probs"] == [0.4] and m["itc_hits"] == 1 and m["n_lesions"] == 2
    assert sorted(m["tp_probs"]) == [0.0, 0.0, 0.95]  # lesion 1 found, lesion 2 missed, the ITC kept as 0
    empty = froc.lesion_mask([], [], (12000, 12000), mpp)
    assert froc.match(points, empty)["fp_probs"] == [0.9, 0.95, 0.99, 0.4]


def test_major_axis_of_rectangles() -> None:
    labels = np.zeros((40, 60), np.int32)
    labels[5:15, 10:50] = 1  # 10 × 40
    labels[20:35, 5:8] = 2  # 15 × 3
    axes = froc.major_axis_lengths(labels, 2)
    np.testing.assert_allclose(axes, [4 * np.sqrt((40**2 - 1) / 12), 4 * np.sqrt((15**2 - 1) / 12)])


def test_fold_results_from_slide_records() -> None:
    recs = [
        {
            "image_id": f"s{i}",
            "slide": {"score": s, "label": y, "label_source": "annotation"},
            "lesions": {"tp_probs": [s] * y, "fp_probs": [], "n_lesions": y},
            "tiles": {"predicted": 5},
            "outputs": {"png": f"s{i}.png"},
        }
        for i, (s, y) in enumerate([(0.9, 1), (0.2, 0), (0.6, 1), (0.7, 0)])
    ]
    res = fold_results(recs, 0.5)
    assert res["slide"]["auc"] == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.7]))
    assert res["slide"]["specificity"] == 0.5 and res["froc"]["lesions"] == 2
    assert [s["image_id"] for s in res["slides"]] == ["s0", "s1", "s2", "s3"]

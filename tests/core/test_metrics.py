"""medflow.metrics equals scikit-learn on random predictions (binary, 5-class, absent classes)."""

from __future__ import annotations

import numpy as np
import pytest

from medflow.core import metrics

sk = pytest.importorskip("sklearn.metrics")


def _random_case(
    rng: np.random.Generator, n: int, n_classes: int, present: list[int] | None = None, ties: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(present if present is not None else range(n_classes))
    y_true = rng.choice(labels, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y_true] += 1.0  # better than chance, so metrics are not all ~0.5
    if ties:
        logits = np.round(logits)  # many tied scores exercise the AUC tie handling
    prob = np.exp(logits)
    return y_true, prob / prob.sum(axis=1, keepdims=True)


def _compare(y_true: np.ndarray, y_prob: np.ndarray, names: list[str], positive: str | None) -> dict:
    m = metrics.classification_metrics(y_true, y_prob, names, positive)
    y_pred = y_prob.argmax(axis=1)
    C = len(names)
    assert m["n"] == len(y_true)
    assert m["oacc"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro"))
    assert m["confusion"] == sk.confusion_matrix(y_true, y_pred, labels=list(range(C))).tolist()
    recalls = sk.recall_score(y_true, y_pred, labels=list(range(C)), average=None, zero_division=0)
    for c, name in enumerate(names):
        if (y_true == c).any():
            assert m["per_class_recall"][name] == pytest.approx(recalls[c])
        else:
            assert m["per_class_recall"][name] is None
    if positive is not None:
        p = names.index(positive)
        assert m["sensitivity"] == pytest.approx(sk.recall_score(y_true == p, y_pred == p))
        assert m["specificity"] == pytest.approx(sk.recall_score(y_true != p, y_pred != p))
    present = np.unique(y_true)
    if C == 2:
        assert m["auc"] == pytest.approx(sk.roc_auc_score(y_true, y_prob[:, 1]))
    elif len(present) == C:
        assert m["auc"] == pytest.approx(sk.roc_auc_score(y_true, y_prob, multi_class="ovr", average="macro"))
    else:
        # sklearn's ovr refuses absent classes; its ovr is the mean of binary AUCs over the labels.
        expected = np.mean([sk.roc_auc_score(y_true == c, y_prob[:, c]) for c in present])
        assert m["auc"] == pytest.approx(expected)
    return m


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_binary_equals_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    y_true, y_prob = _random_case(rng, 200, 2, ties=ties)
    m = _compare(y_true, y_prob, ["normal", "tumour"], "tumour")
    assert 0.5 < m["auc"] <= 1.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_five_classes_equals_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(100 + seed)
    y_true, y_prob = _random_case(rng, 300, 5, ties=ties)
    _compare(y_true, y_prob, ["a", "b", "tumour", "d", "e"], "tumour")


@pytest.mark.parametrize("seed", range(5))
def test_absent_classes_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    names = ["a", "b", "tumour", "d", "e"]
    y_true, y_prob = _random_case(rng, 150, 5, present=[0, 2, 3])
    m = _compare(y_true, y_prob, names, "tumour")
    assert m["per_class_recall"]["b"] is None and m["support"]["e"] == 0
    # The positive class absent from the labels: sensitivity undefined, specificity still defined.
    y_true2, y_prob2 = _random_case(rng, 150, 5, present=[0, 1])
    _compare(y_true2, y_prob2, names, None)
    m2 = metrics.classification_metrics(y_true2, y_prob2, names, "tumour")
    assert m2["sensitivity"] is None
    assert m2["specificity"] == pytest.approx(np.mean(y_prob2.argmax(axis=1) != 2))


def test_single_class_auc_undefined_and_unknown_positive() -> None:
    y_true = np.zeros(10, dtype=int)
    y_prob = np.tile([0.7, 0.3], (10, 1))
    m = metrics.classification_metrics(y_true, y_prob, ["normal", "tumour"], "tumour")
    assert m["auc"] is None and m["sensitivity"] is None and m["specificity"] == 1.0
    m = metrics.classification_metrics(y_true, y_prob, ["normal", "tumour"], "not-a-class")
    assert m["sensitivity"] is None and m["specificity"] is None and m["oacc"] == 1.0


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        metrics.classification_metrics(np.zeros(3, int), np.zeros((3, 3)), ["a", "b"], None)
    with pytest.raises(ValueError):
        metrics.classification_metrics(np.array([0, 2]), np.zeros((2, 2)), ["a", "b"], None)


def test_average_ranks_match_scipy() -> None:
    from scipy.stats import rankdata

    values = np.random.default_rng(0).integers(0, 5, size=50)
    np.testing.assert_allclose(metrics.average_ranks(values), rankdata(values))


def test_mean_std_sample_std_and_undefined_values() -> None:
    out = metrics.mean_std([0.8, 0.9, None, float("nan"), 1.0])
    assert out["n"] == 3
    assert out["mean"] == pytest.approx(0.9)
    assert out["std"] == pytest.approx(np.std([0.8, 0.9, 1.0], ddof=1))
    assert metrics.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert metrics.mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_aggregate_over_folds() -> None:
    rng = np.random.default_rng(7)
    folds = [
        metrics.classification_metrics(*_random_case(rng, 50, 2), ["normal", "tumour"], "tumour") for _ in range(3)
    ]
    agg = metrics.aggregate(folds)
    assert agg["n_folds"] == 3
    assert agg["oacc"]["mean"] == pytest.approx(np.mean([f["oacc"] for f in folds]))
    assert agg["per_class_recall"]["tumour"]["n"] == 3

"""Classification metrics in NumPy, equal to scikit-learn's on the same predictions.

scikit-learn is a dev dependency only (the tests compare against it); training jobs on cluster
nodes import just NumPy. ``classification_metrics`` is what every job record stores under
``metrics.{train,val,test}``; ``mean_std`` / ``aggregate`` summarise a metric over outer folds.

Undefined values are ``None`` (JSON null), never NaN or a silent 0: a recall of a class with no
true samples, a specificity with no negatives, an AUC with fewer than two classes present.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

SCALAR_KEYS = ("oacc", "balanced_accuracy", "sensitivity", "specificity", "macro_f1", "auc")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class (sklearn's convention)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _safe_div(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the mean of their ranks (scipy.stats.rankdata 'average')."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Start of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    run_id = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = run_rank[run_id]
    return ranks


def binary_auc(is_positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC via the Mann-Whitney U statistic (ties count 1/2, like sklearn's trapezoids)."""
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(np.asarray(score, dtype=np.float64))
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    """Binary AUC (score = column 1) for two columns; else macro one-vs-rest over classes present."""
    y_true = np.asarray(y_true, dtype=np.int64)
    n_classes = y_prob.shape[1]
    if n_classes == 2:
        return binary_auc(y_true == 1, y_prob[:, 1])
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    per_class = [binary_auc(y_true == c, y_prob[:, c]) for c in present]
    return float(np.mean([v for v in per_class if v is not None]))


def _check_inputs(y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(np.int64, copy=False).reshape(-1)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or y_prob.shape[0] != y_true.shape[0]:
        raise ValueError(f"y_prob must be (N, C) with N = {len(y_true)}, got {y_prob.shape}")
    if y_prob.shape[1] != len(class_names):
        raise ValueError(f"y_prob has {y_prob.shape[1]} columns for {len(class_names)} class names")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= len(class_names)):
        raise ValueError(f"labels outside 0..{len(class_names) - 1}")
    return y_true, y_prob


def classification_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str], positive_class: str | None = None
) -> dict[str, Any]:
    """All metrics a job record stores, from labels (N,) and class probabilities (N, C).

    Predictions are ``argmax(y_prob)``. ``sensitivity``/``specificity`` treat ``positive_class``
    against all other classes (None when it is not given, not a class, or undefined on this set).
    """
    class_names = list(class_names)
    y_true, y_prob = _check_inputs(y_true, y_prob, class_names)
    n_classes = len(class_names)
    n = int(len(y_true))
    y_pred = y_prob.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true count per class
    predicted = cm.sum(axis=0)  # predicted count per class

    recall = {name: _safe_div(tp[i], support[i]) for i, name in enumerate(class_names)}
    # sklearn's macro F1 averages over the labels present in y_true or y_pred.
    seen = (support + predicted) > 0
    f1 = 2 * tp[seen] / (2 * tp[seen] + (predicted - tp)[seen] + (support - tp)[seen])
    present_recalls = [r for r in recall.values() if r is not None]

    sensitivity = specificity = None
    if positive_class is not None and positive_class in class_names:
        p = class_names.index(positive_class)
        sensitivity = recall[positive_class]
        negatives = n - support[p]
        true_negatives = negatives - (predicted[p] - tp[p])
        specificity = _safe_div(true_negatives, negatives)

    return {
        "n": n,
        "oacc": _safe_div(tp.sum(), n),
        "balanced_accuracy": float(np.mean(present_recalls)) if present_recalls else None,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "per_class_recall": recall,
        "support": {name: int(support[i]) for i, name in enumerate(class_names)},
        "macro_f1": float(f1.mean()) if f1.size else None,
        "auc": roc_auc(y_true, y_prob) if n else None,
        "confusion": cm.tolist(),
        "class_names": class_names,
        "positive_class": positive_class,
    }


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof=1; 0.0 for one value) of the defined values; n counts them."""
    vals = _finite(values)
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(vals)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if n > 1 else 0.0, "n": n}


def aggregate(per_fold: Sequence[dict[str, Any]], keys: Sequence[str] = SCALAR_KEYS) -> dict[str, Any]:
    """mean ± std over folds of each scalar metric, and of each class's recall."""
    out: dict[str, Any] = {key: mean_std(m.get(key) for m in per_fold) for key in keys}
    names = per_fold[0].get("class_names", []) if per_fold else []
    out["per_class_recall"] = {
        name: mean_std(m.get("per_class_recall", {}).get(name) for m in per_fold) for name in names
    }
    out["n_folds"] = len(per_fold)
    return out

"""Slide-level results of one outer fold (`medflow slide-metrics`): slide AUC, sensitivity and
specificity at a threshold, and CAMELYON16 FROC, from the fold's `predict-wsi` slide records.

A slide's score aggregates its tiles' positive-class probabilities (``predict_wsi.aggregation``:
mean, max, or the mean of the ``top_k`` highest); its label comes from the manifest's ``label``
column or its annotation (`medflow.predict.wsi.slide_label`). AUC is the Mann-Whitney statistic of
`medflow.core.metrics.binary_auc` (= scikit-learn's ``roc_auc_score``); FROC is `medflow.predict.froc`,
computed only when the fold's slides have lesion annotations. Undefined values are null.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core import config as config_mod
from ..core import fsio
from ..core.errors import InputError
from ..core.metrics import binary_auc
from ..core.records import JobRecord
from . import froc


def slide_score(probabilities: np.ndarray, method: str, top_k: int = 1) -> float | None:
    """Aggregate tile probabilities into one slide score (None without tiles)."""
    p = np.asarray(probabilities, dtype=np.float64)
    p = p[np.isfinite(p)]
    if not p.size:
        return None
    if method == "mean":
        return float(p.mean())
    if method == "max":
        return float(p.max())
    if method == "topk":
        return float(np.sort(p)[::-1][:top_k].mean())
    raise ValueError(f"unknown slide aggregation {method!r}")


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def slide_metrics(scores: Sequence[float], labels: Sequence[int], threshold: float) -> dict[str, Any]:
    """n, positives, AUC, and sensitivity / specificity of ``score ≥ threshold`` (None when undefined)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pred = s >= threshold
    return {
        "n": int(len(s)),
        "positives": int(y.sum()),
        "auc": binary_auc(y, s) if len(s) else None,
        "sensitivity": _ratio(int((pred & y).sum()), int(y.sum())),
        "specificity": _ratio(int((~pred & ~y).sum()), int((~y).sum())),
        "threshold": threshold,
    }


def read_slide_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    recs = []
    for path in paths:
        rec = fsio.read_json_document(Path(path), "predict-wsi record")
        if rec.get("job") != "predict-wsi" or rec.get("status") != "ok":
            raise InputError(path, f"not a finished predict-wsi record (job {rec.get('job')!r})")
        if ((rec.get("slide") or {}).get("score")) is None:
            raise InputError(path, "slide record without a slide score")
        recs.append(rec)
    if not recs:
        raise InputError(None, "no slide records given")
    return recs


def fold_results(recs: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Slide metrics and FROC of a set of slide records, plus the per-slide rows behind them."""
    scores = [float(r["slide"]["score"]) for r in recs]
    labels = [int(r["slide"]["label"]) for r in recs]
    matched = [r["lesions"] for r in recs]
    return {
        "slide": slide_metrics(scores, labels, threshold),
        "froc": froc.froc(matched),
        "slides": [
            {
                "image_id": r["image_id"],
                "patient_id": r.get("patient_id"),
                "score": float(r["slide"]["score"]),
                "label": int(r["slide"]["label"]),
                "label_source": r["slide"].get("label_source"),
                "tiles": (r.get("tiles") or {}).get("predicted"),
                "lesions": r["lesions"]["n_lesions"],
                "detections": r.get("detections"),
                "heatmap": (r.get("outputs") or {}).get("png"),
                "model_sha256": r.get("model_sha256"),
            }
            for r in recs
        ],
        "lesion_matches": matched,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--study", help="study (recorded)")
    p.add_argument("--outer", type=int, help="outer fold (recorded)")
    p.add_argument("--records", nargs="+", required=True, help="predict-wsi slide records (<id>.record.json)")
    p.add_argument("--out", required=True, help="record to write (the fold's slide-level results)")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    recs = read_slide_records(args.records)
    pcfg = cfg["predict_wsi"]
    record = JobRecord(
        "slide-metrics",
        cfg,
        ("wsi", "predict_wsi"),
        study=args.study,
        outer=args.outer,
        aggregation=pcfg["aggregation"],
        top_k=pcfg["top_k"],
    )
    with record.timed("metrics"):
        record.update(fold_results(recs, pcfg["slide_threshold"]))
    record.finish("ok").save(args.out)
    sm, fr = record["slide"], record["froc"]
    print(
        f"slide-metrics {args.out}: {sm['n']} slides ({sm['positives']} positive), AUC {sm['auc']}, "
        f"sensitivity {sm['sensitivity']}, specificity {sm['specificity']}, FROC {fr['score'] if fr else None}"
    )
    return 0

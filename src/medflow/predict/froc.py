"""Lesion-level evaluation as CAMELYON16 defines it: lesions, detection matching, FROC.

Follows the challenge's evaluation code (Evaluation_FROC.py; MONAI's ``monai.metrics.froc`` is a
port of it) step by step, so scores compare with published ones:

- **Lesions**: the tumour annotation (tumour polygons minus exclusion polygons) rasterised at the
  challenge's evaluation resolution (level 5 of a 0.243 µm/px scan: 7.776 µm per cell), dilated by
  half of 75 µm ("5 tumour cells": distance to tumour < 37.5 µm), holes filled, 8-connected components.
- **Isolated tumour cells** (ITC): components whose major axis (4·√ of the largest eigenvalue of
  their pixel covariance, as ``skimage.measure.regionprops``) is < 275 µm. A detection on an ITC
  counts neither as a true nor as a false positive, and ITCs are not lesions to find.
- **Matching**: a detection (level-0 x, y) hits the component at (⌊y / cell⌋, ⌊x / cell⌋); label 0 → false
  positive; a lesion's probability is that of its highest-probability hit (0 if none). Every detection
  on a slide without tumour is a false positive.
- **FROC**: over the distinct probabilities of all false positives and lesions, false positives per
  slide and lesion sensitivity at "≥ threshold", plus the point (0, 0); the score is the mean of the
  sensitivities interpolated at 1/4, 1/2, 1, 2, 4 and 8 false positives per slide. One deliberate
  difference: the challenge's code drops the *lowest* distinct probability (meant to drop the 0 that
  stands for a missed lesion), medflow drops exactly 0. Both agree whenever a lesion is missed or an
  ITC exists (then the lowest value is 0); where every lesion is found, the challenge's code loses the
  operating point of the weakest detection — a detector finding every lesion without false positives
  would score 0 there, 1 here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ..extract.wsi.annotations import Polygon, rasterize

EVAL_CELL_UM = 0.243 * 32  # CAMELYON16: level 5 of the 0.243 µm/px scans
DILATION_UM = 75.0 / 2  # "75 µm, the size of 5 tumour cells": distance threshold 75 / (res · 2^level · 2)
ITC_UM = 275.0  # major axis below this: isolated tumour cells
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class LesionMask:
    """Labelled lesion components of one slide at ``cell`` level-0 px per pixel; ``itc`` labels ignored."""

    labels: np.ndarray  # (rows, cols) int32, 0 = no lesion
    cell: float
    itc: set[int] = field(default_factory=set)

    @property
    def n_components(self) -> int:
        return int(self.labels.max()) if self.labels.size else 0

    @property
    def n_lesions(self) -> int:
        return self.n_components - len(self.itc)


def major_axis_lengths(labels: np.ndarray, n: int) -> np.ndarray:
    """Per label 1..n: 4·√(largest eigenvalue of the (row, col) covariance), skimage's major_axis_length."""
    out = np.zeros(n, dtype=np.float64)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        rr, cc = np.nonzero(labels[sl] == i)
        coords = np.stack([rr, cc]).astype(np.float64)
        cov = np.cov(coords, bias=True) if coords.shape[1] > 1 else np.zeros((2, 2))
        out[i - 1] = 4.0 * math.sqrt(max(float(np.linalg.eigvalsh(cov)[-1]), 0.0))
    return out


def lesion_mask(
    tumour: Sequence[Polygon], exclude: Sequence[Polygon], dims: tuple[int, int], level0_mpp: float
) -> LesionMask:
    """The slide's evaluation mask from its tumour polygons (level-0 px) and ``level0_mpp``."""
    cell = EVAL_CELL_UM / level0_mpp
    shape = (int(math.ceil(dims[1] / cell)), int(math.ceil(dims[0] / cell)))
    mask = rasterize(list(tumour), shape, cell, exclude=list(exclude)) if tumour else np.zeros(shape, bool)
    if not mask.any():
        return LesionMask(np.zeros(shape, np.int32), cell)
    distance = ndimage.distance_transform_edt(~mask)
    filled = ndimage.binary_fill_holes(distance < DILATION_UM / EVAL_CELL_UM)
    labels, n = ndimage.label(filled, structure=np.ones((3, 3), dtype=bool))
    axes = major_axis_lengths(labels, n)
    itc = {i + 1 for i in np.flatnonzero(axes < ITC_UM / EVAL_CELL_UM).tolist()}
    return LesionMask(labels.astype(np.int32), cell, itc)


def match(points: np.ndarray, lesions: LesionMask) -> dict[str, Any]:
    """Detections (K, 3) (x, y, probability) against a slide's lesions: ``tp_probs`` (one per component,
    ITCs included as 0, as the challenge's code keeps them), ``fp_probs``, ``n_lesions``, ``itc_hits``."""
    tp = np.zeros(lesions.n_components, dtype=np.float64)
    if lesions.n_components == 0:
        return {"tp_probs": [], "fp_probs": points[:, 2].tolist(), "n_lesions": 0, "itc_hits": 0}
    rows = np.clip((points[:, 1] / lesions.cell).astype(np.int64), 0, lesions.labels.shape[0] - 1)
    cols = np.clip((points[:, 0] / lesions.cell).astype(np.int64), 0, lesions.labels.shape[1] - 1)
    hits = lesions.labels[rows, cols]
    fp: list[float] = []
    itc_hits = 0
    for label, prob in zip(hits.tolist(), points[:, 2].tolist()):
        if label == 0:
            fp.append(prob)
        elif label in lesions.itc:
            itc_hits += 1
        else:
            tp[label - 1] = max(tp[label - 1], prob)
    return {"tp_probs": tp.tolist(), "fp_probs": fp, "n_lesions": lesions.n_lesions, "itc_hits": itc_hits}


def froc_curve(slides: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(false positives per slide, sensitivity) over thresholds, from each slide's ``match`` result."""
    fps = np.array([p for s in slides for p in s["fp_probs"]], dtype=np.float64)
    tps = np.array([p for s in slides for p in s["tp_probs"]], dtype=np.float64)
    n_lesions = sum(int(s["n_lesions"]) for s in slides)
    thresholds = sorted((set(fps.tolist()) | set(tps.tolist())) - {0.0})
    total_fp = [int((fps >= t).sum()) for t in thresholds] + [0]
    total_tp = [int((tps >= t).sum()) for t in thresholds] + [0]
    return np.asarray(total_fp, dtype=np.float64) / len(slides), np.asarray(total_tp, dtype=np.float64) / n_lesions


def froc(slides: Sequence[dict[str, Any]], rates: Sequence[float] = FP_RATES) -> dict[str, Any] | None:
    """{score, sensitivities at ``rates``, slides, lesions}; None without slides or without any lesion."""
    if not slides or sum(int(s["n_lesions"]) for s in slides) == 0:
        return None
    fp_per_slide, sensitivity = froc_curve(slides)
    at = np.interp(rates, fp_per_slide[::-1], sensitivity[::-1])
    return {
        "score": float(np.mean(at)),
        "fp_rates": list(rates),
        "sensitivity": [float(v) for v in at],
        "slides": len(slides),
        "lesions": sum(int(s["n_lesions"]) for s in slides),
    }

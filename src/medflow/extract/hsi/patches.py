"""Labels and patches of a cube: ground-truth values → class ids, k×k×B windows around labelled pixels.

Windows are views of ``sliding_window_view`` (no copy); a centre near the border is served by a
NumPy 'reflect' padded copy of the cube, made only when needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ...core.errors import InputError


def map_labels(gt: np.ndarray, class_map: dict[str, int], n_classes: int, path: str | Path) -> np.ndarray:
    """Ground-truth values → class ids (int64, −1 = unlabelled).

    Default (empty ``class_map``): value v ↦ class v−1, 0 (and negatives) unlabelled. With a map, unmapped
    values are unlabelled and a value mapped to −1 is ignored explicitly.
    """
    if gt.size == 0:
        return np.full(gt.shape, -1, dtype=np.int64)
    lo, hi = int(gt.min()), int(gt.max())
    if hi - lo < 1 << 20:  # a lookup table over the value range (the usual case)
        index = gt - lo
        values = np.arange(lo, hi + 1)
        present = np.bincount(index.ravel(), minlength=len(values)) > 0
    else:  # a few huge/sparse values: table over the distinct ones
        values, inverse = np.unique(gt, return_inverse=True)
        index = inverse.reshape(gt.shape)
        present = np.ones(len(values), dtype=bool)
    if class_map:  # `values` is sorted in both cases: place the keys by bisection
        keys = np.array([int(key) for key in class_map], dtype=np.int64)
        ids = np.array([int(cls) for cls in class_map.values()], dtype=np.int64)
        pos = np.minimum(np.searchsorted(values, keys), len(values) - 1)
        hit = values[pos] == keys
        classes = np.full(len(values), -1, dtype=np.int64)
        classes[pos[hit]] = ids[hit]
    else:
        classes = np.where(values > 0, values - 1, -1).astype(np.int64)
    too_big = values[present & (classes >= n_classes)]
    if too_big.size:
        raise InputError(
            path,
            f"ground-truth value(s) {too_big.tolist()} map to class ids beyond the {n_classes} "
            f"class names (set hsi.class_map / hsi.class_names)",
        )
    return classes[index]


def pixel_windows(cube: np.ndarray, k: int, pad: bool) -> tuple[np.ndarray, int]:
    """Every k×k×B window of ``cube`` as a zero-copy (H', W', k, k, B) view, and the offset to add to a
    pixel's (row, col) to index its window: with ``pad`` the cube is first padded by k//2 (NumPy
    'reflect': …2 1 | 0 1 2 …) so every pixel has one (H' = H); without, only pixels ≥ k//2 from the
    border do (H' = H − k + 1, offset −k//2)."""
    half = k // 2
    if pad:
        source, offset = np.pad(cube, ((half, half), (half, half), (0, 0)), mode="reflect"), 0
    else:
        source, offset = cube, -half
    return sliding_window_view(source, (k, k, cube.shape[2]))[:, :, 0], offset


def extract_patches(cube: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """(N, k, k, B) windows of ``cube`` centred on (rows, cols), reflected at the border: one gather."""
    rows, cols = np.asarray(rows), np.asarray(cols)
    half = k // 2
    near_border = len(rows) and (
        rows.min() < half
        or cols.min() < half
        or rows.max() >= cube.shape[0] - half
        or cols.max() >= cube.shape[1] - half
    )
    windows, offset = pixel_windows(cube, k, pad=bool(near_border))  # pad (a cube copy) only when needed
    return windows[rows + offset, cols + offset]


def select_pixels(
    labels: np.ndarray, k: int, border: str, per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled pixel centres (rows, cols) in raster order; border=skip drops windows crossing the edge;
    per_class > 0 keeps a seeded random subsample of at most that many per class."""
    flat = np.flatnonzero(labels.ravel() >= 0)
    rows, cols = np.divmod(flat, labels.shape[1])
    if border == "skip":
        half = k // 2
        keep = (rows >= half) & (rows < labels.shape[0] - half) & (cols >= half) & (cols < labels.shape[1] - half)
        flat = flat[keep]
    if per_class > 0:
        cls = labels.ravel()[flat]
        picked = []
        for c in np.unique(cls):
            members = flat[cls == c]
            if len(members) > per_class:
                members = rng.choice(members, size=per_class, replace=False)
            picked.append(members)
        flat = np.sort(np.concatenate(picked)) if picked else flat[:0]
    return np.divmod(flat, labels.shape[1])

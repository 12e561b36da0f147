"""Epoch sample plans: which patches (and dihedral transforms) an epoch visits, and in what order.

Class balancing (weighted resampling or dihedral oversampling of minority classes), stratified
interleaving, and chunk-windowed shuffles that keep reads whole-chunk. Pure functions of the
labels and a seeded generator.
"""

from __future__ import annotations

import numpy as np

from .augment import N_DIHEDRAL


def epoch_samples(
    labels: np.ndarray, rng: np.random.Generator, augment: str, balance: str, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(patch positions, dihedral transform ids) of one epoch before ordering."""
    n = len(labels)
    if balance == "weighted":
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        w = 1.0 / counts[labels]
        idx = rng.choice(n, size=n, replace=True, p=w / w.sum())
        return idx, _random_transforms(rng, len(idx), augment)
    if balance == "dihedral":
        return _dihedral_oversample(labels, rng, augment, n_classes)
    if balance != "none":
        raise ValueError(f"unknown balance {balance!r}")
    idx = np.arange(n, dtype=np.int64)
    return idx, _random_transforms(rng, n, augment)


def _random_transforms(rng: np.random.Generator, n: int, augment: str) -> np.ndarray:
    if augment == "dihedral":
        return rng.integers(0, N_DIHEDRAL, size=n).astype(np.int8)
    if augment != "none":
        raise ValueError(f"unknown augment {augment!r}")
    return np.zeros(n, dtype=np.int8)


def _dihedral_oversample(
    labels: np.ndarray, rng: np.random.Generator, augment: str, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every class up to the majority count (at most 8× its own): the copies of one patch carry
    distinct dihedral transforms (the original keeps the identity unless augment is on)."""
    counts = np.bincount(labels, minlength=n_classes)
    target = int(counts.max()) if len(labels) else 0
    idx_parts, t_parts = [], []
    for c in np.flatnonzero(counts):
        members = rng.permutation(np.flatnonzero(labels == c))
        m = len(members)
        total = min(target, N_DIHEDRAL * m)
        copies = np.full(m, total // m, dtype=np.int64)
        copies[: total % m] += 1
        # One random ordering of the group per patch; its first `copies` entries are used.
        if augment == "dihedral":
            perms = np.argsort(rng.random((m, N_DIHEDRAL)), axis=1)
        else:
            rest = 1 + np.argsort(rng.random((m, N_DIHEDRAL - 1)), axis=1)
            perms = np.column_stack([np.zeros(m, dtype=np.int64), rest])
        use = np.arange(N_DIHEDRAL)[None, :] < copies[:, None]
        idx_parts.append(np.broadcast_to(members[:, None], perms.shape)[use])
        t_parts.append(perms[use].astype(np.int8))
    if not idx_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int8)
    return np.concatenate(idx_parts), np.concatenate(t_parts)


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation spreading every class evenly over the sequence (systematic interleave):
    any window of B consecutive items holds each class within ±1 of its proportional share."""
    key = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        key[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.lexsort((rng.random(len(labels)), key))


def chunk_order(chunks: np.ndarray, rng: np.random.Generator, window: int) -> np.ndarray:
    """Permutation grouping samples by chunk, chunks in random order, samples shuffled within
    windows of ``window`` consecutive chunks (a shuffle buffer that keeps reads whole-chunk)."""
    uniq, inverse = np.unique(chunks, return_inverse=True)
    rank_of_chunk = rng.permutation(len(uniq))[inverse]  # random position of each sample's chunk
    window_of = rank_of_chunk // max(window, 1)
    return np.lexsort((rng.random(len(chunks)), window_of))

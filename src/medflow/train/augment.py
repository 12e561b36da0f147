"""Dihedral (D4) augmentation of square patches: 4 rotations × optional mirror, per sample of a batch."""

from __future__ import annotations

import numpy as np

N_DIHEDRAL = 8


def dihedral(x: np.ndarray, t: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Transform ``t`` in 0..7 of the dihedral group D4 on ``axes``: rotate by 90°·(t mod 4),
    then mirror (flip the second axis) when t ≥ 4. t = 0 is the identity."""
    out = np.rot90(x, t % 4, axes=axes)
    if t >= 4:
        out = np.flip(out, axis=axes[1])
    return out


def dihedral_batch(x: np.ndarray, transforms: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Apply transform ``transforms[i]`` to sample ``x[i]`` of an (N,H,W,C) batch (H == W)."""
    if not np.any(transforms):
        return x
    out = np.empty_like(x) if out is None else out
    for t in np.unique(transforms):
        sel = np.flatnonzero(transforms == t)
        out[sel] = dihedral(x[sel], int(t), axes=(1, 2))
    return out

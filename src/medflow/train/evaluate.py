"""Prediction over a whole patch set, sharded across ranks and gathered, and the loss/accuracy of it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from . import models
from .dist import Dist
from .patchset import PatchSet


def rank_slice(n: int, rank: int, size: int) -> np.ndarray:
    """Contiguous, disjoint, covering positions of rank ``rank`` (no padding: no duplicates)."""
    return np.arange(n * rank // size, n * (rank + 1) // size, dtype=np.int64)


@torch.no_grad()
def predict_set(
    model: nn.Module,
    pset: PatchSet,
    d: Dist,
    batch_size: int,
    amp: bool = False,
    gather: bool = True,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(y_true, y_prob, load_s) of the whole set in set order: each rank predicts its slice and the
    slices are gathered to every rank. ``model`` is the unwrapped network (DDP's forward would wait
    for the other ranks, whose slices may have a different number of batches). ``transform``: applied
    to every batch of patches first (a load-time stain normaliser)."""
    net = models.unwrap(model).eval()
    idx = rank_slice(len(pset), d.rank, d.size) if gather else np.arange(len(pset))
    probs = np.zeros((0, len(pset.class_names)), dtype=np.float32)
    parts, load_s = [], 0.0
    t0 = time.perf_counter()
    for _, x in pset.iter_batches(batch_size, idx):
        if transform is not None:
            x = transform(x)
        load_s += time.perf_counter() - t0
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(d.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
            parts.append(models.predict_proba(net, xt).cpu().numpy())
        t0 = time.perf_counter()
    if parts:
        probs = np.concatenate(parts)
    if gather and d.size > 1:
        gathered = d.allgather_object((probs, load_s))
        probs = np.concatenate([g[0] for g in gathered])
        load_s = sum(g[1] for g in gathered) / d.size
    return pset.labels.copy(), probs, load_s


def nll(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    """Mean cross-entropy of predicted probabilities (the validation loss)."""
    if not len(y_true):
        return None
    p = np.clip(y_prob[np.arange(len(y_true)), y_true].astype(np.float64), 1e-12, 1.0)
    return float(-np.log(p).mean())


def accuracy(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    return float((y_prob.argmax(1) == y_true).mean()) if len(y_true) else None

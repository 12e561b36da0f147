"""Stain normalisation of uint8 RGB patches: Reinhard and Macenko, vectorised over batches (float32).

Both map each patch onto a **target** fitted once on reference pixels (`fit`, `median_target`;
the reference itself comes from `medflow fit-stain`, `medflow.extract.wsi.stain_reference`):

- **Reinhard** (Reinhard et al. 2001, as in PROCESS / Gertych et al. 2015): per patch, the mean and
  standard deviation of each CIE L*a*b* channel (`medflow.extract.wsi.colour`) over its tissue
  pixels are matched to the target's. Background pixels — BT.601 luma > ``background`` (PROCESS:
  215) — are left out of the statistics and returned unchanged; ``background: 255`` uses every
  pixel (torchstain, StainTools).
- **Macenko** (Macenko et al. 2009): optical density ``-ln((I+1)/Io)``; pixels with every channel's
  OD ≥ ``beta`` span the plane of the two largest eigenvectors of their covariance; the stain
  vectors are the directions at the ``alpha`` and ``100-alpha`` percentiles of the angle in that
  plane (the one with the larger red OD is haematoxylin); concentrations by least squares, scaled so
  that their ``percentile``-th percentile equals the target's, and recomposed with the target's
  stain vectors.

Patches with under 1 % usable pixels (Reinhard: tissue; Macenko: OD ≥ beta in every channel) are
returned unchanged and counted in ``passed_through``.

API for other modules (training loader, prediction)::

    norm = from_record(record, source)   # the dict a stain reference, shard or model file records
    out = norm.apply(batch)              # (N, H, W, 3) uint8 → (N, H, W, 3) uint8
"""

from __future__ import annotations

import copy
import hashlib
import json
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ...core.config import canonical_json
from ...core.errors import InputError
from .colour import lab_to_rgb, luma, od_to_rgb, optical_density, rgb_to_lab, to_uint8

METHODS = ("reinhard", "macenko")
DEFAULT_PARAMS: dict[str, dict[str, float]] = {
    "reinhard": {"background": 215.0},
    "macenko": {"io": 240.0, "alpha": 1.0, "beta": 0.15, "percentile": 99.0},
}
MIN_USABLE_FRACTION = 0.01  # a patch with fewer usable pixels passes through unchanged
MIN_REFERENCE_PIXELS = 1000  # a reference needs at least this many usable pixels (and 1 %)
MIN_STD = 0.1  # L*a*b* units; a flatter channel is shifted, not stretched
MIN_STAIN_ANGLE_DEG = 1.0  # stain vectors closer than this are one stain: no separation
CHUNK = 4  # patches per vectorised step: temporaries stay cache-sized (measured: 4 beats 16 by ~1.3×)


class DegenerateReference(ValueError):
    """Pixels that cannot define a stain target (blank, flat, or a single stain)."""


# ---- statistics (planar arrays: channels first, (3, n, P) for n patches of P pixels) ------------------
def _weighted_mean_std(values: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch mean and population std (both (n, 3), float64) of planar (3, n, P) values over the
    0/1 ``weights`` (n, P) (None: every pixel), and the counts (n,)."""
    n_pix = values.shape[2]
    # float32 sums along the contiguous pixel axis are pairwise: relative error ~1e-7·log2(P)
    counts = np.full(values.shape[1], float(n_pix)) if weights is None else weights.sum(axis=1).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    weighted = values if weights is None else values * weights
    mean = weighted.sum(axis=2).astype(np.float64) / safe  # (3, n)
    centred = values - mean[:, :, None].astype(np.float32)
    centred *= centred
    if weights is not None:
        centred *= weights
    var = centred.sum(axis=2).astype(np.float64) / safe
    return mean.T, np.sqrt(var).T, counts


def _tissue_weights(rgb: np.ndarray, background: float) -> np.ndarray | None:
    """1 for tissue pixels (luma ≤ background), 0 for background, (n, P) float32, of planar uint8
    (3, n, P); None when every pixel counts (background ≥ 255)."""
    if background >= 255:
        return None
    return (luma(rgb) <= np.float32(background)).astype(np.float32)


def percentiles(values: np.ndarray, qs: list[float]) -> np.ndarray:
    """``np.percentile(values, qs)`` (linear interpolation) of a 1-D array, float64, fast for tails.

    Only the order statistics around each q are needed: candidates are cut from the array with
    bounds taken from a strided subsample (wide margins), their count proves the wanted ranks lie
    among them, and only they are partitioned; otherwise the whole array is."""
    n = len(values)
    pos = (n - 1) * np.asarray(qs, dtype=np.float64) / 100.0
    below = np.floor(pos).astype(np.int64)
    ranks = sorted({int(r) for r in below} | {int(min(r + 1, n - 1)) for r in below})
    order = _order_statistics(values, ranks)
    lo = np.array([order[int(r)] for r in below])
    hi = np.array([order[int(min(r + 1, n - 1))] for r in below])
    return lo + (hi - lo) * (pos - below)


def _order_statistics(values: np.ndarray, ranks: list[int]) -> dict[int, float]:
    n = len(values)
    out: dict[int, float] = {}
    if n < 8192:
        part = np.partition(values, ranks)
        return {r: float(part[r]) for r in ranks}
    sub = np.sort(values[:: max(1, n // 2048)])
    low = [r for r in ranks if r < n // 2]
    high = [r for r in ranks if r >= n // 2]
    if low:  # the smallest values: all of them below a bound, so their ranks are unchanged
        bound = sub[min(len(sub) - 1, int((max(low) / n + 0.03) * len(sub)))]
        cut = values[values <= bound]
        if len(cut) > max(low):
            part = np.partition(cut, low)
            out.update({r: float(part[r]) for r in low})
    if high:  # the largest values: ranks shift by the number of values left out below the bound
        bound = sub[max(0, int((min(high) / n - 0.03) * len(sub)))]
        cut = values[values >= bound]
        skipped = n - len(cut)
        if skipped <= min(high):
            part = np.partition(cut, [r - skipped for r in high])
            out.update({r: float(part[r - skipped]) for r in high})
    missing = [r for r in ranks if r not in out]
    if missing:  # the subsample misled the bounds: partition everything
        part = np.partition(values, missing)
        out.update({r: float(part[r]) for r in missing})
    return out


def _percentiles_of_valid(values: np.ndarray, valid: np.ndarray, qs: list[float]) -> np.ndarray:
    """(n, len(qs)) percentiles (NumPy's linear interpolation) of each row's valid values."""
    out = np.full((len(values), len(qs)), np.nan)
    for i in range(len(values)):
        row = values[i][valid[i]]
        if len(row):
            out[i] = percentiles(row, qs)
    return out


def _stain_vectors(od: np.ndarray, valid: np.ndarray, alpha: float) -> np.ndarray:
    """Macenko stain vectors (n, 3, 2) float64 [haematoxylin, eosin] of planar OD (3, n, P) over ``valid`` (n, P)."""
    w = valid.astype(np.float32)
    counts = w.sum(axis=1).astype(np.float64)
    sums = np.matmul(od.transpose(1, 0, 2), w[:, :, None])[:, :, 0].T  # (3, n), one product per patch
    mean = sums.astype(np.float64) / np.maximum(counts, 1.0)
    centred = od - mean[:, :, None].astype(np.float32)
    centred *= w
    # The 6 distinct products per patch as row dot products: 3× faster than a BLAS product of a 3×P matrix.
    cov = np.empty((od.shape[1], 3, 3))
    for i in range(3):
        for j in range(i, 3):
            cov[:, i, j] = cov[:, j, i] = np.einsum("np,np->n", centred[i], centred[j])
    cov /= np.maximum(counts - 1, 1)[:, None, None]
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, :, 1:3].copy()  # (mid, largest) eigenvectors, as torchstain / Macenko's code
    # Orient the largest one along the (positive) mean OD so the angles stay inside (0, π), never wrapping.
    sign = np.where(plane[:, :, 1].sum(axis=1) < 0, -1.0, 1.0)
    plane[:, :, 1] *= sign[:, None]
    proj = np.einsum("nck,cnp->nkp", plane.astype(np.float32), od)  # (n, 2, P)
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo_hi = _percentiles_of_valid(phi, valid, [alpha, 100.0 - alpha])
    lo = np.matmul(plane, np.stack([np.cos(lo_hi[:, 0]), np.sin(lo_hi[:, 0])], axis=1)[:, :, None])[:, :, 0]
    hi = np.matmul(plane, np.stack([np.cos(lo_hi[:, 1]), np.sin(lo_hi[:, 1])], axis=1)[:, :, None])[:, :, 0]
    lo_first = (lo[:, 0] > hi[:, 0])[:, None, None]  # haematoxylin absorbs red more than eosin
    return np.where(lo_first, np.stack([lo, hi], axis=2), np.stack([hi, lo], axis=2))


def _stained(od: np.ndarray, beta: float) -> np.ndarray:
    """(n, P) pixels whose OD is ≥ beta in every channel (torchstain: not any(OD < beta))."""
    b = np.float32(beta)
    return (od[0] >= b) & (od[1] >= b) & (od[2] >= b)


def _separable(stains: np.ndarray) -> np.ndarray:
    """(n,) True where both stain vectors are finite and at least MIN_STAIN_ANGLE_DEG apart."""
    cos = np.abs(np.einsum("nc,nc->n", stains[:, :, 0], stains[:, :, 1]))
    return np.isfinite(stains).all(axis=(1, 2)) & (cos < np.cos(np.deg2rad(MIN_STAIN_ANGLE_DEG)))


def _concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations (n, 2, P) of planar OD (3, n, P) for stain vectors (n, 3, 2)."""
    finite = np.where(np.isfinite(stains), stains, 0.0)
    return np.einsum("nkc,cnp->nkp", np.linalg.pinv(finite).astype(np.float32), od)


# ---- fitting --------------------------------------------------------------------------------------
def method_params(method: str, params: dict | None = None) -> dict[str, float]:
    """The method's parameters: defaults overlaid with ``params`` (only the method's own keys)."""
    if method not in METHODS:
        raise ValueError(f"unknown stain method {method!r}; choose one of {', '.join(METHODS)}")
    given = params or {}
    return {k: float(given.get(k, v)) for k, v in DEFAULT_PARAMS[method].items()}


def _min_usable(n_pixels: int) -> int:
    return max(MIN_REFERENCE_PIXELS, int(np.ceil(MIN_USABLE_FRACTION * n_pixels)))


def fit(method: str, params: dict, pixels: np.ndarray) -> dict[str, Any]:
    """The target of (P, 3) uint8 reference pixels, computed as a patch's own statistics are.
    Raises DegenerateReference for pixels that cannot define one."""
    planar = np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8).reshape(-1, 3).T)[:, None, :]  # (3, 1, P)
    n = planar.shape[2]
    p = method_params(method, params)
    if method == "reinhard":
        w = _tissue_weights(planar, p["background"])
        usable = n if w is None else int(w.sum())
        if usable < _min_usable(n):
            raise DegenerateReference(
                f"only {usable} of {n} pixels are tissue (luma ≤ {p['background']:g}); need {_min_usable(n)}"
            )
        mean, std, _ = _weighted_mean_std(rgb_to_lab(planar), w)
        if (std < MIN_STD).any():
            raise DegenerateReference(f"flat colour (L*a*b* std {np.round(std[0], 3).tolist()})")
        return {"mean": mean[0].tolist(), "std": std[0].tolist()}
    od = optical_density(planar, p["io"])
    valid = _stained(od, p["beta"])
    if valid.sum() < _min_usable(n):
        raise DegenerateReference(
            f"only {int(valid.sum())} of {n} pixels are stained (OD ≥ {p['beta']:g} in every channel); "
            f"need {_min_usable(n)}"
        )
    stains = _stain_vectors(od, valid, p["alpha"])
    if not _separable(stains)[0]:
        raise DegenerateReference("the stained pixels show a single stain direction; no H/E separation")
    max_c = np.array([percentiles(row, [p["percentile"]])[0] for row in _concentrations(od, stains)[0]])
    if not (np.isfinite(max_c).all() and (max_c > 0).all()):
        raise DegenerateReference(f"stain concentrations have no positive {p['percentile']:g}th percentile")
    return {"stain_matrix": stains[0].tolist(), "max_concentrations": max_c.tolist()}


def median_target(method: str, targets: list[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise median of per-slide targets (Macenko's stain vectors re-normalised to unit length)."""
    if not targets:
        raise ValueError("no targets to take the median of")
    if method == "reinhard":
        return {key: np.median([t[key] for t in targets], axis=0).tolist() for key in ("mean", "std")}
    stains = np.median([t["stain_matrix"] for t in targets], axis=0)
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    max_c = np.median([t["max_concentrations"] for t in targets], axis=0)
    return {"stain_matrix": stains.tolist(), "max_concentrations": max_c.tolist()}


# ---- normalisers ------------------------------------------------------------------------------------
def digest_of(method: str, params: dict, target: dict) -> str:
    """What identifies a normaliser: sha256 of its method, parameters and target (16 hex digits)."""
    plain = json.loads(canonical_json({"method": method, "params": params, "target": target}))
    return hashlib.sha256(canonical_json(plain).encode()).hexdigest()[:16]


class StainNormaliser(ABC):
    """Maps uint8 RGB patches onto a fitted target. Build with `make` or `from_record`."""

    method: str

    def __init__(self, params: dict, target: dict):
        self.params = method_params(self.method, params)
        self.target = json.loads(canonical_json(target))  # plain floats, as recorded
        self.digest = digest_of(self.method, self.params, self.target)
        self.passed_through = 0  # patches returned unchanged (too few usable pixels)

    def record(self, **extra: Any) -> dict[str, Any]:
        """The plain dict that rebuilds this normaliser (`from_record`), plus ``extra`` fields."""
        return {
            "method": self.method,
            "params": dict(self.params),
            "target": copy.deepcopy(self.target),
            "digest": self.digest,
            **extra,
        }

    def apply(self, batch: np.ndarray, out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
        """(N, H, W, 3) uint8 → normalised (N, H, W, 3) uint8 (into ``out`` when given). ``threads`` > 1
        normalises chunks of the batch in parallel (NumPy releases the GIL in its loops)."""
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"stain normalisation needs (N, H, W, 3) uint8 patches, got {batch.shape} {batch.dtype}")
        out = np.empty_like(batch) if out is None else out
        n = len(batch)
        flat_in = batch.reshape(n, -1, 3)
        flat_out = out.reshape(n, -1, 3)

        def chunk(lo: int) -> int:
            x = flat_in[lo : lo + CHUNK]
            y, ok = self._apply_chunk(x)
            if not ok.all():
                y[~ok] = x[~ok]
            flat_out[lo : lo + CHUNK] = y
            return int((~ok).sum())

        starts = range(0, n, CHUNK)
        if threads > 1 and len(starts) > 1:
            with ThreadPoolExecutor(min(threads, len(starts)), thread_name_prefix="stain") as pool:
                self.passed_through += sum(pool.map(chunk, starts))
        else:
            self.passed_through += sum(chunk(lo) for lo in starts)
        return out

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.apply(batch)

    @abstractmethod
    def _apply_chunk(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, P, 3) uint8 → (normalised (n, P, 3) uint8, (n,) usable)."""


def _planar(x: np.ndarray) -> np.ndarray:
    """(n, P, 3) interleaved → contiguous planar (3, n, P): every later pass runs over contiguous planes."""
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class ReinhardNormaliser(StainNormaliser):
    method = "reinhard"

    def _apply_chunk(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        planar = _planar(x)
        w = _tissue_weights(planar, self.params["background"])
        lab = rgb_to_lab(planar)
        mean, std, counts = _weighted_mean_std(lab, w)
        scale = np.asarray(self.target["std"]) / np.maximum(std, MIN_STD)  # (n, 3)
        shift = np.asarray(self.target["mean"]) - mean * scale
        lab *= scale.T[:, :, None].astype(np.float32)
        lab += shift.T[:, :, None].astype(np.float32)
        y = to_uint8(lab_to_rgb(lab)).transpose(1, 2, 0)
        if w is not None:
            np.copyto(y, x, where=(w == 0)[:, :, None])  # background stays as it was (PROCESS)
        return y, counts >= MIN_USABLE_FRACTION * x.shape[1]


class MacenkoNormaliser(StainNormaliser):
    method = "macenko"

    def _apply_chunk(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        od = optical_density(_planar(x), p["io"])  # (3, n, P)
        valid = _stained(od, p["beta"])
        ok = valid.sum(axis=1) >= max(3, MIN_USABLE_FRACTION * x.shape[1])
        if not ok.any():
            return x.copy(), ok
        stains = _stain_vectors(od, valid & ok[:, None], p["alpha"])
        ok &= _separable(stains)
        conc = _concentrations(od, stains)
        max_c = np.array([[percentiles(row, [p["percentile"]])[0] for row in patch] for patch in conc])
        ok &= np.isfinite(max_c).all(axis=1) & (max_c > 0).all(axis=1)
        factor = np.asarray(self.target["max_concentrations"]) / np.where(max_c > 0, max_c, 1.0)
        conc *= factor[:, :, None].astype(np.float32)
        od_out = np.einsum("ck,nkp->ncp", np.asarray(self.target["stain_matrix"], dtype=np.float32), conc)
        return od_to_rgb(od_out, p["io"]).transpose(0, 2, 1), ok


_CLASSES: dict[str, type[StainNormaliser]] = {"reinhard": ReinhardNormaliser, "macenko": MacenkoNormaliser}


def make(method: str, params: dict, target: dict) -> StainNormaliser:
    return _CLASSES[method](params, target)


def _check_target(method: str, target: Any) -> None:
    shapes: dict[str, dict[str, tuple[int, ...]]] = {
        "reinhard": {"mean": (3,), "std": (3,)},
        "macenko": {"stain_matrix": (3, 2), "max_concentrations": (2,)},
    }
    if not isinstance(target, dict) or set(target) != set(shapes[method]):
        raise ValueError(f"target must have exactly the keys {sorted(shapes[method])}")
    for key, shape in shapes[method].items():
        arr = np.asarray(target[key], dtype=np.float64)
        if arr.shape != shape or not np.isfinite(arr).all():
            raise ValueError(f"target {key} must be {shape} finite numbers")
    if method == "reinhard" and (np.asarray(target["std"]) <= 0).any():
        raise ValueError("target std must be positive")
    if method == "macenko" and (np.asarray(target["max_concentrations"]) <= 0).any():
        raise ValueError("target max_concentrations must be positive")


def from_record(record: Any, source: str | Path | None) -> StainNormaliser:
    """Rebuild a normaliser from its recorded dict (stain reference, shard attrs, model file); the
    digest must match the content. InputError naming ``source`` otherwise."""
    try:
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        method = record.get("method")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        _check_target(method, record.get("target"))
        norm = make(method, record.get("params") or {}, record["target"])
    except (ValueError, TypeError) as exc:
        raise InputError(source, f"not a valid stain normaliser record ({exc})") from None
    if record.get("digest") != norm.digest:
        raise InputError(
            source, f"stain normaliser digest {record.get('digest')!r} does not match its content ({norm.digest})"
        )
    return norm

"""Stain (HED) jitter of uint8 RGB training batches (Tellez et al. 2018, "HED-light/strong" in 2019).

Per patch, colour deconvolution with Ruifrok & Johnston's vectors (scikit-image's ``rgb2hed`` without
its clipping at 0, `medflow.extract.wsi.colour`) gives haematoxylin, eosin and DAB amounts s; each is scaled and shifted,
``s' = α·s + β`` with α ~ U(1-scale, 1+scale) and β ~ U(-bias, bias) per patch and stain, and the
patch is recomposed (``hed2rgb``) and rounded to uint8. The draws are made per epoch by the loader
from its seed (stream ``…/epoch/<e>/hed``), so a resumed job sees the same jitter.
"""

from __future__ import annotations

import numpy as np

from ..extract.wsi.colour import hed_to_rgb, rgb_to_hed, to_uint8

CHUNK = 4  # patches per vectorised step: temporaries stay cache-sized, as in medflow.extract.wsi.stain


def draw(rng: np.random.Generator, n: int, scale: float, bias: float) -> np.ndarray:
    """(n, 6) float32 jitter of n patches: α for H, E, DAB then β for H, E, DAB."""
    alpha = rng.uniform(1.0 - scale, 1.0 + scale, size=(n, 3))
    beta = rng.uniform(-bias, bias, size=(n, 3))
    return np.concatenate([alpha, beta], axis=1).astype(np.float32)


def hed_jitter(batch: np.ndarray, params: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 → jittered uint8 (into ``out`` when given), patch i with ``params[i]`` (`draw`)."""
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"HED jitter needs (N, H, W, 3) uint8 patches, got {batch.shape} {batch.dtype}")
    if len(params) != len(batch):
        raise ValueError(f"{len(params)} jitter draws for {len(batch)} patches")
    out = np.empty_like(batch) if out is None else out
    n = len(batch)
    flat_in, flat_out = batch.reshape(n, -1, 3), out.reshape(n, -1, 3)
    for lo in range(0, n, CHUNK):
        planar = np.ascontiguousarray(flat_in[lo : lo + CHUNK].transpose(2, 0, 1))  # (3, k, P)
        p = np.asarray(params[lo : lo + CHUNK], dtype=np.float32)
        hed = rgb_to_hed(planar)
        hed *= p[:, :3].T[:, :, None]
        hed += p[:, 3:].T[:, :, None]
        flat_out[lo : lo + CHUNK] = to_uint8(hed_to_rgb(hed)).transpose(1, 2, 0)
    return out

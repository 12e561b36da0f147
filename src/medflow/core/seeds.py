"""The one seed recipe: every random stream of medflow is named by the config seed and a key path.

A stream ``(seed, k1, k2, ...)`` is written ``"<seed>/k1/k2/..."``; its 64-bit seed is the first
8 bytes (little-endian) of the SHA-256 of that text. Keys are str or int and must not contain "/",
so two different key paths can never name the same stream. Streams are independent of the order in
which they are created, so a job's random choices do not depend on what other jobs ran.

Key paths in use (docs/architecture.md lists them with their consumers):
``wsi/<image_id>`` (demo slide content and WSI patch sampling), ``slides/<patient>`` (demo slide
count), ``hsi/<image_id>`` (demo HSI content), ``hsi-patches/<image_id>`` (HSI subsampling),
``<study>/outer``, ``<study>/inner/<i>`` (fold plans), ``<study>/<outer>/<inner|refit>/<purpose>``
(training: init, loader, train-set, val-set), ``<study>/<outer>/test-set`` (select),
``bench/...`` (benchmark inputs and worker batches).
"""

from __future__ import annotations

import hashlib

import numpy as np


def stream_seed(seed: int, *keys: str | int) -> int:
    """The 64-bit seed of stream ``seed/keys...`` (accepted by NumPy and ``torch.manual_seed``)."""
    parts = [str(int(seed))]
    for key in keys:
        text = str(key)
        if "/" in text:
            raise ValueError(f"seed key {text!r} contains '/', the key separator")
        parts.append(text)
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """NumPy generator of stream ``seed/keys...``."""
    return np.random.default_rng(stream_seed(seed, *keys))

"""Batched inference over a slide's tiles: the model check, the one place a batch is prepared, and
reading in a background thread while the model classifies the previous batch.

`RegionReader` (through `PatchSource`: in this process or in reader processes) decodes tiles in
row-major order, the white/black quality check drops what extraction would reject, and batches of
``predict_wsi.batch_size`` tiles go through the model (GPU when the device is one). Used by
`medflow.predict.wsi`; the timings say how long the model waited for tiles.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import InputError
from ..extract.wsi.quality import quality_ok
from ..extract.wsi.reading import PatchSource
from ..extract.wsi.stain import StainNormaliser
from ..train.models import predict_proba


# ---- the model and the batch ----------------------------------------------------------------------------
def check_model(meta: dict, model_path: str | Path, cfg: dict) -> float:
    """The model's µm/px; InputError naming the model file and the key when it does not fit the cohort."""
    wsi_cfg = cfg["wsi"]
    if meta.get("kind") not in (None, "wsi"):
        raise InputError(model_path, f"model kind is {meta.get('kind')!r}, not a WSI model")
    if meta.get("in_channels") != 3:
        raise InputError(model_path, f"model expects {meta.get('in_channels')} channels; slides are RGB (3)")
    classes = list(wsi_cfg["labels"]["classes"])
    if meta.get("class_names") is not None and list(meta["class_names"]) != classes:
        raise InputError(model_path, f"model classes {meta['class_names']} differ from wsi.labels.classes {classes}")
    if meta.get("patch_size") != wsi_cfg["patch_size"]:
        raise InputError(
            model_path,
            f"model input is {meta.get('patch_size')}×{meta.get('patch_size')} px patches; "
            f"wsi.patch_size is {wsi_cfg['patch_size']}",
        )
    mpp = float(meta.get("mpp") or wsi_cfg["mpp"])
    if meta.get("mpp") and abs(mpp / wsi_cfg["mpp"] - 1) > wsi_cfg["mpp_tolerance"]:
        raise InputError(model_path, f"model was trained at {mpp} µm/px; wsi.mpp is {wsi_cfg['mpp']}")
    return mpp


def prepare_batch(patches: np.ndarray, normaliser: StainNormaliser | None, device: torch.device) -> torch.Tensor:
    """THE one place where raw tiles (NHWC uint8 RGB, exactly as extraction reads them) become model
    input: the stain normaliser the model was trained with (`medflow.train.stain_setup.for_slide_pixels`,
    whether it was applied at extraction or at load) runs here, on the CPU, before the transfer."""
    if normaliser is not None:
        patches = normaliser.apply(patches)
    x = torch.from_numpy(np.ascontiguousarray(patches))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x


# ---- reading and inference --------------------------------------------------------------------------------
def _prefetch(source: PatchSource, coords: np.ndarray, quality_cfg: dict, stats: dict) -> Iterator[tuple]:
    """(patches, quality ok) batches of ``coords`` read in a background thread, ≤ 2 batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            t0 = time.perf_counter()
            for _, patches in source.batches(coords):
                ok = quality_ok(patches, quality_cfg)
                stats["read"] += time.perf_counter() - t0
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        q.put((patches, ok), timeout=0.1)
                        break
                if stop.is_set():
                    return
                t0 = time.perf_counter()
            q.put(None)
        except BaseException as exc:  # re-raised in the consuming thread
            q.put(exc)

    thread = threading.Thread(target=produce, name="tile-reader", daemon=True)
    thread.start()
    try:
        while True:
            t0 = time.perf_counter()
            item = q.get()
            stats["wait"] += time.perf_counter() - t0
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def infer_tiles(
    model: Any,
    normaliser: StainNormaliser | None,
    source: PatchSource,
    coords: np.ndarray,
    quality_cfg: dict,
    batch_size: int,
    device: torch.device,
    n_classes: int,
    on_done: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(probabilities (n, C) float32 with NaN rows for quality rejects, quality ok (n,), timings).
    ``on_done(n)`` is told the tiles each batch read completes (progress)."""
    probs = np.full((len(coords), n_classes), np.nan, dtype=np.float32)
    ok_all = np.zeros(len(coords), dtype=bool)
    stats = {"read": 0.0, "wait": 0.0, "predict": 0.0}
    pending: list[np.ndarray] = []
    pending_rows: list[np.ndarray] = []
    offset = 0

    def flush() -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        x = prepare_batch(np.concatenate(pending), normaliser, device)
        p = predict_proba(model, x).cpu().numpy()
        probs[np.concatenate(pending_rows)] = p
        pending.clear()
        pending_rows.clear()
        stats["predict"] += time.perf_counter() - t0

    for patches, ok in _prefetch(source, coords, quality_cfg, stats):
        rows = np.arange(offset, offset + len(patches))
        offset += len(patches)
        ok_all[rows] = ok
        if ok.any():
            pending.append(patches[ok])
            pending_rows.append(rows[ok])
        if sum(len(p) for p in pending) >= batch_size:
            flush()
        if on_done is not None:
            on_done(len(patches))
    flush()
    return probs, ok_all, stats

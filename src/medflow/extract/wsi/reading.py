"""Reading patches at OpenSlide's decode rate: optional forked reader processes decoding into shared
memory, a background thread appending to the shard, and the quota-filling loop with quality rejects."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import mmap
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import InputError
from ...core.shards import ShardWriter
from .quality import quality_ok
from .sampling import Candidates
from .slide import ReadPlan, RegionReader

READ_BATCH = 64  # patches per read batch handed to the writer


_WORKER: dict[str, Any] = {}


def _worker_init(path: str, plan: ReadPlan, cache_bytes: int | None, slots: np.ndarray) -> None:
    import openslide

    slide = openslide.OpenSlide(path)
    if cache_bytes is not None:
        slide.set_cache(openslide.OpenSlideCache(cache_bytes))
    _WORKER["reader"] = RegionReader(slide, plan, path)
    _WORKER["slots"] = slots


def _worker_read(slot: int, coords: np.ndarray) -> tuple[int, str | None]:
    """Decode ``coords`` into shared slot ``slot``; only the slot number and any problem travel back."""
    try:
        _WORKER["reader"].read(coords, out=_WORKER["slots"][slot, : len(coords)])
        return slot, None
    except InputError as exc:  # InputError does not pickle (two-argument constructor)
        return slot, exc.problem


class PatchSource:
    """Reads coordinate batches in this process, or in ``workers`` forked processes (each with its own
    OpenSlide handle) that decode straight into slots of an anonymous shared mapping (no pickling of
    pixels); at most 2 batches per worker are in flight and batches come back in order."""

    def __init__(self, path: str | Path, slide: Any, plan: ReadPlan, workers: int, cache_bytes: int | None = None):
        self.path, self.plan, self.workers = str(path), plan, workers
        self.reader = RegionReader(slide, plan, path)
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        if workers > 1:
            n_slots, p = 2 * workers, plan.patch_size
            # MAP_SHARED|MAP_ANONYMOUS, created before the fork: children write, the parent sees it.
            self._mmap = mmap.mmap(-1, n_slots * READ_BATCH * p * p * 3)
            self.slots = np.frombuffer(self._mmap, dtype=np.uint8).reshape(n_slots, READ_BATCH, p, p, 3)
            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_worker_init,
                initargs=(self.path, plan, cache_bytes, self.slots),
            )

    def batches(self, coords: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        chunks = [coords[i : i + READ_BATCH] for i in range(0, len(coords), READ_BATCH)]
        if self.pool is None:
            for chunk in chunks:
                yield chunk, self.reader.read(chunk)
            return
        in_flight: collections.deque = collections.deque()
        todo = iter(chunks)
        for slot, chunk in enumerate(itertools.islice(todo, len(self.slots))):
            in_flight.append((chunk, self.pool.submit(_worker_read, slot, chunk)))
        while in_flight:
            chunk, future = in_flight.popleft()
            try:
                slot, problem = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                raise InputError(self.path, "a reader process died (crash in the slide decoder?)") from None
            if problem is not None:
                raise InputError(self.path, problem)
            patches = self.slots[slot, : len(chunk)].copy()  # the writer thread keeps it; the slot is reused
            if (nxt := next(todo, None)) is not None:
                in_flight.append((nxt, self.pool.submit(_worker_read, slot, nxt)))
            yield chunk, patches

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            del self.slots
            with contextlib.suppress(BufferError):  # a view may still be referenced: freed with it
                self._mmap.close()


class BackgroundWriter:
    """Appends batches to a ShardWriter from a thread, so HDF5 writes overlap the next decode; an
    optional ``transform`` of each batch's patches (stain normalisation) runs in that thread too."""

    def __init__(self, writer: ShardWriter, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        self.writer = writer
        self.transform = transform
        self.seconds = 0.0
        self.transform_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="shard-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                patches, coords, labels = item
                if self.transform is not None:
                    t0 = time.perf_counter()
                    patches = self.transform(patches)
                    self.transform_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.writer.append(patches, coords, labels)
                self.seconds += time.perf_counter() - t0
            except BaseException as exc:  # re-raised in the main thread by close()
                self._error = exc

    def put(self, patches: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((patches, coords, labels))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def read_into(
    source: PatchSource,
    cand: Candidates,
    quality_cfg: dict,
    sink: BackgroundWriter,
    rejected: list[np.ndarray] | None = None,
    on_kept: Callable[[int], None] | None = None,
) -> tuple[dict[int, int], int]:
    """Fill each class's quota from its candidates, in rounds: read the next ones in slide order,
    drop quality rejects, replace them from the spares. Returns (accepted per class, patches read);
    the coordinates of rejected patches are appended to ``rejected`` when given (QC image).
    ``on_kept(n)`` is told the patches each batch adds (progress)."""
    taken = {c: 0 for c in cand.coords}  # candidates consumed per class
    kept = {c: 0 for c in cand.coords}
    while True:
        want = {c: min(cand.quota[c] - kept[c], len(cand.coords[c]) - taken[c]) for c in cand.coords}
        if sum(want.values()) <= 0:
            return kept, sum(taken.values())
        parts = [(cand.coords[c][taken[c] : taken[c] + n], c) for c, n in want.items() if n > 0]
        coords = np.concatenate([p for p, _ in parts])
        labels = np.concatenate([np.full(len(p), c, dtype=np.int64) for p, c in parts])
        for c, n in want.items():
            taken[c] += max(n, 0)
        order = np.lexsort((coords[:, 0], coords[:, 1]))  # row-major: neighbours share tiles
        coords, labels = coords[order], labels[order]
        offset = 0
        for chunk, patches in source.batches(coords):
            lab = labels[offset : offset + len(chunk)]
            offset += len(chunk)
            ok = quality_ok(patches, quality_cfg)
            if not ok.all():
                if rejected is not None:
                    rejected.append(chunk[~ok])
                patches, chunk, lab = patches[ok], chunk[ok], lab[ok]
            for c, n in zip(*np.unique(lab, return_counts=True)):
                kept[int(c)] += int(n)
            sink.put(patches, chunk, lab)
            if on_kept is not None:
                on_kept(len(lab))

"""The per-rank epoch loader of training: deterministic plans, rank sharding, batches in storage order.

``EpochLoader``: per epoch a deterministic plan of (patch, transform) pairs from
``(seed, epoch)`` — it depends on the data only, never on preloading or I/O path. Sets up to 4 GiB
that are fully mapped are shuffled globally; larger or compressed sets chunk by chunk (chunk order
shuffled, patches shuffled within a window of 16 chunks). The plan is padded by wrapping and split
into equal, disjoint, contiguous per-rank parts, so every rank runs the same number of batches
(allreduce lockstep); each batch is put in storage order. Reading: `medflow.train.patchset`.
Per batch: read → stain normalisation (load time, optional) → dihedral transform → HED jitter
(optional; its per-patch draws are part of the epoch plan, from their own seed stream).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.seeds import rng_for
from ..extract.wsi.stain import StainNormaliser
from .augment import dihedral_batch
from .patchset import PatchSet
from .sampling import chunk_order, epoch_samples, stratified_order
from .stain_jitter import draw as draw_jitter
from .stain_jitter import hed_jitter

PRELOAD_AUTO_BYTES = int(os.environ.get("MEDFLOW_PRELOAD_BYTES", 1 << 30))  # per process
GLOBAL_SHUFFLE_BYTES = 4 << 30  # sets up to this size are shuffled globally, larger ones by chunk windows
DEFAULT_WINDOW_CHUNKS = 16


class BufferPool:
    """Batch arrays handed out again once nobody else holds them.

    A fresh multi-MB array costs page faults (the kernel zeroes every page) as much as the copy
    into it, and a training loop always holds the previous batch while the next one is read, so
    the allocator cannot simply reuse the block. A pooled array is reused only when its reference
    count shows that the yielded tensor (``torch.from_numpy`` keeps the array alive) is gone;
    otherwise a new one is made, so a caller that keeps batches never sees them overwritten."""

    def __init__(self, patch_shape: tuple[int, ...], dtype: np.dtype, size: int = 4):
        self.patch_shape, self.dtype, self.size = tuple(patch_shape), np.dtype(dtype), size
        self._arrays: list[np.ndarray] = []

    def get(self, n: int, exclude: np.ndarray | None = None) -> np.ndarray:
        for i in range(len(self._arrays)):
            if (
                self._arrays[i].shape[0] == n
                and self._arrays[i] is not exclude
                and sys.getrefcount(self._arrays[i]) <= _POOL_ONLY_REFS
            ):
                return self._arrays[i]
        arr = np.empty((n, *self.patch_shape), dtype=self.dtype)
        if len(self._arrays) >= self.size:
            self._arrays.pop(0)
        self._arrays.append(arr)
        return arr

    def __getstate__(self) -> dict[str, Any]:  # workers start with an empty pool
        return {**self.__dict__, "_arrays": []}


def _refs_held_by_pool_only() -> int:
    """What ``sys.getrefcount`` reports for a pooled array nobody else holds (calibrated here,
    in the same expression as ``BufferPool.get``, since the count differs across Pythons)."""
    arrays = [np.empty(1)]
    return sys.getrefcount(arrays[0])


_POOL_ONLY_REFS = _refs_held_by_pool_only()


class EpochLoader:
    """Iterates (x, y) batches of one rank; ``set_epoch`` reshuffles deterministically (see the module
    docstring for the design).

    ``workers`` > 0: DataLoader worker processes (forked) build the batches; ``prefetch`` > 0
    (with workers = 0): one background thread reads that many batches ahead; ``pin_memory``
    pins batches for asynchronous host-to-GPU copies (CUDA only). ``stain``: a stain normaliser
    applied to every batch (`medflow.extract.wsi.stain`); ``jitter``: HED jitter (scale, bias),
    `medflow.train.stain_jitter`."""

    def __init__(
        self,
        pset: PatchSet,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        augment: str = "none",
        balance: str = "none",
        sampling: str = "shuffle",
        drop_last: bool = False,
        workers: int = 0,
        preload: str | bool | int = "auto",
        window_chunks: int | None = None,
        prefetch: int = 0,
        pin_memory: bool = False,
        stain: StainNormaliser | None = None,
        jitter: tuple[float, float] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if sampling not in ("shuffle", "stratified"):
            raise ValueError(f"unknown sampling {sampling!r}")
        self.pset = pset
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.shuffle, self.seed, self.augment, self.balance = shuffle, int(seed), augment, balance
        self.sampling, self.drop_last, self.workers = sampling, drop_last, int(workers)
        self.prefetch, self.pin_memory = int(prefetch), bool(pin_memory)
        # Stain normalisation (load time) and HED jitter: uint8 RGB patches only.
        self.stain, self.jitter = stain, jitter
        if (stain is not None or jitter is not None) and (pset.dtype != np.uint8 or pset.patch_shape[-1:] != (3,)):
            raise ValueError(
                f"stain normalisation / HED jitter need uint8 RGB patches, not {pset.dtype} {pset.patch_shape}"
            )
        # The shuffle depends on the data only (never on RAM or the preload threshold), so a run
        # is reproducible anywhere: small sets get a global permutation, large ones a chunk-windowed one.
        # Sets read through h5py (compressed) always use chunk windows: a global shuffle would
        # decompress every chunk once per batch instead of once per epoch.
        if window_chunks is None:
            small = pset.nbytes <= GLOBAL_SHUFFLE_BYTES and pset.mapped_fraction == 1.0
            window_chunks = 0 if small else DEFAULT_WINDOW_CHUNKS
        self.window_chunks = int(window_chunks)
        pset.reserve_cache_chunks(2 * self.window_chunks + 2)  # a batch may straddle two windows
        if _want_preload(preload, pset):
            pset.preload()
        self.epoch = 0
        self.stats: dict[str, float] = {"patches": 0, "load_s": 0.0, "stain_s": 0.0}
        self._buffers = BufferPool(pset.patch_shape, pset.dtype, size=4 + (stain is not None) + (jitter is not None))
        self.set_epoch(0)

    # -- plan ------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        idx, tf, self._jitter = self._make_plan(self.epoch)
        self._plan = (idx, tf)
        self._runs = self._batch_runs(self._plan[0])
        self._seg_rows = self.pset.seg_row[self._plan[0]]

    def _batch_runs(self, idx: np.ndarray) -> list[tuple[list[int], list[int]]]:
        """Per batch, the storage segment of each run of rows and the run boundaries (relative
        to the batch), worked out once per epoch so a batch costs one copy call per run."""
        p, B = self.pset, max(self.batch_size, 1)
        segs = p.seg_of[idx]
        pos = np.arange(1, len(idx))
        starts = np.flatnonzero(np.r_[True, (segs[1:] != segs[:-1]) | (pos % B == 0)]) if len(idx) else pos
        split = np.searchsorted(starts // B, np.arange(len(self) + 1))
        runs = []
        for b in range(len(self)):
            s = starts[split[b] : split[b + 1]]
            runs.append((segs[s].tolist(), (s[1:] - b * B).tolist()))
        return runs

    def _make_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """This rank's (positions, transforms, HED jitter draws or None), identical on every rank given (seed, epoch)."""
        rng = rng_for(self.seed, "epoch", epoch)
        labels = self.pset.labels
        idx, tf = epoch_samples(labels, rng, self.augment, self.balance, len(self.pset.class_names))
        # Its own stream: the plan's draws are the same with and without jitter.
        jit = draw_jitter(rng_for(self.seed, "epoch", epoch, "hed"), len(idx), *self.jitter) if self.jitter else None
        if self.shuffle and len(idx):
            if self.sampling == "stratified":
                order = stratified_order(labels[idx], rng)
            elif self.window_chunks <= 0:
                order = rng.permutation(len(idx))
            else:
                order = chunk_order(self.pset.chunk_of[idx], rng, self.window_chunks)
            idx, tf = idx[order], tf[order]
            jit = jit[order] if jit is not None else None
        per_rank = self._per_rank_len(len(idx))
        total = per_rank * self.world_size
        if total > len(idx) and len(idx):  # pad by wrapping, like DistributedSampler
            reps = -(-total // len(idx))
            idx, tf = np.tile(idx, reps)[:total], np.tile(tf, reps)[:total]
            jit = np.tile(jit, (reps, 1))[:total] if jit is not None else None
        lo = self.rank * per_rank
        idx, tf = idx[lo : lo + per_rank], tf[lo : lo + per_rank]
        jit = jit[lo : lo + per_rank] if jit is not None else None
        # Within each batch, storage order: the batch's content is unchanged, and each run of
        # rows from one segment is then copied once, straight into the batch.
        p = self.pset
        batch_no = np.arange(len(idx)) // max(self.batch_size, 1)
        order = np.lexsort((p.row_of[idx], p.shard_of[idx], p.seg_of[idx], batch_no))
        return idx[order], tf[order], (jit[order] if jit is not None else None)

    def _per_rank_len(self, n: int) -> int:
        per_rank = -(-n // self.world_size)
        if self.drop_last:
            per_rank = (per_rank // self.batch_size) * self.batch_size
        return per_rank

    def rank_indices(self) -> np.ndarray:
        """This rank's patch positions for the current epoch (in iteration order)."""
        return self._plan[0].copy()

    def __len__(self) -> int:
        n = len(self._plan[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- batches ---------------------------------------------------------------------------------
    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``b`` of this rank's current epoch as NumPy (x NHWC, y)."""
        (idx, tf), jit = self._plan, self._jitter
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        part = idx[sl]
        out = self._buffers.get(len(part))
        if self.pset.preloaded or b >= len(self._runs):
            x = self.pset.read(part, out=out)
        else:
            heads, cuts = self._runs[b]
            self.pset._read_groups(part, heads, cuts, out, rows=self._seg_rows[sl])
            x = out
        n = len(part)
        if self.stain is not None:
            t0 = time.perf_counter()
            x = self.stain.apply(x, out=self._buffers.get(n, exclude=x))
            self.stats["stain_s"] += time.perf_counter() - t0
        if self.augment == "dihedral" or self.balance == "dihedral":
            x = dihedral_batch(x, tf[sl], out=self._buffers.get(n, exclude=x))
        if jit is not None:
            t0 = time.perf_counter()
            x = hed_jitter(x, jit[sl], out=self._buffers.get(n, exclude=x))
            self.stats["stain_s"] += time.perf_counter() - t0
        return x, self.pset.labels[idx[sl]]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self.workers > 0:
            source = self._worker_batches()
        elif self.prefetch > 0:
            source = self._prefetched_batches()
        else:
            source = (self.batch(b) for b in range(len(self)))
        float_out = self.pset.dtype.kind == "f"
        pin = self.pin_memory and torch.cuda.is_available()
        t0 = time.perf_counter()
        for x, y in source:
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
                y = torch.from_numpy(np.asarray(y, dtype=np.int64))
            if float_out and x.dtype != torch.float32:
                x = x.float()
            if pin:
                x = x.pin_memory()
            self.stats["load_s"] += time.perf_counter() - t0
            self.stats["patches"] += len(y)
            yield x, y
            t0 = time.perf_counter()

    def _prefetched_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches read ``prefetch`` ahead by one background thread (reads copy without the GIL,
        so they overlap the training step). One thread: the chunk cache is never shared."""
        n = len(self)
        with ThreadPoolExecutor(1, thread_name_prefix="medflow-prefetch") as pool:
            pending = deque(pool.submit(self.batch, b) for b in range(min(self.prefetch, n)))
            following = len(pending)
            while pending:
                x, y = pending.popleft().result()
                if following < n:
                    pending.append(pool.submit(self.batch, following))
                    following += 1
                yield x, y

    def _worker_batches(self) -> Iterator[tuple[Any, Any]]:
        loader: DataLoader = DataLoader(
            _BatchDataset(self),
            batch_size=None,
            shuffle=False,
            num_workers=self.workers,
            persistent_workers=False,
            multiprocessing_context="fork" if os.name == "posix" else None,
        )
        yield from loader

    @property
    def load_ms_per_patch(self) -> float | None:
        n = self.stats["patches"]
        return 1000.0 * self.stats["load_s"] / n if n else None


class _BatchDataset(Dataset):
    """Map-style dataset of the loader's current-epoch batches (for DataLoader workers)."""

    def __init__(self, loader: EpochLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.batch(int(b))
        return torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.int64))


def _want_preload(preload: str | bool | int, pset: PatchSet) -> bool:
    """``auto``: preload small sets that are read through h5py (compressed: decompress once).
    Memory-mapped sets are served from the page cache, which is as fast as a private copy
    (measured: benchmarks/bench_loader.py) and shared by all ranks of a node, so they stay mapped."""
    if preload == "auto":
        return pset.mapped_fraction < 1.0 and pset.nbytes <= PRELOAD_AUTO_BYTES
    if isinstance(preload, bool):
        return preload
    if isinstance(preload, int):
        return pset.nbytes <= preload
    raise ValueError(f"preload must be 'auto', a bool or a byte limit, not {preload!r}")

"""HDF5 patch loading for training and prediction: whole-chunk reads, rank sharding, dihedral
augmentation, class balancing and stratified batches.

h5py fancy indexing (``ds[list_of_rows]``) goes through HDF5's point-selection path and is ~900×
slower than reading whole chunks (see /work/shared/FACTS.md), so this module never does it: rows
are gathered from memory-mapped chunks, or from whole chunks read as chunk-aligned slices.

- ``PatchSet``: the patches of some patients of a cohort index, in a fixed order (shard order,
  then row order). ``read(idx)`` returns rows in ``idx`` order. Uncompressed shards: rows are
  gathered straight from a read-only memory map of the file at the chunk offsets HDF5 reports
  (one copy from the page cache, which all ranks of a node share). Compressed shards: whole
  chunks through h5py into a small LRU, or RAM after ``preload()``.
- ``make_loader`` → ``EpochLoader``: per epoch a deterministic plan of (patch, transform) pairs
  from ``(seed, epoch)`` — it depends on the data only, never on preloading or I/O path. Sets
  up to 4 GiB that are fully mapped are shuffled globally; larger or compressed sets chunk by
  chunk (chunk order shuffled, patches shuffled within a window of 16 chunks). The plan is
  padded by wrapping and split into equal, disjoint, contiguous per-rank parts, so every rank
  runs the same number of batches (allreduce lockstep); each batch is put in storage order.

Handles (h5py files, memory maps) are per process, opened lazily and reopened after a fork or
unpickling, so DataLoader worker processes never share one.
"""
from __future__ import annotations

import mmap
import os
import sys
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

import h5py
import numpy as np

from .errors import InputError
from .config import derive_seed

PRELOAD_AUTO_BYTES = int(os.environ.get("MEDFLOW_PRELOAD_BYTES", 1 << 30))  # per process
CHUNK_CACHE_BYTES = 256 << 20   # LRU of whole chunks for shards read through h5py (compressed)
GLOBAL_SHUFFLE_BYTES = 4 << 30  # sets up to this size are shuffled globally, larger ones by chunk windows
DEFAULT_WINDOW_CHUNKS = 16
N_DIHEDRAL = 8


# ---- dihedral group -----------------------------------------------------------------------------
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


# ---- where the rows of a shard lie in its file ---------------------------------------------------
def row_segments(ds: h5py.Dataset) -> list[tuple[int, int, int]] | None:
    """Runs ``(first_row, n_rows, byte_offset)`` of rows stored contiguously, raw, in the file;
    None when the dataset cannot be mapped (compressed/filtered, chunks splitting a patch,
    unallocated chunks). Chunk offsets come from HDF5's own chunk index."""
    n = int(ds.shape[0])
    row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    if n == 0 or ds.dtype.hasobject or ds.id.get_create_plist().get_nfilters():
        return None
    if ds.chunks is None:
        offset = ds.id.get_offset()
        return None if offset is None else [(0, n, int(offset))]
    if tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
        return None
    offsets: dict[int, int] = {}
    try:
        ds.id.chunk_iter(lambda info: offsets.__setitem__(int(info.chunk_offset[0]), int(info.byte_offset)))
    except (AttributeError, RuntimeError):  # HDF5 < 1.12.3: ask chunk by chunk
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            offsets[int(info.chunk_offset[0])] = int(info.byte_offset)
    c = int(ds.chunks[0])
    segments: list[list[int]] = []
    for start in range(0, n, c):
        if start not in offsets:
            return None
        rows = min(c, n - start)
        last = segments[-1] if segments else None
        if last and last[0] + last[1] == start and last[2] + last[1] * row_bytes == offsets[start]:
            last[1] += rows
        else:
            segments.append([start, rows, offsets[start]])
    return [(a, b, o) for a, b, o in segments]


# ---- the patch set ------------------------------------------------------------------------------
class PatchSet:
    """The patches of ``patients`` in a cohort index (``medflow.shards.load_index``).

    ``io``: ``"mmap"`` gathers rows of uncompressed shards straight from a read-only memory map
    of the file at the chunk offsets HDF5 reports (one copy, no HDF5 call per batch);
    ``"h5py"`` reads whole chunks with ``ds.read_direct`` into a small LRU pool (needed for
    compressed shards); ``"auto"`` uses mmap wherever the layout allows it.
    """

    def __init__(self, index: dict, patients: Iterable[str], max_patches: int = 0, seed: int = 0,
                 cache_bytes: int = CHUNK_CACHE_BYTES, io: str = "auto"):
        if io not in ("auto", "mmap", "h5py"):
            raise ValueError(f"io must be auto, mmap or h5py, not {io!r}")
        wanted = {str(p) for p in patients}
        known = {str(s["patient_id"]) for s in index["shards"]}
        missing = sorted(wanted - known)
        if missing:
            raise InputError(index.get("path") or f"cohort index {index.get('cohort')!r}",
                             f"patients {missing[:5]} have no shard in the index")
        self.class_names: list[str] = list(index["class_names"])
        self.shards: list[dict[str, Any]] = [s for s in index["shards"] if str(s["patient_id"]) in wanted]
        self.cache_bytes = int(cache_bytes)
        self.patch_shape: tuple[int, ...] = ()
        self.dtype = np.dtype("uint8")
        self.chunk_rows: list[int] = []
        self.shard_len: list[int] = []
        #: mapped segments: shard, first row, rows, byte offset
        self.segments: list[tuple[int, int, int, int]] = []
        shard_ids, rows, labels, coords, seg_ids = [], [], [], [], []
        for sid, shard in enumerate(self.shards):
            with h5py.File(shard["path"], "r") as h5:
                ds = h5["patches"]
                self._check_layout(shard["path"], ds, sid)
                segs = row_segments(ds) if io != "h5py" else None
                if io == "mmap" and segs is None and ds.shape[0]:
                    raise InputError(shard["path"], "patches are compressed or chunked across patches; "
                                                    "cannot memory-map them (use io='auto' or 'h5py')")
                lab = h5["labels"][:]
                coords.append(h5["coords"][:])
            seg_of_row = np.full(len(lab), -1 - sid, dtype=np.int64)  # negative: read through h5py
            for first, n_rows, offset in segs or []:
                seg_of_row[first:first + n_rows] = len(self.segments)
                self.segments.append((sid, first, n_rows, offset))
            seg_ids.append(seg_of_row)
            shard_ids.append(np.full(len(lab), sid, dtype=np.int32))
            rows.append(np.arange(len(lab), dtype=np.int64))
            labels.append(lab.astype(np.int64))
        self.shard_of = _concat(shard_ids, np.int32)
        self.row_of = _concat(rows, np.int64)
        self.seg_of = _concat(seg_ids, np.int64)
        self.labels = _concat(labels, np.int64)
        self.coords = np.concatenate(coords) if coords else np.zeros((0, 2), np.int64)
        if max_patches and len(self.labels) > max_patches:
            keep = _stratified_subset(self.labels, int(max_patches), seed)
            for name in ("shard_of", "row_of", "seg_of", "labels", "coords"):
                setattr(self, name, getattr(self, name)[keep])
        chunk_rows = np.asarray(self.chunk_rows or [1], dtype=np.int64)
        #: global chunk number of every patch (chunks numbered shard by shard)
        first_chunk = np.r_[0, np.cumsum([-(-n // c) for n, c in zip(self.shard_len, self.chunk_rows)])]
        self.chunk_of = (first_chunk[self.shard_of] + self.row_of // chunk_rows[self.shard_of]).astype(np.int64)
        seg_first = np.asarray([s[1] for s in self.segments] or [0], dtype=np.int64)
        self.seg_row = np.where(self.seg_of >= 0, self.row_of - seg_first[np.maximum(self.seg_of, 0)], -1)
        self._ram: np.ndarray | None = None
        self._reset_process_state()

    def _check_layout(self, path: str, ds: h5py.Dataset, sid: int) -> None:
        shape, dtype = tuple(ds.shape[1:]), ds.dtype
        if sid == 0:
            self.patch_shape, self.dtype = shape, dtype
        elif (shape, dtype) != (self.patch_shape, self.dtype):
            raise InputError(path, f"patches {shape} {dtype} differ from the set's {self.patch_shape} {self.dtype}")
        self.shard_len.append(int(ds.shape[0]))
        row_bytes = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
        self.chunk_rows.append(int(ds.chunks[0]) if ds.chunks else max(1, (4 << 20) // row_bytes))

    # -- per-process state: handles, maps and cache are never shared across a fork ---------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._handles: dict[int, h5py.File] = {}
        self._maps: dict[int, mmap.mmap] = {}
        self._views: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_used = 0
        self.chunk_reads = 0

    def _own_process(self) -> None:
        if self._pid != os.getpid():
            self._reset_process_state()  # forked/unpickled: the parent's handles are not ours

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handles={}, _maps={}, _views={}, _cache=OrderedDict(), _cache_used=0, _pid=-1)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _dataset(self, sid: int) -> h5py.Dataset:
        self._own_process()
        h5 = self._handles.get(sid)
        if h5 is None:
            h5 = self._handles[sid] = h5py.File(self.shards[sid]["path"], "r")
        return h5["patches"]

    def _segment_view(self, seg: int) -> np.ndarray:
        """(rows, *patch_shape) read-only view of a mapped segment."""
        view = self._views.get(seg)
        if view is None:
            sid, _, n_rows, offset = self.segments[seg]
            mm = self._maps.get(sid)
            if mm is None:
                with open(self.shards[sid]["path"], "rb") as fh:
                    mm = self._maps[sid] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            count = n_rows * int(np.prod(self.patch_shape, dtype=np.int64))
            view = np.frombuffer(mm, dtype=self.dtype, count=count, offset=offset).reshape(n_rows, *self.patch_shape)
            self._views[seg] = view
        return view

    def close(self) -> None:
        if self._pid == os.getpid():
            for h5 in self._handles.values():
                h5.close()
            self._views.clear()
            for mm in self._maps.values():
                try:
                    mm.close()
                except BufferError:  # a caller still holds a view; the map closes with it
                    pass
        self._reset_process_state()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    # -- sizes ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(len(self.labels))

    @property
    def patch_nbytes(self) -> int:
        return int(np.prod(self.patch_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return len(self) * self.patch_nbytes

    @property
    def preloaded(self) -> bool:
        return self._ram is not None

    @property
    def mapped_fraction(self) -> float:
        """Share of the set's patches served by memory-mapped segments."""
        return float(np.mean(self.seg_of >= 0)) if len(self) else 0.0

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.class_names))

    def patients(self) -> np.ndarray:
        """Patient id of every patch (for per-patient aggregation of predictions)."""
        ids = np.array([str(s["patient_id"]) for s in self.shards] or [""], dtype=object)
        return ids[self.shard_of]

    def image_ids(self) -> np.ndarray:
        """Image id of every patch (for per-slide maps and aggregation)."""
        ids = np.array([str(s["image_id"]) for s in self.shards] or [""], dtype=object)
        return ids[self.shard_of]

    # -- reading --------------------------------------------------------------------------------
    def preload(self) -> None:
        """Read every patch into RAM once; later reads are in-memory gathers."""
        if self._ram is None:
            self._ram = self.read(np.arange(len(self)))

    def read(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Patches ``idx`` (positions in this set) as (len(idx), *patch_shape), in ``idx`` order,
        into ``out`` when given (a reused buffer saves the page faults of a fresh one).

        Cheapest when ``idx`` is grouped by storage segment (``sort_for_read``): each group is then
        copied once, straight from the page cache into the output."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(idx), *self.patch_shape), dtype=self.dtype)
        elif out.shape != (len(idx), *self.patch_shape) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {(len(idx), *self.patch_shape)} {self.dtype} array")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"patch positions outside 0..{len(self) - 1}")
        if self._ram is not None:
            return np.take(self._ram, idx, axis=0, out=out, mode="clip")
        if not len(idx):
            return out
        segs = self.seg_of[idx]
        cuts = (np.flatnonzero(segs[1:] != segs[:-1]) + 1).tolist()
        heads = segs[[0, *cuts]].tolist()
        if len(set(heads)) == len(heads):                # already grouped: one copy per group
            self._read_groups(idx, heads, cuts, out)
            return out
        order = np.argsort(segs, kind="stable")
        sorted_segs = segs[order]
        cuts = (np.flatnonzero(sorted_segs[1:] != sorted_segs[:-1]) + 1).tolist()
        grouped = np.empty_like(out)
        self._read_groups(idx[order], sorted_segs[[0, *cuts]].tolist(), cuts, grouped)
        out[order] = grouped
        return out

    def sort_for_read(self, idx: np.ndarray) -> np.ndarray:
        """Permutation of ``idx`` that groups it by storage segment (then row): the fast read order."""
        return np.lexsort((self.row_of[idx], self.shard_of[idx], self.seg_of[idx]))

    def _read_groups(self, idx: np.ndarray, heads: list[int], cuts: list[int], out: np.ndarray,
                     rows: np.ndarray | None = None) -> None:
        """Fill ``out`` from runs of ``idx`` that share a segment (``heads[k]`` for run k);
        ``rows`` = ``seg_row[idx]`` when the caller has it already."""
        self._own_process()
        rows = self.seg_row[idx] if rows is None else rows
        for seg, lo, hi in zip(heads, [0, *cuts], [*cuts, len(idx)]):
            if seg >= 0:
                view = self._views.get(seg)
                if view is None:
                    view = self._segment_view(seg)
                view.take(rows[lo:hi], axis=0, out=out[lo:hi], mode="clip")
            else:
                out[lo:hi] = self._read_chunked(idx[lo:hi])

    def _read_chunked(self, idx: np.ndarray) -> np.ndarray:
        """Rows through h5py, whole chunks at a time (a chunk-aligned slice is HDF5's fast path)."""
        out = np.empty((len(idx), *self.patch_shape), dtype=self.dtype)
        chunks = self.chunk_of[idx]
        order = np.argsort(chunks, kind="stable")
        bounds = np.flatnonzero(np.r_[True, chunks[order][1:] != chunks[order][:-1], True])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            pos = order[lo:hi]                   # output positions served by this chunk
            first = idx[pos[0]]
            sid, row = int(self.shard_of[first]), int(self.row_of[first])
            block = self._chunk(sid, int(self.chunk_of[first]), row)
            start = (row // self.chunk_rows[sid]) * self.chunk_rows[sid]
            out[pos] = block[self.row_of[idx[pos]] - start]
        return out

    def _chunk(self, sid: int, chunk: int, row: int) -> np.ndarray:
        block = self._cache.get(chunk)
        if block is not None:
            self._cache.move_to_end(chunk)
            return block
        ds = self._dataset(sid)
        size = self.chunk_rows[sid]
        start = (row // size) * size
        stop = min(start + size, ds.shape[0])
        block = self._free_buffer(stop - start)
        ds.read_direct(block, np.s_[start:stop])       # whole chunk into a reused buffer
        self.chunk_reads += 1
        self._cache[chunk] = block
        self._cache_used += block.nbytes
        return block

    def _free_buffer(self, rows: int) -> np.ndarray:
        """A (rows, *patch_shape) buffer, recycled from the evicted LRU entry when it fits:
        fresh multi-MB arrays cost page faults on first touch, as much as the read itself."""
        recycled = None
        while self._cache and self._cache_used + rows * self.patch_nbytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= old.nbytes
            recycled = old
        if recycled is not None and recycled.shape[0] == rows:
            return recycled
        return np.empty((rows, *self.patch_shape), dtype=self.dtype)

    def reserve_cache_chunks(self, n_chunks: int) -> None:
        """Grow the chunk LRU to hold ``n_chunks`` of the largest chunk (a shuffle window plus
        its edges), so a windowed epoch reads every chunk once instead of thrashing."""
        if self.mapped_fraction < 1.0 and self.chunk_rows:
            self.cache_bytes = max(self.cache_bytes, n_chunks * max(self.chunk_rows) * self.patch_nbytes)

    def iter_batches(self, batch_size: int, idx: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, patches) in order, for prediction over the whole set (no padding)."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        for lo in range(0, len(idx), batch_size):
            part = idx[lo:lo + batch_size]
            yield part, self.read(part)


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _stratified_subset(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted positions of ``cap`` patches, per class proportional to its count (≥ 1 when possible)."""
    rng = np.random.default_rng(derive_seed(seed, "max_patches"))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * cap / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    if cap >= len(classes):
        quota = np.maximum(quota, 1)
    for c in np.argsort(-(exact - quota), kind="stable"):    # largest remainders first
        if quota.sum() >= cap:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
    while quota.sum() > cap:                                  # the ≥ 1 floor overshot: trim the largest
        quota[np.argmax(quota)] -= 1
    keep = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(keep))


# ---- epoch plans ----------------------------------------------------------------------------------
def epoch_samples(labels: np.ndarray, rng: np.random.Generator, augment: str, balance: str,
                  n_classes: int) -> tuple[np.ndarray, np.ndarray]:
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


def _dihedral_oversample(labels: np.ndarray, rng: np.random.Generator, augment: str,
                         n_classes: int) -> tuple[np.ndarray, np.ndarray]:
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
    rank_of_chunk = rng.permutation(len(uniq))[inverse]    # random position of each sample's chunk
    window_of = rank_of_chunk // max(window, 1)
    return np.lexsort((rng.random(len(chunks)), window_of))


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
            if (self._arrays[i].shape[0] == n and self._arrays[i] is not exclude
                    and sys.getrefcount(self._arrays[i]) <= _POOL_ONLY_REFS):
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
    """Iterates (x, y) batches of one rank; ``set_epoch`` reshuffles deterministically."""

    def __init__(self, pset: PatchSet, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, augment: str = "none", balance: str = "none",
                 sampling: str = "shuffle", drop_last: bool = False, workers: int = 0,
                 preload: str | bool | int = "auto", window_chunks: int | None = None,
                 prefetch: int = 0, pin_memory: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if sampling not in ("shuffle", "stratified"):
            raise ValueError(f"unknown sampling {sampling!r}")
        self.pset = pset
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.shuffle, self.seed, self.augment, self.balance = shuffle, int(seed), augment, balance
        self.sampling, self.drop_last, self.workers = sampling, drop_last, int(workers)
        self.prefetch, self.pin_memory = int(prefetch), bool(pin_memory)
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
        self.stats: dict[str, float] = {"patches": 0, "load_s": 0.0}
        self._buffers = BufferPool(pset.patch_shape, pset.dtype)
        self.set_epoch(0)

    # -- plan ------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._plan = self._make_plan(self.epoch)
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
            s = starts[split[b]:split[b + 1]]
            runs.append((segs[s].tolist(), (s[1:] - b * B).tolist()))
        return runs

    def _make_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (positions, transforms), identical on every rank given (seed, epoch)."""
        rng = np.random.default_rng(derive_seed(self.seed, "epoch", epoch))
        labels = self.pset.labels
        idx, tf = epoch_samples(labels, rng, self.augment, self.balance, len(self.pset.class_names))
        if self.shuffle and len(idx):
            if self.sampling == "stratified":
                order = stratified_order(labels[idx], rng)
            elif self.window_chunks <= 0:
                order = rng.permutation(len(idx))
            else:
                order = chunk_order(self.pset.chunk_of[idx], rng, self.window_chunks)
            idx, tf = idx[order], tf[order]
        per_rank = self._per_rank_len(len(idx))
        total = per_rank * self.world_size
        if total > len(idx) and len(idx):   # pad by wrapping, like DistributedSampler
            reps = -(-total // len(idx))
            idx, tf = np.tile(idx, reps)[:total], np.tile(tf, reps)[:total]
        lo = self.rank * per_rank
        idx, tf = idx[lo:lo + per_rank], tf[lo:lo + per_rank]
        # Within each batch, storage order: the batch's content is unchanged, and each run of
        # rows from one segment is then copied once, straight into the batch.
        p = self.pset
        batch_no = np.arange(len(idx)) // max(self.batch_size, 1)
        order = np.lexsort((p.row_of[idx], p.shard_of[idx], p.seg_of[idx], batch_no))
        return idx[order], tf[order]

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
        idx, tf = self._plan
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
        if self.augment == "dihedral" or self.balance == "dihedral":
            x = dihedral_batch(x, tf[sl], out=self._buffers.get(n, exclude=x))
        return x, self.pset.labels[idx[sl]]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        import torch

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
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

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
        from torch.utils.data import DataLoader

        loader = DataLoader(_BatchDataset(self), batch_size=None, shuffle=False,
                            num_workers=self.workers, persistent_workers=False,
                            multiprocessing_context="fork" if os.name == "posix" else None)
        for x, y in loader:
            yield x, y

    @property
    def load_ms_per_patch(self) -> float | None:
        n = self.stats["patches"]
        return 1000.0 * self.stats["load_s"] / n if n else None


class _BatchDataset:
    """Map-style dataset of the loader's current-epoch batches (for DataLoader workers)."""

    def __init__(self, loader: EpochLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, b: int):
        import torch

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


def make_loader(pset: PatchSet, *, batch_size: int, rank: int = 0, world_size: int = 1,
                shuffle: bool = True, seed: int = 0, augment: str = "none", balance: str = "none",
                sampling: str = "shuffle", drop_last: bool = False, workers: int = 0,
                preload: str | bool | int = "auto", window_chunks: int | None = None,
                prefetch: int = 0, pin_memory: bool = False) -> EpochLoader:
    """The per-rank epoch loader (see the module docstring for the design).

    ``workers`` > 0: DataLoader worker processes (forked) build the batches; ``prefetch`` > 0
    (with workers = 0): one background thread reads that many batches ahead; ``pin_memory``
    pins batches for asynchronous host-to-GPU copies (CUDA only)."""
    return EpochLoader(pset, batch_size=batch_size, rank=rank, world_size=world_size, shuffle=shuffle,
                       seed=seed, augment=augment, balance=balance, sampling=sampling,
                       drop_last=drop_last, workers=workers, preload=preload, window_chunks=window_chunks,
                       prefetch=prefetch, pin_memory=pin_memory)


# ---- synthetic shards (tests and benchmarks) -----------------------------------------------------
def write_synthetic_cohort(root: str | os.PathLike, images: dict[str, tuple[str, list[int]]],
                           class_names: list[str], patch_shape: tuple[int, ...] = (16, 16, 3),
                           dtype: str = "uint8", chunk_patches: int = 32, seed: int = 0,
                           cohort: str = "synthetic", kind: str = "wsi", compression: str = "none",
                           make_patches: Callable[[np.random.Generator, int], np.ndarray] | None = None) -> str:
    """Write one real shard per image (``image_id -> (patient_id, labels)``) through ``ShardWriter``,
    plus extraction records and the cohort index; return the index path. Pixels are uniform noise
    unless ``make_patches(rng, n)`` supplies them."""
    from pathlib import Path

    from . import fsio
    from .shards import ShardWriter, build_index

    root = Path(root)
    rng = np.random.default_rng(seed)
    records = []
    for image_id, (patient_id, labels) in images.items():
        labels = np.asarray(labels, dtype=np.int64)
        n = len(labels)
        if make_patches is not None:
            patches = make_patches(rng, n)
        elif np.dtype(dtype).kind == "f":
            patches = rng.standard_normal((n, *patch_shape)).astype(dtype)
        else:
            patches = rng.integers(0, 256, size=(n, *patch_shape), dtype=np.uint8).astype(dtype)
        attrs = {"kind": kind, "image_id": image_id, "patient_id": patient_id, "cohort": cohort,
                 "class_names": class_names, "patch_size": patch_shape[0], "channels": patch_shape[-1],
                 "seed": seed}
        shard = root / "shards" / f"{image_id}.h5"
        with ShardWriter(shard, patch_shape, dtype, attrs, chunk_patches=chunk_patches,
                         compression=compression) as writer:
            for lo in range(0, n, 256):
                coords = np.column_stack([np.arange(lo, min(lo + 256, n))] * 2)
                writer.append(patches[lo:lo + 256], coords, labels[lo:lo + 256])
        record = shard.with_name(f"{image_id}.record.json")
        fsio.write_json(record, {"status": "ok", "shard": shard.name, "image_id": image_id,
                                 "patient_id": patient_id, "cohort": cohort})
        records.append(record)
    index_path = root / "index" / f"{cohort}.json"
    build_index(records, index_path, cohort, kind)
    return str(index_path)


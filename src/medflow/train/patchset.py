"""The patches of some patients of a cohort index, read without h5py fancy indexing.

h5py fancy indexing (``ds[list_of_rows]``) goes through HDF5's point-selection path and is ~900×
slower than reading whole chunks (benchmarks/bench_loader.py), so this module never does it: rows
are gathered from memory-mapped chunks, or from whole chunks read as chunk-aligned slices.

``PatchSet.read(idx)`` returns rows in ``idx`` order. Uncompressed shards: rows are gathered straight
from a read-only memory map of the file at the chunk offsets HDF5 reports (one copy from the page
cache, which all ranks of a node share). Compressed shards: whole chunks through h5py into a small
LRU, or RAM after ``preload()``. Handles (h5py files, memory maps) are per process, opened lazily
and reopened after a fork or unpickling, so DataLoader worker processes never share one.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import h5py
import numpy as np

from ..core.errors import InputError
from ..core.index import open_checked
from ..core.seeds import rng_for

CHUNK_CACHE_BYTES = 256 << 20  # LRU of whole chunks for shards read through h5py (compressed)


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

    def __init__(
        self,
        index: dict,
        patients: Iterable[str],
        max_patches: int = 0,
        seed: int = 0,
        cache_bytes: int = CHUNK_CACHE_BYTES,
        io: str = "auto",
    ):
        if io not in ("auto", "mmap", "h5py"):
            raise ValueError(f"io must be auto, mmap or h5py, not {io!r}")
        wanted = {str(p) for p in patients}
        known = {str(s["patient_id"]) for s in index["shards"]}
        missing = sorted(wanted - known)
        if missing:
            raise InputError(
                index.get("path") or f"cohort index {index.get('cohort')!r}",
                f"patients {missing[:5]} have no shard in the index",
            )
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
            with open_checked(shard, self.class_names) as h5:  # the shard the index lists, or InputError
                ds = h5["patches"]
                self._check_layout(shard["path"], ds, sid)
                segs = row_segments(ds) if io != "h5py" else None
                if io == "mmap" and segs is None and ds.shape[0]:
                    raise InputError(
                        shard["path"],
                        "patches are compressed or chunked across patches; "
                        "cannot memory-map them (use io='auto' or 'h5py')",
                    )
                lab = h5["labels"][:]
                coords.append(h5["coords"][:])
            seg_of_row = np.full(len(lab), -1 - sid, dtype=np.int64)  # negative: read through h5py
            for first, n_rows, offset in segs or []:
                seg_of_row[first : first + n_rows] = len(self.segments)
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
        if len(set(heads)) == len(heads):  # already grouped: one copy per group
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

    def _read_groups(
        self, idx: np.ndarray, heads: list[int], cuts: list[int], out: np.ndarray, rows: np.ndarray | None = None
    ) -> None:
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
            pos = order[lo:hi]  # output positions served by this chunk
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
        ds.read_direct(block, np.s_[start:stop])  # whole chunk into a reused buffer
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
            part = idx[lo : lo + batch_size]
            yield part, self.read(part)


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _stratified_subset(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted positions of ``cap`` patches, per class proportional to its count (≥ 1 when possible)."""
    rng = rng_for(seed, "max_patches")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * cap / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    if cap >= len(classes):
        quota = np.maximum(quota, 1)
    for c in np.argsort(-(exact - quota), kind="stable"):  # largest remainders first
        if quota.sum() >= cap:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
    while quota.sum() > cap:  # the ≥ 1 floor overshot: trim the largest
        quota[np.argmax(quota)] -= 1
    keep = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(keep))

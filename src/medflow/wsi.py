"""WSI patch extraction: one slide → one labelled HDF5 shard + its extraction record (`medflow extract-wsi`).

Pipeline per slide: open with OpenSlide → level-0 mpp (metadata, else manifest, else cohort) → read
plan (pyramid level + optional resampling for the target µm/px) → tissue mask (Otsu or a user mask)
→ annotation polygons rasterised onto a coverage grid (cells of 1/8 patch) → per-patch tumour and
tissue coverage from integral images → label and sample (seeded random per class, or a grid) →
read the patches at OpenSlide's decode rate (raw ARGB buffer → RGB numpy, no PIL image per patch;
optional worker processes) → reject white/black/blurred patches → stream into a shard
(`medflow.shards.ShardWriter`) from a writer thread while the next batch decodes.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import ctypes
import itertools
import math
import mmap
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from . import annotations as ann_mod
from . import cohort as cohort_mod
from . import config as config_mod
from . import fsio, tissue
from .errors import InputError
from .records import JobRecord
from .shards import ShardWriter, read_attrs

JOB = "extract-wsi"
CELLS_PER_PATCH = 8        # coverage grid resolution: a patch spans 8×8 cells
WHITE_LEVEL = 220          # a pixel is "white" when all channels exceed this
BLACK_LEVEL = 25           # "black" when all channels are below this (also unscanned, transparent areas)
QUALITY_SAMPLES = 28       # white/black fractions are estimated on a ≈28×28 pixel lattice (±2 % at 0.5)
SPARE_FACTOR = 2           # random mode: candidates kept per class, relative to per_class (replace rejects)
READ_BATCH = 64            # patches per read batch handed to the writer


def config_sections(cohort: str) -> tuple[str, ...]:
    """Config sections whose change invalidates a slide's shard."""
    return ("wsi", "shards", f"cohorts.{cohort}")


# ---- slide access --------------------------------------------------------------------------------
def open_slide(path: str | Path):
    """OpenSlide handle; InputError naming the file for missing, unsupported or corrupt slides."""
    import openslide

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "slide file not found")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise InputError(path, "not a slide OpenSlide can read (unsupported or corrupt file)") from None
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise InputError(path, f"unreadable slide ({exc})") from None


def slide_mpp(slide: Any) -> float | None:
    """Level-0 µm/px from the slide metadata (mean of x and y), or None."""
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            v = float(slide.properties.get(key, ""))
        except ValueError:
            continue
        if math.isfinite(v) and v > 0:
            values.append(v)
    return sum(values) / len(values) if values else None


def level0_mpp(slide: Any, entry: cohort_mod.ImageEntry, cfg: dict, cohort: str) -> tuple[float, str]:
    """(mpp, source): slide metadata, else the manifest row, else ``cohorts.<name>.mpp``."""
    mpp = slide_mpp(slide)
    if mpp:
        return mpp, "slide"
    if entry.mpp:
        return float(entry.mpp), "manifest"
    cohort_mpp = cfg["cohorts"][cohort].get("mpp")
    if cohort_mpp:
        return float(cohort_mpp), "cohort"
    raise InputError(entry.image, f"no mpp metadata; set mpp in the manifest or cohorts.{cohort}.mpp")


@dataclass(frozen=True)
class ReadPlan:
    """How patches are read: ``read_size``² pixels at ``level``, resized to ``patch_size``² when they differ."""
    level: int
    level_downsample: float
    level0_mpp: float
    read_size: int
    patch_size: int

    @property
    def resample(self) -> bool:
        return self.read_size != self.patch_size

    @property
    def level_mpp(self) -> float:
        return self.level0_mpp * self.level_downsample

    @property
    def mpp(self) -> float:
        """µm/px of the stored patches."""
        return self.read_size * self.level_mpp / self.patch_size

    @property
    def footprint(self) -> float:
        """Patch edge in level-0 pixels."""
        return self.read_size * self.level_downsample


def choose_level(downsamples: Sequence[float], mpp0: float, target: float, patch_size: int,
                 tolerance: float, path: str | Path = "slide") -> ReadPlan:
    """Coarsest level whose mpp ≤ target (within ``tolerance``, relative); resample when not within it."""
    if target < mpp0 * (1 - tolerance):
        raise InputError(path, f"requested mpp impossible: {target} µm/px is finer than level 0 "
                               f"({mpp0:.4f} µm/px) beyond the tolerance {tolerance}")
    best = 0
    for i, ds in enumerate(downsamples):
        if mpp0 * ds <= target * (1 + tolerance):
            best = i
    ds = float(downsamples[best])
    level_mpp = mpp0 * ds
    if abs(level_mpp / target - 1) <= tolerance:
        read_size = patch_size
    else:
        read_size = int(round(patch_size * target / level_mpp))
    return ReadPlan(level=best, level_downsample=ds, level0_mpp=mpp0, read_size=read_size, patch_size=patch_size)


class RegionReader:
    """Reads RGB patches from one slide handle with as little Python work per patch as possible.

    Uses OpenSlide's raw ``openslide_read_region`` into a reused buffer, the same un-premultiplying
    conversion that ``OpenSlide.read_region`` applies, and one strided copy into the batch, so the
    pixels are identical to ``np.asarray(slide.read_region(...))[..., :3]``. Falls back to the public
    API when openslide-python's internals differ.
    """

    def __init__(self, slide: Any, plan: ReadPlan, path: str | Path):
        self.slide, self.plan, self.path = slide, plan, str(path)
        n = plan.read_size
        self._buf = np.empty((n, n), dtype=np.uint32)
        self._rgb_view = self._buf.view(np.uint8).reshape(n, n, 4)[..., :3]
        self._fast = None
        try:
            from openslide import _convert, lowlevel
            ptr = self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
            self._fast = (lowlevel._read_region, slide._osr, ptr, _convert.argb2rgba)
        except (ImportError, AttributeError):
            pass

    def read(self, coords: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(k, patch, patch, 3) uint8 for level-0 top-left ``coords`` (k, 2), into ``out`` if given."""
        import openslide

        plan, n = self.plan, self.plan.read_size
        if out is None:
            out = np.empty((len(coords), plan.patch_size, plan.patch_size, 3), dtype=np.uint8)
        x = y = 0
        try:
            if self._fast is not None:
                read_region, osr, ptr, to_rgba = self._fast
                for i, (x, y) in enumerate(coords.tolist()):
                    read_region(osr, ptr, x, y, plan.level, n, n)
                    to_rgba(self._buf)
                    out[i] = self._rgb_view if not plan.resample else _resize(self._rgb_view, plan.patch_size)
            else:
                for i, (x, y) in enumerate(coords.tolist()):
                    rgb = np.asarray(self.slide.read_region((x, y), plan.level, (n, n)))[..., :3]
                    out[i] = rgb if not plan.resample else _resize(rgb, plan.patch_size)
        except openslide.OpenSlideError as exc:
            raise InputError(self.path, f"decode error reading ({x}, {y}) at level {plan.level} ({exc})") from None
        return out


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """The documented resampling: PIL Lanczos (antialiasing) from read_size² to size²."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.Resampling.LANCZOS))


def read_patches(slide: Any, plan: ReadPlan, coords: np.ndarray, path: str | Path = "slide") -> np.ndarray:
    """Patches at ``coords`` exactly as extraction stores them."""
    return RegionReader(slide, plan, path).read(np.asarray(coords, dtype=np.int64).reshape(-1, 2))


# ---- planning: masks, coverage, labels, sampling ------------------------------------------------
@dataclass
class Coverage:
    """Per top-left cell of the coverage grid: counts of tumour and tissue cells under the patch."""
    cell: float                 # level-0 px per cell
    k: int                      # cells per patch edge
    tumour: np.ndarray          # (gh-k+1, gw-k+1) uint16 counts
    tissue: np.ndarray          # same shape
    other: np.ndarray           # same shape: cells inside polygons of groups that are neither tumour nor exclusion


@dataclass
class SlideAnnotations:
    """A slide's polygons by role: tumour, exclusion (subtracted from tumour), other (never sampled as normal)."""
    tumour: list[ann_mod.Polygon]
    exclude: list[ann_mod.Polygon]
    other: list[ann_mod.Polygon]

    @property
    def other_groups(self) -> list[str]:
        return sorted({p.group for p in self.other})


def _box_counts(mask: np.ndarray, k: int) -> np.ndarray:
    """Number of True cells in every k×k window, indexed by the window's top-left cell."""
    if not mask.any():      # unannotated slides: skip the integral image
        return np.zeros((mask.shape[0] - k + 1, mask.shape[1] - k + 1), dtype=np.uint16)
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=s[1:, 1:])
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]).astype(np.uint16)


def tissue_on_grid(tm: tissue.TissueMask, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Nearest-neighbour resampling of the tissue mask onto the coverage grid (cell centres)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * cell / tm.cell).astype(np.int64), tm.mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * cell / tm.cell).astype(np.int64), tm.mask.shape[1] - 1)
    return tm.mask[np.ix_(rows, cols)]


def coverage(dims: tuple[int, int], plan: ReadPlan, tm: tissue.TissueMask, ann: SlideAnnotations,
             tumour_on_tissue: bool) -> Coverage:
    k = CELLS_PER_PATCH
    cell = plan.footprint / k
    gw, gh = int(dims[0] // cell), int(dims[1] // cell)
    if gw < k or gh < k:
        raise InputError(None, f"slide {dims[0]}×{dims[1]} is smaller than one patch "
                               f"({plan.footprint:.0f} level-0 px)")
    tissue_grid = tissue_on_grid(tm, (gh, gw), cell)
    tumour_grid = ann_mod.rasterize(ann.tumour, (gh, gw), cell, exclude=ann.exclude)
    if tumour_on_tissue:
        tumour_grid &= tissue_grid
    other_grid = ann_mod.rasterize(ann.other, (gh, gw), cell)
    return Coverage(cell=cell, k=k, tumour=_box_counts(tumour_grid, k), tissue=_box_counts(tissue_grid, k),
                    other=_box_counts(other_grid, k))


def label_map(cov: Coverage, labels_cfg: dict) -> np.ndarray:
    """Per top-left cell: 1 = tumour, 0 = normal, -1 = neither (skipped).

    Normal needs zero tumour and zero coverage by unrecognised annotation groups: an outline whose
    group name is not configured might be tumour under another name, so it is never called normal.
    """
    area = cov.k * cov.k
    out = np.full(cov.tumour.shape, -1, dtype=np.int8)
    normal_tissue = math.ceil(labels_cfg["normal_tissue_min"] * area - 1e-9)
    out[(cov.tumour == 0) & (cov.other == 0) & (cov.tissue >= normal_tissue)] = 0
    out[cov.tumour >= max(1, math.ceil(labels_cfg["tumour_min"] * area - 1e-9))] = 1
    return out


@dataclass
class Candidates:
    """Patches to try, per class in the order to try them, and how many of each class to keep."""
    coords: dict[int, np.ndarray]       # class → (m, 2) int64 level-0 (x, y)
    quota: dict[int, int]               # class → patches wanted (grid: all candidates)

    @property
    def total(self) -> int:
        return sum(len(c) for c in self.coords.values())


def slide_rng(cfg: dict, image_id: str) -> np.random.Generator:
    """The slide's random stream: config seed combined with the image id (order-independent)."""
    return config_mod.rng_for(cfg["seed"], "wsi", image_id)


def _cells_to_coords(cells_rc: np.ndarray, cell: float) -> np.ndarray:
    return np.round(cells_rc[:, ::-1] * cell).astype(np.int64)   # (row, col) → (x, y)


def sample_random(labels: np.ndarray, cell: float, per_class: int, rng: np.random.Generator,
                  n_classes: int) -> Candidates:
    """Uniform over the valid top-left cells of each class, without replacement; spares kept for rejects."""
    coords, quota = {}, {}
    for c in range(n_classes):
        flat = np.flatnonzero(labels.ravel() == c)
        take = min(len(flat), per_class * SPARE_FACTOR + 8)
        picked = rng.choice(flat, size=take, replace=False) if take else flat[:0]
        rc = np.stack(np.unravel_index(picked, labels.shape), axis=1)
        coords[c] = _cells_to_coords(rc, cell)
        quota[c] = min(per_class, take)
    return Candidates(coords, quota)


def sample_grid(labels: np.ndarray, cov: Coverage, dims: tuple[int, int], footprint: float, overlap: float,
                max_patches: int, rng: np.random.Generator, n_classes: int) -> Candidates:
    """Regular tiling with stride footprint·(1-overlap); a patch's label from the nearest grid cell."""
    stride = footprint * (1 - overlap)
    xs = np.arange(0, dims[0] - footprint + 1e-6, stride)
    ys = np.arange(0, dims[1] - footprint + 1e-6, stride)
    gx, gy = np.meshgrid(xs, ys)
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    rows = np.minimum(np.round(xy[:, 1] / cov.cell).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(np.round(xy[:, 0] / cov.cell).astype(np.int64), labels.shape[1] - 1)
    lab = labels[rows, cols]
    keep = np.flatnonzero(lab >= 0)
    if max_patches and len(keep) > max_patches:
        keep = np.sort(rng.choice(keep, size=max_patches, replace=False))
    coords = np.round(xy[keep]).astype(np.int64)
    lab = lab[keep]
    by_class = {c: coords[lab == c] for c in range(n_classes)}
    return Candidates(by_class, {c: len(v) for c, v in by_class.items()})


# ---- quality -------------------------------------------------------------------------------------
def quality_ok(patches: np.ndarray, quality_cfg: dict) -> np.ndarray:
    """Boolean (k,): not mostly white, not mostly black, and (if enabled) sharp enough."""
    stride = max(1, patches.shape[1] // QUALITY_SAMPLES)   # 224² → every 8th pixel: ~0.02 ms/patch
    sub = patches[:, ::stride, ::stride]
    r, g, b = sub[..., 0], sub[..., 1], sub[..., 2]   # elementwise per channel: ~8× faster than min(-1)
    white = ((r > WHITE_LEVEL) & (g > WHITE_LEVEL) & (b > WHITE_LEVEL)).mean(axis=(1, 2))
    black = ((r < BLACK_LEVEL) & (g < BLACK_LEVEL) & (b < BLACK_LEVEL)).mean(axis=(1, 2))
    ok = (white <= quality_cfg["max_white"]) & (black <= quality_cfg["max_black"])
    if quality_cfg["min_sharpness"] > 0:
        ok &= sharpness(patches) >= quality_cfg["min_sharpness"]
    return ok


def sharpness(patches: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of the grey image, per patch (blur → low)."""
    grey = patches.astype(np.float32).mean(axis=-1)
    lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
           - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:])
    return lap.var(axis=(1, 2))


# ---- parallel reading ----------------------------------------------------------------------------
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
        _WORKER["reader"].read(coords, out=_WORKER["slots"][slot, :len(coords)])
        return slot, None
    except InputError as exc:       # InputError does not pickle (two-argument constructor)
        return slot, exc.problem


class PatchSource:
    """Reads coordinate batches in this process, or in ``workers`` forked processes (each with its own
    OpenSlide handle) that decode straight into slots of an anonymous shared mapping (no pickling of
    pixels); at most 2 batches per worker are in flight and batches come back in order."""

    def __init__(self, path: str | Path, slide: Any, plan: ReadPlan, workers: int,
                 cache_bytes: int | None = None):
        self.path, self.plan, self.workers = str(path), plan, workers
        self.reader = RegionReader(slide, plan, path)
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        if workers > 1:
            n_slots, p = 2 * workers, plan.patch_size
            # MAP_SHARED|MAP_ANONYMOUS, created before the fork: children write, the parent sees it.
            self._mmap = mmap.mmap(-1, n_slots * READ_BATCH * p * p * 3)
            self.slots = np.frombuffer(self._mmap, dtype=np.uint8).reshape(n_slots, READ_BATCH, p, p, 3)
            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork"),
                initializer=_worker_init, initargs=(self.path, plan, cache_bytes, self.slots))

    def batches(self, coords: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        chunks = [coords[i:i + READ_BATCH] for i in range(0, len(coords), READ_BATCH)]
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
            patches = self.slots[slot, :len(chunk)].copy()    # the writer thread keeps it; the slot is reused
            if (nxt := next(todo, None)) is not None:
                in_flight.append((nxt, self.pool.submit(_worker_read, slot, nxt)))
            yield chunk, patches

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            del self.slots
            with contextlib.suppress(BufferError):   # a view may still be referenced: freed with it
                self._mmap.close()


class BackgroundWriter:
    """Appends batches to a ShardWriter from a thread, so HDF5 writes overlap the next decode."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self.seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="shard-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            t0 = time.perf_counter()
            try:
                self.writer.append(*item)
            except BaseException as exc:  # re-raised in the main thread by close()
                self._error = exc
            self.seconds += time.perf_counter() - t0

    def put(self, patches: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((patches, coords, labels))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def read_into(source: PatchSource, cand: Candidates, quality_cfg: dict,
              sink: BackgroundWriter) -> tuple[dict[int, int], int]:
    """Fill each class's quota from its candidates, in rounds: read the next ones in slide order,
    drop quality rejects, replace them from the spares. Returns (accepted per class, patches read)."""
    taken = {c: 0 for c in cand.coords}       # candidates consumed per class
    kept = {c: 0 for c in cand.coords}
    while True:
        want = {c: min(cand.quota[c] - kept[c], len(cand.coords[c]) - taken[c]) for c in cand.coords}
        if sum(want.values()) <= 0:
            return kept, sum(taken.values())
        parts = [(cand.coords[c][taken[c]:taken[c] + n], c) for c, n in want.items() if n > 0]
        coords = np.concatenate([p for p, _ in parts])
        labels = np.concatenate([np.full(len(p), c, dtype=np.int64) for p, c in parts])
        for c, n in want.items():
            taken[c] += max(n, 0)
        order = np.lexsort((coords[:, 0], coords[:, 1]))    # row-major: neighbours share tiles
        coords, labels = coords[order], labels[order]
        offset = 0
        for chunk, patches in source.batches(coords):
            lab = labels[offset:offset + len(chunk)]
            offset += len(chunk)
            ok = quality_ok(patches, quality_cfg)
            if not ok.all():
                patches, chunk, lab = patches[ok], chunk[ok], lab[ok]
            for c, n in zip(*np.unique(lab, return_counts=True)):
                kept[int(c)] += int(n)
            sink.put(patches, chunk, lab)


# ---- one slide end to end ------------------------------------------------------------------------
@dataclass
class SlideInputs:
    """Hashes of everything besides the config that determines a shard (for resumable runs)."""
    source_sha256: str
    source_bytes: int
    annotation_sha256: str = ""
    mask_sha256: str = ""
    manifest_mpp: float = 0.0

    def matches(self, attrs: dict) -> bool:
        return (attrs.get("source_sha256") == self.source_sha256
                and attrs.get("annotation_sha256", "") == self.annotation_sha256
                and attrs.get("mask_sha256", "") == self.mask_sha256
                and float(attrs.get("manifest_mpp", 0.0) or 0.0) == self.manifest_mpp)


def slide_inputs(entry: cohort_mod.ImageEntry) -> SlideInputs:
    image = Path(entry.image)
    if not image.is_file():
        raise InputError(image, "slide file not found")
    for p in (entry.annotation, entry.mask):
        if p and not Path(p).is_file():
            raise InputError(p, "file listed in the manifest not found")
    return SlideInputs(source_sha256=fsio.sha256_file(image), source_bytes=image.stat().st_size,
                       annotation_sha256=fsio.sha256_file(entry.annotation) if entry.annotation else "",
                       mask_sha256=fsio.sha256_file(entry.mask) if entry.mask else "",
                       manifest_mpp=float(entry.mpp or 0.0))


def existing_shard_matches(out: Path, config_hash: str, inputs: SlideInputs) -> dict | None:
    """The shard's attrs if ``out`` is a finished shard of the same config and inputs, else None."""
    if not out.is_file():
        return None
    import h5py
    try:
        with h5py.File(out, "r") as h5:
            attrs = read_attrs(h5)
            attrs["_labels"] = h5["labels"][:]
    except (OSError, KeyError):
        return None
    if attrs.get("config_hash") != config_hash or not inputs.matches(attrs):
        return None
    return attrs


def _class_names(cfg: dict) -> list[str]:
    return list(cfg["wsi"]["labels"]["classes"])


def _counts(labels: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    return {name: int(counts[i]) for i, name in enumerate(names)}


def _tissue_mask(slide: Any, entry: cohort_mod.ImageEntry, mpp0: float, wsi_cfg: dict) -> tissue.TissueMask:
    import openslide

    tcfg = wsi_cfg["tissue"]
    if entry.mask:
        tm = tissue.user_mask(entry.mask, *slide.dimensions)
    elif tcfg["method"] == "mask":
        raise InputError(entry.image, "wsi.tissue.method is 'mask' but the manifest row has no mask")
    else:
        try:
            tm = tissue.otsu_mask(slide, mpp0, tcfg)
        except openslide.OpenSlideError as exc:
            raise InputError(entry.image, f"decode error while building the tissue mask ({exc})") from None
    if not tm.mask.any():
        raise InputError(entry.mask or entry.image, f"no tissue found (threshold {tm.threshold:.1f} on "
                                                    f"{tcfg['channel']}; adjust wsi.tissue or supply a mask)")
    return tm


def _annotations(entry: cohort_mod.ImageEntry, dims: tuple[int, int], labels_cfg: dict) -> SlideAnnotations:
    if not entry.annotation:
        return SlideAnnotations([], [], [])
    polygons = ann_mod.load(entry.annotation)
    ann_mod.check_inside(entry.annotation, polygons, *dims)
    known = {*labels_cfg["tumour_groups"], *labels_cfg["exclude_groups"]}
    result = SlideAnnotations(ann_mod.select(polygons, labels_cfg["tumour_groups"]),
                              ann_mod.select(polygons, labels_cfg["exclude_groups"]),
                              [p for p in polygons if p.group not in known])
    if result.other:
        print(f"{JOB}: warning: {entry.annotation}: groups {result.other_groups} are neither tumour_groups "
              f"nor exclude_groups; their area is not sampled")
    return result


def extract_slide(entry: cohort_mod.ImageEntry, cfg: dict, cohort: str, out: str | Path,
                  record_path: str | Path, *, cache_bytes: int | None = None,
                  force: bool = False) -> dict:
    """Extract one slide into ``out`` and write its record; returns the record.

    ``cache_bytes`` sets OpenSlide's tile cache (0 disables it; None keeps the default), for
    benchmarks. ``force`` ignores an up-to-date shard. With ``wsi.on_error: skip`` a bad input
    gives a ``failed`` record and no shard; with ``fail`` the InputError propagates and nothing is written.
    """
    out, record_path = Path(out), Path(record_path)
    rec = JobRecord(JOB, cfg, config_sections(cohort), image_id=entry.image_id, patient_id=entry.patient_id,
                    cohort=cohort, shard=None, error=None, n_patches=0,
                    counts={n: 0 for n in _class_names(cfg)})
    try:
        _extract(entry, cfg, out, record_path, rec, cache_bytes, force)
    except InputError as exc:
        if cfg["wsi"]["on_error"] != "skip":
            raise
        rec["error"] = str(exc)
        rec.finish("failed").save(record_path)
        print(f"{JOB}: {entry.image_id}: skipped bad input (on_error: skip): {exc}")
    return dict(rec)


def _extract(entry: cohort_mod.ImageEntry, cfg: dict, out: Path, record_path: Path, rec: JobRecord,
             cache_bytes: int | None, force: bool) -> None:
    wsi_cfg, names = cfg["wsi"], _class_names(cfg)
    with rec.timed("hash"):
        inputs = slide_inputs(entry)
    if not force and (attrs := existing_shard_matches(out, rec["config_hash"], inputs)) is not None:
        _record_from_shard(rec, attrs, out, record_path, names)
        print(f"{JOB}: {out} is up to date (same config hash {rec['config_hash']} and source sha256); skipped")
        return
    with rec.timed("open"):
        slide = open_slide(entry.image)
        if cache_bytes is not None:
            import openslide
            slide.set_cache(openslide.OpenSlideCache(cache_bytes))
        mpp0, mpp_source = level0_mpp(slide, entry, cfg, rec["cohort"])
        plan = choose_level(slide.level_downsamples, mpp0, wsi_cfg["mpp"], wsi_cfg["patch_size"],
                            wsi_cfg["mpp_tolerance"], entry.image)
    dims = tuple(slide.dimensions)
    with rec.timed("mask"):
        tm = _tissue_mask(slide, entry, mpp0, wsi_cfg)
    with rec.timed("annotations"):
        ann = _annotations(entry, dims, wsi_cfg["labels"])
        try:
            cov = coverage(dims, plan, tm, ann, wsi_cfg["labels"]["tumour_on_tissue"])
        except InputError as exc:
            raise InputError(entry.image, exc.problem) from None
    with rec.timed("sampling"):
        labels = label_map(cov, wsi_cfg["labels"])
        cand = _sample(labels, cov, dims, plan, wsi_cfg, slide_rng(cfg, entry.image_id), len(names))
    if cand.total == 0:
        raise InputError(entry.image, "no patch meets the tissue/label thresholds (wsi.labels, wsi.tissue)")
    attrs = _shard_attrs(entry, cfg, rec, plan, inputs, mpp_source, tm)
    kept = _read_and_write(entry, cfg, out, slide, plan, cand, attrs, rec, cache_bytes)
    slide.close()
    n = sum(kept.values())
    rec.update(shard=os.path.relpath(out.resolve(), record_path.resolve().parent), n_patches=n,
               counts={names[c]: kept.get(c, 0) for c in range(len(names))},
               wsi={**_wsi_summary(plan, mpp_source, tm, cand), "unsampled_groups": ann.other_groups})
    rec.finish("ok")
    _throughput(rec, n, out.stat().st_size)
    rec.save(record_path)
    print(f"{JOB}: {entry.image_id}: {n} patches {rec['counts']} at {plan.mpp:.3f} µm/px "
          f"(level {plan.level}{', resampled' if plan.resample else ''}) → {out}")


def _sample(labels: np.ndarray, cov: Coverage, dims: tuple[int, int], plan: ReadPlan, wsi_cfg: dict,
            rng: np.random.Generator, n_classes: int) -> Candidates:
    scfg = wsi_cfg["sampling"]
    if scfg["mode"] == "random":
        return sample_random(labels, cov.cell, scfg["per_class"], rng, n_classes)
    return sample_grid(labels, cov, dims, plan.footprint, scfg["overlap"], scfg["max_patches"], rng, n_classes)


def _shard_attrs(entry: cohort_mod.ImageEntry, cfg: dict, rec: JobRecord, plan: ReadPlan,
                 inputs: SlideInputs, mpp_source: str, tm: tissue.TissueMask) -> dict[str, Any]:
    return {"kind": "wsi", "image_id": entry.image_id, "patient_id": entry.patient_id, "cohort": rec["cohort"],
            "class_names": _class_names(cfg), "patch_size": plan.patch_size, "channels": 3,
            "mpp": plan.mpp, "level": plan.level, "downsample": plan.level_downsample,
            "read_size": plan.read_size, "level0_mpp": plan.level0_mpp, "mpp_source": mpp_source,
            "resampling": "lanczos" if plan.resample else "none",
            "source_path": str(Path(entry.image).resolve()), "source_bytes": inputs.source_bytes,
            "source_sha256": inputs.source_sha256, "annotation_sha256": inputs.annotation_sha256,
            "mask_sha256": inputs.mask_sha256, "manifest_mpp": inputs.manifest_mpp,
            "tissue_threshold": tm.threshold, "seed": cfg["seed"], "config_hash": rec["config_hash"]}


def _read_and_write(entry: cohort_mod.ImageEntry, cfg: dict, out: Path, slide: Any, plan: ReadPlan,
                    cand: Candidates, attrs: dict, rec: JobRecord, cache_bytes: int | None) -> dict[int, int]:
    # The pool is forked before the writer thread and the HDF5 file exist.
    source = PatchSource(entry.image, slide, plan, cfg["wsi"]["workers"], cache_bytes)
    try:
        t0 = time.perf_counter()
        with ShardWriter(out, (plan.patch_size, plan.patch_size, 3), "uint8", attrs,
                         chunk_patches=cfg["shards"]["chunk_patches"],
                         compression=cfg["shards"]["compression"]) as writer:
            sink = BackgroundWriter(writer)
            try:
                kept, n_read = read_into(source, cand, cfg["wsi"]["quality"], sink)
            finally:
                t_read = time.perf_counter() - t0
                sink.close()
            if writer.n == 0:
                raise InputError(entry.image, "every candidate patch was rejected as white/black/blurred "
                                              "(wsi.quality)")
            timings = {**rec["timings_s"], "read": t_read}
            writer.attrs["timings_s"] = timings
            t_close = time.perf_counter()
        close_s = time.perf_counter() - t_close
    finally:
        source.close()
    rec["timings_s"]["read"] = t_read
    # write = time the writer thread spent appending (overlapped with reading) + flush/fsync/rename.
    rec["timings_s"]["write"] = sink.seconds + close_s
    rec["timings_s"]["extract"] = time.perf_counter() - t0
    rec["patches_read"] = n_read
    rec["quality_rejected"] = n_read - sum(kept.values())
    return kept


def _wsi_summary(plan: ReadPlan, mpp_source: str, tm: tissue.TissueMask, cand: Candidates) -> dict[str, Any]:
    return {"level": plan.level, "downsample": plan.level_downsample, "read_size": plan.read_size,
            "patch_size": plan.patch_size, "mpp": plan.mpp, "level0_mpp": plan.level0_mpp,
            "mpp_source": mpp_source, "resampled": plan.resample, "tissue_fraction": tm.fraction,
            "tissue_threshold": tm.threshold, "candidates": cand.total}


def _throughput(rec: JobRecord, n: int, nbytes: int) -> None:
    """s_per_patch: the whole job's wall time per stored patch; patches_per_s: read + write phase only."""
    t = rec["timings_s"]
    rec["throughput"] = {"s_per_patch": rec["wall_s"] / n if n and rec.get("wall_s") else None,
                         "patches_per_s": n / t["extract"] if n and t.get("extract") else None,
                         "bytes_written": nbytes}


def _record_from_shard(rec: JobRecord, attrs: dict, out: Path, record_path: Path, names: list[str]) -> None:
    """Resumed job: keep a good existing record, else rebuild it from the shard."""
    if record_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            old = fsio.read_json(record_path)
            if old.get("status") == "ok" and old.get("config_hash") == rec["config_hash"]:
                rec.clear()
                rec.update(old)
                return
    labels = attrs.pop("_labels")
    rec.update(shard=os.path.relpath(out.resolve(), record_path.resolve().parent), n_patches=int(len(labels)),
               counts=_counts(labels, names), resumed=True)
    rec["timings_s"].update(attrs.get("timings_s") or {})
    rec.finish("ok")
    _throughput(rec, int(len(labels)), out.stat().st_size)
    rec.save(record_path)


# ---- CLI -----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="effective config YAML")
    p.add_argument("--cohort", required=True, help="cohort name (cohorts.<name> in the config)")
    p.add_argument("--image-id", required=True, help="image_id of the manifest row")
    p.add_argument("--out", required=True, help="shard to write (<image_id>.h5)")
    p.add_argument("--record", required=True, help="extraction record to write (<image_id>.record.json)")
    p.add_argument("--force", action="store_true", help="re-extract even if the shard is up to date")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    entry = cohort_mod.entry(cfg, args.cohort, args.image_id)
    extract_slide(entry, cfg, args.cohort, args.out, args.record, force=args.force)
    return 0

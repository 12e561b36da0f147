"""Hyperspectral chain and patch extraction (`medflow extract-hsi`).

Chain (each step switchable in ``hsi.chain``; vectorised NumPy, float32):
  1. calibrate   I_c = (I − D) / (W − D) on the mosaic's active area; pixels with W == D → 0
  2. demosaic    s×s snapshot mosaic → cube (rows/s, cols/s, s²); band b = mosaic position band_order[b]
  3. correct     every pixel spectrum (row vector) times the bands×bands correction matrix: s' = s · M
  4. normalise   divide each spectrum by its RMS over bands; all-zero spectra stay 0
Cubes (ENVI, .mat, 3-D .npy) enter at step 3. The steps run on blocks of cube rows so intermediates
stay in cache. Patches k×k×B centred on labelled pixels (all, or a seeded stratified subsample) are
gathered from a zero-copy ``sliding_window_view`` of the cube (padded with NumPy 'reflect' only when
a centre is near the border) and streamed into a shard via ``medflow.shards.ShardWriter``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import config as config_mod, fsio, hsi_io
from .cohort import ImageEntry, entry as cohort_entry
from .errors import InputError
from .records import JobRecord
from .shards import ShardWriter, open_shard, read_attrs

STEPS = ("calibrate", "demosaic", "correct", "normalise")
TIMING_KEYS = ("load", "calibrate", "demosaic", "correct", "normalise", "patches", "write")
CAMERA_WAVELENGTHS_NM = np.linspace(665.0, 975.0, 25)   # the 5×5 snapshot camera's band centres
CONFIG_SECTIONS = ("hsi", "shards", "cohorts")
WRITE_BLOCK = 4096                                     # patches gathered and written per block
CHAIN_BLOCK_ROWS = 8                                   # cube rows per chain block (~0.5 MB: fits L2)


# ---- chain steps (pure functions) ---------------------------------------------------------------------
def active_area(mosaic: np.ndarray, offset: tuple[int, int], crop: tuple[int, int]) -> np.ndarray:
    """The sensor's active area as a view: ``offset`` (row, col), ``crop`` (height, width), 0 = to the end."""
    r0, c0 = int(offset[0]), int(offset[1])
    h = int(crop[0]) or mosaic.shape[0] - r0
    w = int(crop[1]) or mosaic.shape[1] - c0
    if r0 + h > mosaic.shape[0] or c0 + w > mosaic.shape[1] or h <= 0 or w <= 0:
        raise ValueError(f"active area offset {tuple(offset)} crop {tuple(crop)} exceeds the frame {mosaic.shape}")
    return mosaic[r0:r0 + h, c0:c0 + w]


def calibrate(raw: np.ndarray, white: np.ndarray, dark: np.ndarray) -> tuple[np.ndarray, int]:
    """Reflectance (I − D) / (W − D) as float32, and the number of dead pixels (W == D, set to 0)."""
    out = np.subtract(raw, dark, dtype=np.float32)
    den = np.subtract(white, dark, dtype=np.float32)
    if den.all():                                  # the common case: one cheap test, no mask kept
        np.divide(out, den, out=out)
        return out, 0
    dead = den == 0
    np.divide(out, den, out=out, where=~dead)
    out[dead] = 0.0
    return out, int(np.count_nonzero(dead))


def band_positions(size: int, band_order: list[int] | tuple[int, ...] | None) -> list[int]:
    """Mosaic position (row-major within the size×size tile) of each output band; [] = identity."""
    order = list(band_order or range(size * size))
    if any(p < 0 or p >= size * size for p in order) or len(set(order)) != len(order):
        raise ValueError(f"band_order must list distinct positions in 0..{size * size - 1}, got {order}")
    return order


def demosaic(mosaic: np.ndarray, size: int, band_order: list[int] | None = None) -> np.ndarray:
    """(rows, cols) mosaic → (rows/size, cols/size, bands) float32 cube.

    Output band b holds the pixels at tile position p = band_order[b], i.e. mosaic[r·s + p//s, c·s + p%s].
    """
    rows, cols = mosaic.shape
    if rows % size or cols % size:
        raise ValueError(f"mosaic {rows}×{cols} is not a multiple of the {size}×{size} pattern")
    order = band_positions(size, band_order)
    src = np.asarray(mosaic, dtype=np.float32)
    try:
        # Each tile row's `size` pixels are contiguous: move them as one opaque item (2× faster than
        # NumPy's element-wise transpose); then (r, i, c) → (r, c, i) is a plain item transpose.
        rowruns = src.view(f"V{size * src.itemsize}").reshape(rows // size, size, cols // size)
        cube = np.ascontiguousarray(rowruns.transpose(0, 2, 1)).view(np.float32)
    except ValueError:   # last axis not contiguous (an odd crop view): element-wise transpose
        cube = np.ascontiguousarray(src.reshape(rows // size, size, cols // size, size).transpose(0, 2, 1, 3))
    cube = cube.reshape(rows // size, cols // size, size * size)
    if order != list(range(size * size)):
        cube = np.take(cube, order, axis=2)
    return cube


def correct(cube: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Each spectrum (row vector) times the correction matrix: s' = s · M (one SGEMM)."""
    bands = cube.shape[-1]
    if matrix.shape != (bands, bands):
        raise ValueError(f"correction matrix {matrix.shape} does not fit {bands} bands")
    # No `out=`: NumPy's matmul with an output argument can miss the BLAS path (15× slower here).
    return (cube.reshape(-1, bands) @ matrix.astype(np.float32, copy=False)).reshape(cube.shape)


def normalise(cube: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Divide every spectrum by its RMS over bands (in place, or into ``out``); returns (result, number
    of zero-RMS pixels)."""
    inv = np.einsum("...b,...b->...", cube, cube)                        # sum of squares, no temporary cube
    zero = inv == 0
    n_zero = int(np.count_nonzero(zero))
    if n_zero:
        inv[zero] = 1.0                                                  # all-zero spectra stay zero
    inv /= cube.shape[-1]
    np.sqrt(inv, out=inv)
    np.reciprocal(inv, out=inv)                                          # one division per pixel, not per band
    out = cube if out is None else out
    np.multiply(cube, inv[..., None], out=out)
    return out, n_zero


# ---- labels and patches -------------------------------------------------------------------------------
def map_labels(gt: np.ndarray, class_map: dict[str, int], n_classes: int, path: str | Path) -> np.ndarray:
    """Ground-truth values → class ids (int64, −1 = unlabelled).

    Default (empty ``class_map``): value v ↦ class v−1, 0 (and negatives) unlabelled. With a map, unmapped
    values are unlabelled and a value mapped to −1 is ignored explicitly.
    """
    if gt.size == 0:
        return np.full(gt.shape, -1, dtype=np.int64)
    lo, hi = int(gt.min()), int(gt.max())
    if hi - lo < 1 << 20:                       # a lookup table over the value range (the usual case)
        index = gt - lo
        values = np.arange(lo, hi + 1)
        present = np.bincount(index.ravel(), minlength=len(values)) > 0
    else:                                       # a few huge/sparse values: table over the distinct ones
        values, inverse = np.unique(gt, return_inverse=True)
        index = inverse.reshape(gt.shape)
        present = np.ones(len(values), dtype=bool)
    if class_map:                               # `values` is sorted in both cases: place the keys by bisection
        keys = np.array([int(key) for key in class_map], dtype=np.int64)
        ids = np.array([int(cls) for cls in class_map.values()], dtype=np.int64)
        pos = np.minimum(np.searchsorted(values, keys), len(values) - 1)
        hit = values[pos] == keys
        classes = np.full(len(values), -1, dtype=np.int64)
        classes[pos[hit]] = ids[hit]
    else:
        classes = np.where(values > 0, values - 1, -1).astype(np.int64)
    too_big = values[present & (classes >= n_classes)]
    if too_big.size:
        raise InputError(path, f"ground-truth value(s) {too_big.tolist()} map to class ids beyond the {n_classes} "
                               f"class names (set hsi.class_map / hsi.class_names)")
    return classes[index]


def pixel_windows(cube: np.ndarray, k: int, pad: bool) -> tuple[np.ndarray, int]:
    """Every k×k×B window of ``cube`` as a zero-copy (H', W', k, k, B) view, and the offset to add to a
    pixel's (row, col) to index its window: with ``pad`` the cube is first padded by k//2 (NumPy
    'reflect': …2 1 | 0 1 2 …) so every pixel has one (H' = H); without, only pixels ≥ k//2 from the
    border do (H' = H − k + 1, offset −k//2)."""
    half = k // 2
    if pad:
        source, offset = np.pad(cube, ((half, half), (half, half), (0, 0)), mode="reflect"), 0
    else:
        source, offset = cube, -half
    return sliding_window_view(source, (k, k, cube.shape[2]))[:, :, 0], offset


def extract_patches(cube: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """(N, k, k, B) windows of ``cube`` centred on (rows, cols), reflected at the border: one gather."""
    rows, cols = np.asarray(rows), np.asarray(cols)
    half = k // 2
    near_border = len(rows) and (rows.min() < half or cols.min() < half or
                                 rows.max() >= cube.shape[0] - half or cols.max() >= cube.shape[1] - half)
    windows, offset = pixel_windows(cube, k, pad=bool(near_border))   # pad (a cube copy) only when needed
    return windows[rows + offset, cols + offset]


def select_pixels(labels: np.ndarray, k: int, border: str, per_class: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labelled pixel centres (rows, cols) in raster order; border=skip drops windows crossing the edge;
    per_class > 0 keeps a seeded random subsample of at most that many per class."""
    flat = np.flatnonzero(labels.ravel() >= 0)
    rows, cols = np.divmod(flat, labels.shape[1])
    if border == "skip":
        half = k // 2
        keep = ((rows >= half) & (rows < labels.shape[0] - half) & (cols >= half) & (cols < labels.shape[1] - half))
        flat = flat[keep]
    if per_class > 0:
        cls = labels.ravel()[flat]
        picked = []
        for c in np.unique(cls):
            members = flat[cls == c]
            if len(members) > per_class:
                members = rng.choice(members, size=per_class, replace=False)
            picked.append(members)
        flat = np.sort(np.concatenate(picked)) if picked else flat[:0]
    return np.divmod(flat, labels.shape[1])


# ---- config -------------------------------------------------------------------------------------------
def check_config(hcfg: dict) -> None:
    """What the schema cannot say: odd patch size, valid band order, integer class_map keys."""
    if hcfg["patch"] % 2 == 0:
        raise InputError("config", f"hsi.patch must be odd (a centre pixel), got {hcfg['patch']}")
    mosaic = hcfg["mosaic"]
    try:
        band_positions(mosaic["size"], mosaic["band_order"])
    except ValueError as exc:
        raise InputError("config", f"hsi.mosaic.band_order: {exc}") from None
    for key, cls in hcfg["class_map"].items():
        try:
            int(key)
        except ValueError:
            raise InputError("config", f"hsi.class_map key {key!r} is not an integer ground-truth value") from None
        if cls < -1 or cls >= len(hcfg["class_names"]):
            raise InputError("config", f"hsi.class_map[{key}] = {cls} is not a class id "
                                       f"(−1 or 0..{len(hcfg['class_names']) - 1})")


def band_wavelengths(hcfg: dict, bands: int, from_file: list[float], demosaiced: bool) -> list[float]:
    """Config wavelengths, else the file's (ENVI header), else the 5×5 camera's for its 25 bands, else []."""
    if hcfg["wavelengths"]:
        if len(hcfg["wavelengths"]) != bands:
            raise InputError("config", f"hsi.wavelengths lists {len(hcfg['wavelengths'])} values for {bands} bands")
        return [float(w) for w in hcfg["wavelengths"]]
    if from_file:
        return list(from_file)
    if demosaiced and bands == 25 and not hcfg["mosaic"]["band_order"]:
        return [float(w) for w in CAMERA_WAVELENGTHS_NM]
    return []


# ---- the whole chain on one manifest entry ----------------------------------------------------------------
@dataclass
class ChainResult:
    cube: np.ndarray                     # float32 (rows, cols, bands)
    labels: np.ndarray                   # int64 (rows, cols), −1 = unlabelled (all −1 without ground truth)
    timings: dict[str, float]
    chain: dict[str, Any]                # steps applied + their parameters and guard counts
    wavelengths: list[float]
    has_gt: bool = False
    source_kind: str = "cube"            # what the image file held: "mosaic" | "cube"


def _timer(timings: dict[str, float], key: str, t0: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - t0
    return now


def run_chain(entry: ImageEntry, cfg: dict) -> ChainResult:
    """Load one image (+ references, + ground truth) and apply the configured chain."""
    hcfg = cfg["hsi"]
    check_config(hcfg)
    steps = hcfg["chain"]
    t0 = time.perf_counter()
    image = hsi_io.read_image(entry.image)
    matrix_path = hcfg["correction_matrix"]
    matrix = hsi_io.read_matrix(matrix_path) if steps["correct"] and matrix_path else None
    white = dark = None
    if image.kind == "mosaic" and steps["calibrate"]:
        if not entry.white or not entry.dark:
            raise InputError(entry.image, "calibration is on but the manifest gives no white/dark reference "
                                          "(set hsi.chain.calibrate: false for pre-calibrated mosaics)")
        white = hsi_io.read_reference(entry.white, image.data.shape)
        dark = hsi_io.read_reference(entry.dark, image.data.shape)
    gt = hsi_io.read_ground_truth(entry.annotation) if entry.annotation else None
    load_s = time.perf_counter() - t0
    cube, timings, chain, demosaiced = chain_cube(image.data, hcfg, white, dark, matrix,
                                                  {"image": entry.image, "white": entry.white, "matrix": matrix_path})
    t0 = time.perf_counter()
    labels = np.full(cube.shape[:2], -1, dtype=np.int64)
    if gt is not None:
        if gt.shape != cube.shape[:2]:
            raise InputError(entry.annotation,
                             f"ground-truth shape {gt.shape} differs from the cube's {cube.shape[:2]}")
        labels = map_labels(gt, hcfg["class_map"], len(hcfg["class_names"]), entry.annotation)
    timings["load"] = timings.get("load", 0.0) + load_s + time.perf_counter() - t0
    return ChainResult(cube=cube, labels=labels, timings=timings, chain=chain,
                       wavelengths=band_wavelengths(hcfg, cube.shape[2], image.wavelengths, demosaiced),
                       has_gt=gt is not None, source_kind=image.kind)


def _chain_block(cube: np.ndarray, active: np.ndarray, white: np.ndarray | None, dark: np.ndarray | None,
                 matrix: np.ndarray | None, r0: int, r1: int, step: int, order: list[int] | None, hcfg: dict,
                 timings: dict[str, float], sources: dict[str, str]) -> tuple[int, int]:
    """Chain steps for cube rows r0:r1, written into ``cube``; returns (dead pixels, zero-RMS pixels)."""
    rows = slice(r0 * step, r1 * step)
    dead = zero = 0
    t = time.perf_counter()
    block = active[rows]
    if white is not None and dark is not None:
        block, dead = calibrate(block, white[rows], dark[rows])
        t = _timer(timings, "calibrate", t)
    if order is not None:
        block = demosaic(block, hcfg["mosaic"]["size"], order)
    else:
        block = np.array(block, dtype=np.float32).reshape(r1 - r0, active.shape[1], cube.shape[2])
    t = _timer(timings, "demosaic", t)
    if matrix is not None:
        block = correct(block, matrix)
        if not np.isfinite(block).all():
            raise InputError(sources["matrix"], "spectral correction overflowed to inf")
        t = _timer(timings, "correct", t)
    if hcfg["chain"]["normalise"]:
        _, zero = normalise(block, out=cube[r0:r1])
        _timer(timings, "normalise", t)
    else:
        cube[r0:r1] = block
    return dead, zero


@functools.lru_cache(maxsize=1)
def _threadpools() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def single_threaded_blas() -> Any:
    """BLAS limited to one thread: the 25×25 products are tiny, and idle BLAS threads spin-waiting
    between blocks steal the core the rest of the chain runs on (one core per job on a cluster)."""
    return _threadpools().limit(limits=1, user_api="blas")


def chain_cube(data: np.ndarray, hcfg: dict, white: np.ndarray | None = None, dark: np.ndarray | None = None,
               matrix: np.ndarray | None = None, sources: dict[str, str] | None = None
               ) -> tuple[np.ndarray, dict[str, float], dict[str, Any], bool]:
    """The configured chain on in-memory arrays: a 2-D mosaic (with white/dark when calibrating) or a
    (rows, cols, bands) cube. Returns (float32 cube, step timings, chain description, demosaiced?).
    ``sources`` names the files behind the arrays for error messages.

    The four steps run block by block (CHAIN_BLOCK_ROWS cube rows at a time, each step vectorised over
    the block) so a block's intermediates stay in the CPU cache instead of streaming the whole frame
    through memory once per step; results are identical to whole-frame processing.
    """
    sources = {"image": "image", "white": "white", "matrix": "correction matrix", **(sources or {})}
    steps, mcfg = hcfg["chain"], hcfg["mosaic"]
    timings = {k: 0.0 for k in STEPS}
    chain: dict[str, Any] = {s: False for s in STEPS}
    size = mcfg["size"]
    mosaic = data.ndim == 2
    calibrating = mosaic and steps["calibrate"]
    demosaicing = mosaic and steps["demosaic"]
    if mosaic:
        try:
            active = active_area(data, mcfg["offset"], mcfg["crop"])
        except ValueError as exc:
            raise InputError(sources["image"], str(exc)) from None
        if demosaicing and (active.shape[0] % size or active.shape[1] % size):
            raise InputError(sources["image"], f"mosaic active area {active.shape[0]}×{active.shape[1]} is not a "
                                               f"multiple of the {size}×{size} pattern (check hsi.mosaic offset/crop)")
        if calibrating:
            if white is None or dark is None:
                raise InputError(sources["image"], "calibration is on but no white/dark reference was given")
            white = active_area(white, mcfg["offset"], mcfg["crop"])
            dark = active_area(dark, mcfg["offset"], mcfg["crop"])
    else:
        active = data
    step = size if demosaicing else 1                 # input rows per output row
    order = band_positions(size, mcfg["band_order"]) if demosaicing else None
    bands = len(order) if demosaicing else (1 if mosaic else data.shape[2])
    correcting = steps["correct"] and matrix is not None
    if correcting and matrix.shape != (bands, bands):
        raise InputError(sources["matrix"], f"correction matrix is {matrix.shape[0]}×{matrix.shape[1]} but the cube "
                                            f"has {bands} bands")
    out_rows = active.shape[0] // step
    cube = np.empty((out_rows, active.shape[1] // step, bands), dtype=np.float32)
    dead = zero = 0
    with single_threaded_blas():
        for r0 in range(0, out_rows, CHAIN_BLOCK_ROWS):
            dead_n, zero_n = _chain_block(cube, active, white if calibrating else None, dark if calibrating else None,
                                          matrix if correcting else None, r0,
                                          min(out_rows, r0 + CHAIN_BLOCK_ROWS), step, order, hcfg, timings, sources)
            dead += dead_n
            zero += zero_n
    if calibrating:
        if dead == active.size:
            raise InputError(sources["white"], "white and dark references are identical (W == D everywhere)")
        chain.update(calibrate=True, dead_pixels=dead)
    if demosaicing:
        chain.update(demosaic=True, mosaic={"size": size, "band_order": order, "offset": list(mcfg["offset"]),
                                            "crop": list(active.shape)})
    if not mosaic:
        timings["load"] = timings.pop("demosaic")       # a cube only needs its float32 conversion
        timings["demosaic"] = 0.0
    if steps["correct"]:
        chain.update(correct=True, correction_matrix=str(sources["matrix"]) if correcting else "identity")
    if steps["normalise"]:
        chain.update(normalise=True, zero_rms_pixels=zero)
    return cube, timings, chain, demosaicing


def process_image(entry: ImageEntry, cfg: dict) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Python API (bench, predict): (cube float32 (H,W,B), labels int (H,W) with −1 unlabelled, timings)."""
    result = run_chain(entry, cfg)
    return result.cube, result.labels, result.timings


# ---- extraction job ----------------------------------------------------------------------------------------
def input_files(entry: ImageEntry, cfg: dict) -> dict[str, dict[str, Any]]:
    """Role → {path, bytes, sha256} of every file the shard depends on."""
    files = {"image": entry.image, "annotation": entry.annotation, "white": entry.white, "dark": entry.dark,
             "correction_matrix": cfg["hsi"]["correction_matrix"]}
    out = {}
    for role, path in files.items():
        if not path:
            continue
        if not os.path.isfile(path):
            raise InputError(path, f"{role} file not found")
        out[role] = {"path": str(path), "bytes": os.path.getsize(path), "sha256": fsio.sha256_file(path)}
    if entry.image.lower().endswith(".hdr"):
        # The ENVI header is tiny; the pixels live in the data file next to it.
        data_file = hsi_io.envi_data_file(Path(entry.image), hsi_io.parse_envi_header(entry.image))
        out["image_data"] = {"path": str(data_file), "bytes": data_file.stat().st_size,
                             "sha256": fsio.sha256_file(data_file)}
    return out


def _up_to_date(out: Path, record_path: Path, config_hash: str, inputs: dict) -> dict | None:
    """The existing record when shard and record match this config and these inputs, else None."""
    if not out.is_file() or not record_path.is_file():
        return None
    try:
        with open_shard(out) as h5:
            attrs = read_attrs(h5)
        record = fsio.read_json(record_path)
    except (InputError, OSError, ValueError):
        return None
    same = attrs.get("config_hash") == config_hash and _fingerprint(_inputs_attr(attrs)) == _fingerprint(inputs)
    return record if same and record.get("status") == "ok" else None


def _fingerprint(inputs: dict) -> dict[str, str]:
    return {role: info.get("sha256") for role, info in inputs.items()}


def _inputs_attr(attrs: dict) -> dict:
    value = attrs.get("inputs")
    try:
        return json.loads(value) if isinstance(value, str) else {}
    except ValueError:
        return {}


def _write_shard(out: Path, result: ChainResult, rows: np.ndarray, cols: np.ndarray, cfg: dict,
                 attrs: dict[str, Any]) -> dict[str, float]:
    """Gather patches block by block and stream them into the shard; returns patches/write timings."""
    hcfg, k = cfg["hsi"], cfg["hsi"]["patch"]
    timings = {"patches": 0.0, "write": 0.0}
    bands = result.cube.shape[2]
    chunk = cfg["shards"]["chunk_patches"]
    block = max(chunk, WRITE_BLOCK // chunk * chunk)
    t = time.perf_counter()
    cube = result.cube
    if np.dtype(hcfg["dtype"]) != cube.dtype and len(rows) * k * k > cube.shape[0] * cube.shape[1]:
        cube = cube.astype(hcfg["dtype"])     # cast each pixel once rather than once per patch holding it
    t = _timer(timings, "patches", t)
    with ShardWriter(out, (k, k, bands), hcfg["dtype"], attrs, chunk_patches=chunk,
                     compression=cfg["shards"]["compression"]) as writer:
        t = _timer(timings, "write", t)
        for lo in range(0, len(rows), block):
            r, c = rows[lo:lo + block], cols[lo:lo + block]
            patches = extract_patches(cube, r, c, k)
            t = _timer(timings, "patches", t)
            writer.append(patches, np.stack([r, c], axis=1), result.labels[r, c])
            t = _timer(timings, "write", t)
        writer.attrs["timings_s"] = {**result.timings, **timings}
    _timer(timings, "write", t)
    return timings


def extract_image(entry: ImageEntry, cfg: dict, cohort: str, out: str | Path, record_path: str | Path,
                  verbose: bool = True) -> dict:
    """Run the chain on one manifest entry, write its shard and record; returns the record.

    Skips the work (returning the existing record) when shard and record exist for the same config
    hash and input checksums. Bad input raises InputError, or with ``hsi.on_error: skip`` writes a
    `failed` record and no shard."""
    say = print if verbose else (lambda *a, **k: None)
    out, record_path = Path(out), Path(record_path)
    hcfg = cfg["hsi"]
    record = JobRecord("extract-hsi", cfg, CONFIG_SECTIONS, image_id=entry.image_id, patient_id=entry.patient_id,
                       cohort=cohort, shard=None, error=None, n_patches=0, counts={})
    check_config(hcfg)                      # a config error fails the job whatever on_error says
    try:
        t0 = time.perf_counter()
        inputs = input_files(entry, cfg)
        hash_s = time.perf_counter() - t0
        existing = _up_to_date(out, record_path, record["config_hash"], inputs)
        if existing is not None:
            say(f"extract-hsi {entry.image_id}: up to date ({out})")
            return existing
        result = run_chain(entry, cfg)
        result.timings["load"] += hash_s
        rows, cols = patch_centres(entry, cfg, result)
        attrs = _shard_attrs(entry, cfg, cohort, result, inputs, record["config_hash"])
        result.timings.update(_write_shard(out, result, rows, cols, cfg, attrs))
    except InputError as exc:
        if hcfg["on_error"] != "skip":
            raise
        say(f"medflow extract-hsi: skipped {entry.image_id}: {exc}")
        return _failed(record, record_path, out, exc)
    names = hcfg["class_names"]
    counts = Counter(result.labels[rows, cols].tolist())
    n = int(len(rows))
    record.update(shard=os.path.relpath(out.resolve(), record_path.parent.resolve()), n_patches=n,
                  counts={name: int(counts.get(i, 0)) for i, name in enumerate(names)},
                  chain=result.chain, shape=list(result.cube.shape))
    record["timings_s"] = {key: float(result.timings.get(key, 0.0)) for key in TIMING_KEYS}
    record.finish("ok")
    wall = float(record["wall_s"])
    record["throughput"] = {"s_per_patch": wall / n, "patches_per_s": n / wall if wall else None,
                            "s_per_image": wall, "bytes_written": out.stat().st_size}
    record.save(record_path)
    say(f"extract-hsi {entry.image_id}: {n} patches {record['counts']} in {wall:.2f} s → {out}")
    return dict(record)


def patch_centres(entry: ImageEntry, cfg: dict, result: ChainResult) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, cols) to extract, after checking there is something to extract."""
    hcfg, k = cfg["hsi"], cfg["hsi"]["patch"]
    if not result.has_gt:
        raise InputError(entry.image, "no ground-truth map (manifest column 'annotation') to take labels from")
    if not (result.labels >= 0).any():
        raise InputError(entry.annotation, "ground-truth map has no labelled pixel")
    if k // 2 >= min(result.cube.shape[:2]):
        raise InputError(entry.image, f"cube {result.cube.shape[:2]} is too small for {k}×{k} patches")
    rows, cols = select_pixels(result.labels, k, hcfg["border"], hcfg["per_class"], _sampling_rng(cfg, entry.image_id))
    if len(rows) == 0:
        raise InputError(entry.annotation, f"no labelled pixel is at least {k // 2} px from the border (border: skip)")
    return rows, cols


def _sampling_rng(cfg: dict, image_id: str) -> np.random.Generator:

    return config_mod.rng_for(cfg["seed"], "hsi-patches", image_id)


def _shard_attrs(entry: ImageEntry, cfg: dict, cohort: str, result: ChainResult, inputs: dict,
                 config_hash: str) -> dict[str, Any]:
    hcfg = cfg["hsi"]
    bands = int(result.cube.shape[2])
    return {"kind": "hsi", "image_id": entry.image_id, "patient_id": entry.patient_id, "cohort": cohort,
            "class_names": list(hcfg["class_names"]), "patch_size": int(hcfg["patch"]), "channels": bands,
            "bands": bands, "wavelengths": result.wavelengths, "chain": result.chain, "border": hcfg["border"],
            "cube_shape": list(result.cube.shape), "source_path": entry.image,
            "source_bytes": inputs["image"]["bytes"], "source_sha256": inputs["image"]["sha256"],
            "inputs": inputs, "seed": cfg["seed"], "config_hash": config_hash}


def _failed(record: JobRecord, record_path: Path, out: Path, exc: InputError) -> dict:
    """on_error: skip — a `failed` record and no shard (a stale one from an earlier run is removed)."""
    if out.exists():
        out.unlink()
    record.update(status="failed", shard=None, error=str(exc))
    record.finish("failed")
    record.save(record_path)
    return dict(record)


# ---- CLI ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--cohort", required=True)
    p.add_argument("--image-id", required=True)
    p.add_argument("--out", required=True, help="shard to write (<image_id>.h5)")
    p.add_argument("--record", required=True, help="extraction record to write (<image_id>.record.json)")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    item = cohort_entry(cfg, args.cohort, args.image_id)
    extract_image(item, cfg, args.cohort, args.out, args.record)
    return 0

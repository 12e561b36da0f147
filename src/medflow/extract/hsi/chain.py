"""The hyperspectral chain: calibration, 5×5 snapshot demosaicing, spectral correction, RMS normalisation.

Chain (each step switchable in ``hsi.chain``; vectorised NumPy, float32):
  1. calibrate   I_c = (I − D) / (W − D) on the mosaic's active area; pixels with W == D → 0
  2. demosaic    s×s snapshot mosaic → cube (rows/s, cols/s, s²); band b = mosaic position band_order[b]
  3. correct     every pixel spectrum (row vector) times the bands×bands correction matrix: s' = s · M
  4. normalise   divide each spectrum by its RMS over bands; all-zero spectra stay 0
Cubes (ENVI, .mat, 3-D .npy) enter at step 3. The steps run on blocks of cube rows so intermediates
stay in cache. Used by extraction (`medflow.extract.hsi.job`) and prediction (`medflow.predict.hsi`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from ...core.errors import InputError
from ...core.manifest import ImageEntry
from . import io as hsi_io
from .patches import map_labels

STEPS = ("calibrate", "demosaic", "correct", "normalise")
CAMERA_WAVELENGTHS_NM = np.linspace(665.0, 975.0, 25)  # the 5×5 snapshot camera's band centres
CHAIN_BLOCK_ROWS = 8  # cube rows per chain block (~0.5 MB: fits L2)


# ---- chain steps (pure functions) ---------------------------------------------------------------------
def active_area(mosaic: np.ndarray, offset: tuple[int, int], crop: tuple[int, int]) -> np.ndarray:
    """The sensor's active area as a view: ``offset`` (row, col), ``crop`` (height, width), 0 = to the end."""
    r0, c0 = int(offset[0]), int(offset[1])
    h = int(crop[0]) or mosaic.shape[0] - r0
    w = int(crop[1]) or mosaic.shape[1] - c0
    if r0 + h > mosaic.shape[0] or c0 + w > mosaic.shape[1] or h <= 0 or w <= 0:
        raise ValueError(f"active area offset {tuple(offset)} crop {tuple(crop)} exceeds the frame {mosaic.shape}")
    return mosaic[r0 : r0 + h, c0 : c0 + w]


def calibrate(raw: np.ndarray, white: np.ndarray, dark: np.ndarray) -> tuple[np.ndarray, int]:
    """Reflectance (I − D) / (W − D) as float32, and the number of dead pixels (W == D, set to 0)."""
    out = np.subtract(raw, dark, dtype=np.float32)
    den = np.subtract(white, dark, dtype=np.float32)
    if den.all():  # the common case: one cheap test, no mask kept
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
    except ValueError:  # last axis not contiguous (an odd crop view): element-wise transpose
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
    inv = np.einsum("...b,...b->...", cube, cube)  # sum of squares, no temporary cube
    zero = inv == 0
    n_zero = int(np.count_nonzero(zero))
    if n_zero:
        inv[zero] = 1.0  # all-zero spectra stay zero
    inv /= cube.shape[-1]
    np.sqrt(inv, out=inv)
    np.reciprocal(inv, out=inv)  # one division per pixel, not per band
    out = cube if out is None else out
    np.multiply(cube, inv[..., None], out=out)
    return out, n_zero


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
            raise InputError(
                "config", f"hsi.class_map[{key}] = {cls} is not a class id (−1 or 0..{len(hcfg['class_names']) - 1})"
            )


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
    cube: np.ndarray  # float32 (rows, cols, bands)
    labels: np.ndarray  # int64 (rows, cols), −1 = unlabelled (all −1 without ground truth)
    timings: dict[str, float]
    chain: dict[str, Any]  # steps applied + their parameters and guard counts
    wavelengths: list[float]
    has_gt: bool = False
    source_kind: str = "cube"  # what the image file held: "mosaic" | "cube"


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
            raise InputError(
                entry.image,
                "calibration is on but the manifest gives no white/dark reference "
                "(set hsi.chain.calibrate: false for pre-calibrated mosaics)",
            )
        white = hsi_io.read_reference(entry.white, image.data.shape)
        dark = hsi_io.read_reference(entry.dark, image.data.shape)
    gt = hsi_io.read_ground_truth(entry.annotation) if entry.annotation else None
    load_s = time.perf_counter() - t0
    cube, timings, chain, demosaiced = chain_cube(
        image.data,
        hcfg,
        white,
        dark,
        matrix,
        {"image": entry.image, "white": entry.white, "dark": entry.dark, "matrix": matrix_path},
    )
    t0 = time.perf_counter()
    labels = np.full(cube.shape[:2], -1, dtype=np.int64)
    if gt is not None:
        if gt.shape != cube.shape[:2]:
            raise InputError(
                entry.annotation, f"ground-truth shape {gt.shape} differs from the cube's {cube.shape[:2]}"
            )
        labels = map_labels(gt, hcfg["class_map"], len(hcfg["class_names"]), entry.annotation)
    timings["load"] = timings.get("load", 0.0) + load_s + time.perf_counter() - t0
    return ChainResult(
        cube=cube,
        labels=labels,
        timings=timings,
        chain=chain,
        wavelengths=band_wavelengths(hcfg, cube.shape[2], image.wavelengths, demosaiced),
        has_gt=gt is not None,
        source_kind=image.kind,
    )


def _chain_block(
    cube: np.ndarray,
    active: np.ndarray,
    white: np.ndarray | None,
    dark: np.ndarray | None,
    matrix: np.ndarray | None,
    r0: int,
    r1: int,
    step: int,
    order: list[int] | None,
    hcfg: dict,
    timings: dict[str, float],
    sources: dict[str, str],
) -> tuple[int, int]:
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


def check_references(white: np.ndarray, dark: np.ndarray, sources: dict[str, str], max_bad: float) -> dict[str, Any]:
    """Physical sanity of the references: the white frame must be brighter than the dark one. A dark
    frame brighter on average (swapped files), or W ≤ D on more than ``max_bad`` of the pixels (a
    partially degenerate reference: those pixels would calibrate to 0), is an InputError; fewer such
    pixels are counted in the record (``reference_bad_pixels``, shown in the report)."""
    white32, dark32 = np.asarray(white, dtype=np.float32), np.asarray(dark, dtype=np.float32)
    if np.array_equal(white32, dark32):
        raise InputError(sources["white"], "white and dark references are identical (W == D everywhere)")
    if float(dark32.mean()) >= float(white32.mean()):
        raise InputError(
            sources.get("dark", sources["white"]),
            f"dark reference is brighter than the white one "
            f"(means {dark32.mean():.1f} ≥ {white32.mean():.1f}): "
            "swapped or wrong files?",
        )
    bad = int(np.count_nonzero(white32 <= dark32))
    fraction = bad / white32.size
    if fraction > max_bad:
        raise InputError(
            sources["white"],
            f"white ≤ dark on {fraction:.1%} of the pixels ({bad} of {white32.size}; "
            f"hsi.max_bad_reference_fraction = {max_bad}): partially degenerate "
            "references would zero those pixels",
        )
    return {"reference_bad_pixels": bad, "reference_bad_fraction": fraction}


@functools.lru_cache(maxsize=1)
def _threadpools() -> Any:
    return ThreadpoolController()


def single_threaded_blas() -> Any:
    """BLAS limited to one thread: the 25×25 products are tiny, and idle BLAS threads spin-waiting
    between blocks steal the core the rest of the chain runs on (one core per job on a cluster)."""
    return _threadpools().limit(limits=1, user_api="blas")


def chain_cube(
    data: np.ndarray,
    hcfg: dict,
    white: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    matrix: np.ndarray | None = None,
    sources: dict[str, str] | None = None,
) -> tuple[np.ndarray, dict[str, float], dict[str, Any], bool]:
    """The configured chain on in-memory arrays: a 2-D mosaic (with white/dark when calibrating) or a
    (rows, cols, bands) cube. Returns (float32 cube, step timings, chain description, demosaiced?).
    ``sources`` names the files behind the arrays for error messages.

    The four steps run block by block (CHAIN_BLOCK_ROWS cube rows at a time, each step vectorised over
    the block) so a block's intermediates stay in the CPU cache instead of streaming the whole frame
    through memory once per step; results are identical to whole-frame processing.
    """
    sources = {"image": "image", "white": "white", "dark": "dark", "matrix": "correction matrix", **(sources or {})}
    steps, mcfg = hcfg["chain"], hcfg["mosaic"]
    timings = {k: 0.0 for k in STEPS}
    chain: dict[str, Any] = {s: False for s in STEPS}
    size = mcfg["size"]
    mosaic = data.ndim == 2
    calibrating = mosaic and steps["calibrate"]
    references: dict[str, Any] = {}
    demosaicing = mosaic and steps["demosaic"]
    if mosaic:
        try:
            active = active_area(data, mcfg["offset"], mcfg["crop"])
        except ValueError as exc:
            raise InputError(sources["image"], str(exc)) from None
        if demosaicing and (active.shape[0] % size or active.shape[1] % size):
            raise InputError(
                sources["image"],
                f"mosaic active area {active.shape[0]}×{active.shape[1]} is not a "
                f"multiple of the {size}×{size} pattern (check hsi.mosaic offset/crop)",
            )
        if calibrating:
            if white is None or dark is None:
                raise InputError(sources["image"], "calibration is on but no white/dark reference was given")
            white = active_area(white, mcfg["offset"], mcfg["crop"])
            dark = active_area(dark, mcfg["offset"], mcfg["crop"])
            references = check_references(white, dark, sources, hcfg["max_bad_reference_fraction"])
    else:
        active = data
    step = size if demosaicing else 1  # input rows per output row
    order = band_positions(size, mcfg["band_order"]) if demosaicing else None
    bands = len(order) if order is not None else (1 if mosaic else data.shape[2])
    correcting = steps["correct"] and matrix is not None
    if matrix is not None and correcting and matrix.shape != (bands, bands):
        raise InputError(
            sources["matrix"],
            f"correction matrix is {matrix.shape[0]}×{matrix.shape[1]} but the cube has {bands} bands",
        )
    out_rows = active.shape[0] // step
    cube = np.empty((out_rows, active.shape[1] // step, bands), dtype=np.float32)
    dead = zero = 0
    with single_threaded_blas():
        for r0 in range(0, out_rows, CHAIN_BLOCK_ROWS):
            dead_n, zero_n = _chain_block(
                cube,
                active,
                white if calibrating else None,
                dark if calibrating else None,
                matrix if correcting else None,
                r0,
                min(out_rows, r0 + CHAIN_BLOCK_ROWS),
                step,
                order,
                hcfg,
                timings,
                sources,
            )
            dead += dead_n
            zero += zero_n
    if calibrating:
        chain.update(calibrate=True, dead_pixels=dead, **references)
    if demosaicing:
        chain.update(
            demosaic=True,
            mosaic={"size": size, "band_order": order, "offset": list(mcfg["offset"]), "crop": list(active.shape)},
        )
    if not mosaic:
        timings["load"] = timings.pop("demosaic")  # a cube only needs its float32 conversion
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

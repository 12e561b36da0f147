"""Tissue masks at low resolution: Otsu on saturation or grey plus morphology, or a user mask image.

The slide is read at the coarsest pyramid level that is at least as fine as ``tissue.mask_mpp``, in
tiles (bounded memory even for a single-level gigapixel TIFF), box-reduced by an integer factor.
Transparent pixels (regions the scanner skipped) are background. The result is a ``TissueMask``:
a boolean array and its cell size in level-0 pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage

from ...core.errors import InputError
from ...core.manifest import ImageEntry

_READ_TILE = 2048  # level pixels per tile read when building the low-resolution image
Image.MAX_IMAGE_PIXELS = None  # user masks of big slides are legitimately large


@dataclass
class TissueMask:
    mask: np.ndarray  # (rows, cols) bool
    cell: float  # level-0 pixels per mask pixel (x and y)
    threshold: float  # the threshold used (0..255), NaN for user masks
    level: int  # pyramid level read (-1: the scanner's thumbnail or a user mask)

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def thumbnail(slide: Any, downsample: float) -> tuple[np.ndarray, np.ndarray, float, int]:
    """RGB + opaque mask of the whole slide at ≈``downsample`` (never coarser); returns (rgb, opaque, cell, level).

    ``slide`` is an OpenSlide (or anything with level_count/level_dimensions/level_downsamples/read_region).
    """
    level = _finest_level_not_finer_than(slide, downsample)
    level_ds = float(slide.level_downsamples[level])
    if level_ds < downsample / 2 and (thumb := _associated_thumbnail(slide, downsample)) is not None:
        return thumb
    factor = max(1, int(math.floor(downsample / level_ds + 1e-9)))
    lw, lh = slide.level_dimensions[level]
    out_w, out_h = max(1, lw // factor), max(1, lh // factor)
    rgba = np.zeros((out_h, out_w, 4), dtype=np.uint8)
    step = max(factor, (_READ_TILE // factor) * factor)  # tile edge, a multiple of factor
    for ty in range(0, out_h * factor, step):
        for tx in range(0, out_w * factor, step):
            w, h = min(step, out_w * factor - tx), min(step, out_h * factor - ty)
            tile = slide.read_region((int(round(tx * level_ds)), int(round(ty * level_ds))), level, (w, h))
            if factor > 1:
                tile = tile.reduce(factor)
            rgba[ty // factor : ty // factor + tile.height, tx // factor : tx // factor + tile.width] = np.asarray(tile)
    return rgba[..., :3], rgba[..., 3] > 0, level_ds * factor, level


def _associated_thumbnail(
    slide: Any, downsample: float, tolerance: float = 0.01
) -> tuple[np.ndarray, np.ndarray, float, int] | None:
    """The scanner's whole-slide thumbnail (e.g. Aperio), when no pyramid level is coarse enough.

    Used only if it covers exactly the level-0 image (same aspect ratio within ``tolerance``) and is
    at least as fine as requested; decoding it is far cheaper than all of level 0 of a one-level slide.
    """
    try:
        thumb = slide.associated_images.get("thumbnail")
    except Exception:  # noqa: BLE001 - associated images are optional; any failure means "not usable"
        return None
    if thumb is None:
        return None
    width, height = slide.dimensions
    ds_x, ds_y = width / thumb.width, height / thumb.height
    if abs(ds_x / ds_y - 1) > tolerance or max(ds_x, ds_y) > downsample:
        return None
    factor = max(1, int(math.floor(downsample / max(ds_x, ds_y))))
    rgb = thumb.convert("RGB")
    if factor > 1:
        rgb = rgb.reduce(factor)
    arr = np.asarray(rgb)
    return arr, np.ones(arr.shape[:2], dtype=bool), width / arr.shape[1], -1


def _finest_level_not_finer_than(slide: Any, downsample: float) -> int:
    """The coarsest level whose downsample does not exceed ``downsample`` (level 0 if none)."""
    best = 0
    for i, ds in enumerate(slide.level_downsamples):
        if ds <= downsample * (1 + 1e-6):
            best = i
    return best


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (maximises the between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = -1
    if between.max() <= 0:  # a single grey level: no foreground at all
        return float(values.max())
    # With well-separated modes every level between them is optimal: take the middle of that plateau.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((best[0] + best[-1]) // 2)  # values > t are foreground


def channel_values(rgb: np.ndarray, channel: str) -> np.ndarray:
    """uint8 image where tissue is bright: HSV saturation, or inverted luminance (grey)."""
    if channel == "saturation":
        return np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]
    if channel == "grey":
        return 255 - np.asarray(Image.fromarray(rgb).convert("L"))
    raise ValueError(f"unknown tissue channel {channel!r}")


def _disk(radius_px: float) -> np.ndarray | None:
    r = int(round(radius_px))
    if r < 1:
        return None
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r


def clean(mask: np.ndarray, cell_um: float, closing_um: float, opening_um: float, min_region_um2: float) -> np.ndarray:
    """Close small gaps, open away specks, drop connected regions smaller than ``min_region_um2``."""
    disk = _disk(closing_um / cell_um / 2)
    if disk is not None:
        # Pad so closing does not erode tissue touching the border.
        pad = disk.shape[0]
        mask = ndimage.binary_closing(np.pad(mask, pad), structure=disk)[pad:-pad, pad:-pad]
    disk = _disk(opening_um / cell_um / 2)
    if disk is not None:
        mask = ndimage.binary_opening(mask, structure=disk)
    min_px = min_region_um2 / (cell_um * cell_um)
    if min_px > 1 and mask.any():
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[labels]
    return mask


def otsu_mask(slide: Any, level0_mpp: float, tissue_cfg: dict) -> TissueMask:
    """Tissue mask from the slide pixels (config ``wsi.tissue``)."""
    rgb, opaque, cell, level = thumbnail(slide, tissue_cfg["mask_mpp"] / level0_mpp)
    values = channel_values(rgb, tissue_cfg["channel"])
    if tissue_cfg["threshold"] > 0:
        threshold = float(tissue_cfg["threshold"])
    else:
        threshold = max(otsu_threshold(values[opaque]), float(tissue_cfg["min_threshold"]))
    mask = (values > threshold) & opaque
    mask = clean(
        mask, cell * level0_mpp, tissue_cfg["closing_um"], tissue_cfg["opening_um"], tissue_cfg["min_region_um2"]
    )
    return TissueMask(mask=mask, cell=cell, threshold=threshold, level=level)


def user_mask(path: str | Path, width: int, height: int, tolerance: float = 0.02) -> TissueMask:
    """A user-supplied mask image (any size, same aspect ratio as level 0); nonzero = tissue."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img.convert("L") if img.mode not in ("1", "L", "I", "I;16", "F") else img)
    except FileNotFoundError:
        raise InputError(path, "tissue mask file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(path, f"unreadable tissue mask image ({exc})") from None
    rows, cols = arr.shape[:2]
    cell_x, cell_y = width / cols, height / rows
    if abs(cell_x / cell_y - 1) > tolerance:
        raise InputError(path, f"mask {cols}×{rows} does not have the aspect ratio of the {width}×{height} slide")
    return TissueMask(mask=arr > 0, cell=(cell_x + cell_y) / 2, threshold=float("nan"), level=-1)


def slide_tissue(slide: Any, entry: ImageEntry, level0_mpp: float, tissue_cfg: dict) -> TissueMask:
    """The slide's tissue mask as extraction and whole-slide prediction both use it: the manifest's
    user mask if given, else Otsu (``wsi.tissue``); InputError naming the file when it finds none."""
    if entry.mask:
        tm = user_mask(entry.mask, *slide.dimensions)
    elif tissue_cfg["method"] == "mask":
        raise InputError(entry.image, "wsi.tissue.method is 'mask' but the manifest row has no mask")
    else:
        try:
            tm = otsu_mask(slide, level0_mpp, tissue_cfg)
        except openslide.OpenSlideError as exc:
            raise InputError(entry.image, f"decode error while building the tissue mask ({exc})") from None
    if not tm.mask.any():
        raise InputError(
            entry.mask or entry.image,
            f"no tissue found (threshold {tm.threshold:.1f} on {tissue_cfg['channel']}; "
            "adjust wsi.tissue or supply a mask)",
        )
    return tm

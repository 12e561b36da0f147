"""Slide access: open with OpenSlide, level-0 µm/px, the read plan for a target µm/px, fast region reads."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from PIL import Image

from ...core.errors import InputError
from ...core.manifest import ImageEntry


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """OpenSlide handle; InputError naming the file for missing, unsupported or corrupt slides."""
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


def level0_mpp(slide: Any, entry: ImageEntry, cfg: dict, cohort: str) -> tuple[float, str]:
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

    def summary(self, mpp_source: str) -> dict[str, Any]:
        """The geometry a record states (extraction's ``wsi``, predict-wsi's ``geometry``)."""
        return {
            "level": self.level,
            "downsample": self.level_downsample,
            "read_size": self.read_size,
            "patch_size": self.patch_size,
            "mpp": self.mpp,
            "level0_mpp": self.level0_mpp,
            "mpp_source": mpp_source,
            "resampled": self.resample,
        }


def choose_level(
    downsamples: Sequence[float],
    mpp0: float,
    target: float,
    patch_size: int,
    tolerance: float,
    path: str | Path = "slide",
) -> ReadPlan:
    """Coarsest level whose mpp ≤ target (within ``tolerance``, relative); resample when not within it."""
    if target < mpp0 * (1 - tolerance):
        raise InputError(
            path,
            f"requested mpp impossible: {target} µm/px is finer than level 0 "
            f"({mpp0:.4f} µm/px) beyond the tolerance {tolerance}",
        )
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
                    to_rgba(self._buf)  # type: ignore[arg-type]  # a uint32 array is a buffer
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

"""Where to sample a slide: annotation roles, coverage grid, per-patch labels, random or grid candidates.

The coverage grid has cells of 1/``CELLS_PER_PATCH`` patch; per top-left cell, integral images give
the tumour, tissue and "other annotation" cells under a patch, from which ``label_map`` assigns
tumour (1), normal (0) or skip (-1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...core.errors import InputError
from ...core.manifest import ImageEntry
from ...core.seeds import rng_for
from . import annotations as ann_mod
from . import tissue
from .slide import ReadPlan

CELLS_PER_PATCH = 8  # coverage grid resolution: a patch spans 8×8 cells
SPARE_FACTOR = 2  # random mode: candidates kept per class, relative to per_class (replace rejects)


@dataclass
class Coverage:
    """Per top-left cell of the coverage grid: counts of tumour and tissue cells under the patch."""

    cell: float  # level-0 px per cell
    k: int  # cells per patch edge
    tumour: np.ndarray  # (gh-k+1, gw-k+1) uint16 counts
    tissue: np.ndarray  # same shape
    other: np.ndarray  # same shape: cells inside polygons of groups that are neither tumour nor exclusion


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
    if not mask.any():  # unannotated slides: skip the integral image
        return np.zeros((mask.shape[0] - k + 1, mask.shape[1] - k + 1), dtype=np.uint16)
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=s[1:, 1:])
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]).astype(np.uint16)


def tissue_on_grid(tm: tissue.TissueMask, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Nearest-neighbour resampling of the tissue mask onto the coverage grid (cell centres)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * cell / tm.cell).astype(np.int64), tm.mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * cell / tm.cell).astype(np.int64), tm.mask.shape[1] - 1)
    return tm.mask[np.ix_(rows, cols)]


def coverage(
    dims: tuple[int, int], plan: ReadPlan, tm: tissue.TissueMask, ann: SlideAnnotations, tumour_on_tissue: bool
) -> Coverage:
    k = CELLS_PER_PATCH
    cell = plan.footprint / k
    gw, gh = int(dims[0] // cell), int(dims[1] // cell)
    if gw < k or gh < k:
        raise InputError(None, f"slide {dims[0]}×{dims[1]} is smaller than one patch ({plan.footprint:.0f} level-0 px)")
    tissue_grid = tissue_on_grid(tm, (gh, gw), cell)
    tumour_grid = ann_mod.rasterize(ann.tumour, (gh, gw), cell, exclude=ann.exclude)
    if tumour_on_tissue:
        tumour_grid &= tissue_grid
    other_grid = ann_mod.rasterize(ann.other, (gh, gw), cell)
    return Coverage(
        cell=cell,
        k=k,
        tumour=_box_counts(tumour_grid, k),
        tissue=_box_counts(tissue_grid, k),
        other=_box_counts(other_grid, k),
    )


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

    coords: dict[int, np.ndarray]  # class → (m, 2) int64 level-0 (x, y)
    quota: dict[int, int]  # class → patches wanted (grid: all candidates)

    @property
    def total(self) -> int:
        return sum(len(c) for c in self.coords.values())


def slide_rng(cfg: dict, image_id: str) -> np.random.Generator:
    """The slide's random stream: config seed combined with the image id (order-independent)."""
    return rng_for(cfg["seed"], "wsi", image_id)


def _cells_to_coords(cells_rc: np.ndarray, cell: float) -> np.ndarray:
    return np.round(cells_rc[:, ::-1] * cell).astype(np.int64)  # (row, col) → (x, y)


def sample_random(
    labels: np.ndarray, cell: float, per_class: int, rng: np.random.Generator, n_classes: int
) -> Candidates:
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


def sample_grid(
    labels: np.ndarray,
    cov: Coverage,
    dims: tuple[int, int],
    footprint: float,
    overlap: float,
    max_patches: int,
    rng: np.random.Generator,
    n_classes: int,
) -> Candidates:
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


def slide_annotations(entry: ImageEntry, dims: tuple[int, int], labels_cfg: dict) -> SlideAnnotations:
    if not entry.annotation:
        return SlideAnnotations([], [], [])
    marks: list[ann_mod.Mark] = []
    polygons = ann_mod.load(entry.annotation, marks)
    regions = {*labels_cfg["tumour_groups"], *labels_cfg["exclude_groups"]}
    for mark in marks:  # a point labelled tumour would silently give no tumour patch at all
        if mark.group in regions:
            raise InputError(
                entry.annotation,
                f"annotation {mark.name or mark.group!r} of group {mark.group!r} is a "
                f"{mark.kind}, which has no area: outline regions with polygons",
            )
    if marks:
        print(
            f"extract-wsi: warning: {entry.annotation}: {len(marks)} annotation(s) without an area ignored "
            f"(groups {sorted({m.group for m in marks})})"
        )
    ann_mod.check_inside(entry.annotation, polygons, *dims)
    known = {*labels_cfg["tumour_groups"], *labels_cfg["exclude_groups"]}
    result = SlideAnnotations(
        ann_mod.select(polygons, labels_cfg["tumour_groups"]),
        ann_mod.select(polygons, labels_cfg["exclude_groups"]),
        [p for p in polygons if p.group not in known],
    )
    if result.other:
        print(
            f"extract-wsi: warning: {entry.annotation}: groups {result.other_groups} are neither tumour_groups "
            f"nor exclude_groups; their area is not sampled"
        )
    return result


def sample(
    labels: np.ndarray,
    cov: Coverage,
    dims: tuple[int, int],
    plan: ReadPlan,
    wsi_cfg: dict,
    rng: np.random.Generator,
    n_classes: int,
) -> Candidates:
    scfg = wsi_cfg["sampling"]
    if scfg["mode"] == "random":
        return sample_random(labels, cov.cell, scfg["per_class"], rng, n_classes)
    return sample_grid(labels, cov, dims, plan.footprint, scfg["overlap"], scfg["max_patches"], rng, n_classes)

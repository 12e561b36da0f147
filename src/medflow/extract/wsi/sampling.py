"""Where to sample a slide: annotation roles, coverage grid, per-patch labels, random or grid candidates.

The coverage grid has cells of 1/``CELLS_PER_PATCH`` patch; per top-left cell, integral images give
the cells of each annotated class's region, of tissue and of unsampled annotations under a patch,
from which ``label_map`` assigns a class index or skip (-1). Roles of groups: `medflow.extract.wsi.classes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...core.errors import InputError
from ...core.manifest import ImageEntry
from ...core.seeds import rng_for
from . import annotations as ann_mod
from . import tissue
from .classes import EXCLUDE, UNKNOWN, UNSAMPLED, ClassMap, quotas, unknown_group_error
from .slide import ReadPlan

CELLS_PER_PATCH = 8  # coverage grid resolution: a patch spans 8×8 cells
SPARE_FACTOR = 2  # random mode: candidates kept per class, relative to per_class (replace rejects)


@dataclass
class Coverage:
    """Per top-left cell of the coverage grid: counts of class-region and tissue cells under the patch."""

    cell: float  # level-0 px per cell
    k: int  # cells per patch edge
    regions: dict[int, np.ndarray]  # annotated class → (gh-k+1, gw-k+1) uint16 counts of its region's cells
    tissue: np.ndarray  # same shape
    other: np.ndarray  # same shape: cells inside polygons whose area is never sampled


@dataclass
class SlideAnnotations:
    """A slide's polygons by role: class regions, exclusions (cut out of every region), unsampled areas."""

    regions: dict[int, list[ann_mod.Polygon]]  # annotated class index → its polygons
    exclude: list[ann_mod.Polygon]
    other: list[ann_mod.Polygon]

    @property
    def other_groups(self) -> list[str]:
        return sorted({p.group for p in self.other})

    def polygons_of(self, classes: list[int]) -> list[ann_mod.Polygon]:
        return [p for c in classes for p in self.regions.get(c, [])]


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
    dims: tuple[int, int],
    plan: ReadPlan,
    tm: tissue.TissueMask,
    ann: SlideAnnotations,
    on_tissue: bool,
    classes: list[int] | None = None,
) -> Coverage:
    """Counts per patch position. A class's region is its polygons minus the exclusions minus the
    regions of classes later in ``classes`` (precedence: later wins); with ``on_tissue`` only tissue."""
    k = CELLS_PER_PATCH
    cell = plan.footprint / k
    gw, gh = int(dims[0] // cell), int(dims[1] // cell)
    if gw < k or gh < k:
        raise InputError(None, f"slide {dims[0]}×{dims[1]} is smaller than one patch ({plan.footprint:.0f} level-0 px)")
    tissue_grid = tissue_on_grid(tm, (gh, gw), cell)
    order = sorted(ann.regions) if classes is None else classes
    later = np.zeros((gh, gw), dtype=bool)  # union of the regions of classes later in the order
    regions: dict[int, np.ndarray] = {}
    for c in reversed(order):
        grid = ann_mod.rasterize(ann.regions.get(c, []), (gh, gw), cell, exclude=ann.exclude)
        grid &= ~later
        later |= grid
        if on_tissue:
            grid &= tissue_grid
        regions[c] = _box_counts(grid, k)
    other_grid = ann_mod.rasterize(ann.other, (gh, gw), cell)
    return Coverage(
        cell=cell,
        k=k,
        regions={c: regions[c] for c in order},
        tissue=_box_counts(tissue_grid, k),
        other=_box_counts(other_grid, k),
    )


def label_map(cov: Coverage, labels_cfg: dict, background: int | None = 0) -> np.ndarray:
    """Per top-left cell: a class index, or -1 (skipped).

    An annotated class needs region coverage ≥ ``tumour_min`` (the largest coverage wins; ties go
    to the later class). ``background`` (unannotated tissue) needs tissue ≥ ``normal_tissue_min``,
    no cell of another class's region and no cell of an unsampled annotation: an outline whose
    group is not configured might be tumour under another name, so it is never background.
    """
    area = cov.k * cov.k
    out = np.full(cov.tissue.shape, -1, dtype=np.int8)
    if background is not None:
        foreign = np.zeros(cov.tissue.shape, dtype=np.int32)
        for c, counts in cov.regions.items():
            if c != background:
                foreign += counts
        normal_tissue = math.ceil(labels_cfg["normal_tissue_min"] * area - 1e-9)
        out[(foreign == 0) & (cov.other == 0) & (cov.tissue >= normal_tissue)] = background
    region_min = max(1, math.ceil(labels_cfg["tumour_min"] * area - 1e-9))
    best = np.zeros(cov.tissue.shape, dtype=np.uint16)
    for c, counts in cov.regions.items():  # in precedence order: ">=" hands ties to the later class
        wins = (counts >= region_min) & (counts >= best)
        out[wins] = c
        best = np.maximum(best, np.where(counts >= region_min, counts, 0).astype(np.uint16))
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
    labels: np.ndarray, cell: float, per_class: int | Sequence[int], rng: np.random.Generator, n_classes: int
) -> Candidates:
    """Uniform over the valid top-left cells of each class, without replacement; spares kept for rejects.

    ``per_class``: patches wanted of every class, or one number per class (a quota of 0 draws nothing)."""
    wanted = [per_class] * n_classes if isinstance(per_class, int) else list(per_class)
    coords, quota = {}, {}
    for c in range(n_classes):
        flat = np.flatnonzero(labels.ravel() == c)
        take = min(len(flat), wanted[c] * SPARE_FACTOR + 8) if wanted[c] else 0
        picked = rng.choice(flat, size=take, replace=False) if take else flat[:0]
        rc = np.stack(np.unravel_index(picked, labels.shape), axis=1)
        coords[c] = _cells_to_coords(rc, cell)
        quota[c] = min(wanted[c], take)
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


def _refuse_region_marks(path: str, marks: list[ann_mod.Mark], cmap: ClassMap) -> None:
    """An annotation without an area (point, line, ASAP dot) in a region group would silently give no patch
    of its class: an InputError; in other groups it is ignored with a warning."""
    for mark in marks:
        if mark.group in cmap.exclude or cmap.groups.get(mark.group, UNSAMPLED) >= 0:
            raise InputError(
                path,
                f"annotation {mark.name or mark.group!r} of group {mark.group!r} is a "
                f"{mark.kind}, which has no area: outline regions with polygons",
            )
    if marks:
        print(
            f"extract-wsi: warning: {path}: {len(marks)} annotation(s) without an area ignored "
            f"(groups {sorted({m.group for m in marks})})"
        )


def slide_annotations(entry: ImageEntry, dims: tuple[int, int], cmap: ClassMap) -> SlideAnnotations:
    """The slide's polygons by role under ``cmap``; in the mapping form an unmapped group is an InputError."""
    if not entry.annotation:
        return SlideAnnotations({}, [], [])
    marks: list[ann_mod.Mark] = []
    polygons = ann_mod.load(entry.annotation, marks)
    _refuse_region_marks(entry.annotation, marks, cmap)
    roles = [cmap.role(poly) for poly in polygons]
    if cmap.strict and UNKNOWN in roles:  # what the map cannot name comes first: it is true of any slide
        raise unknown_group_error(entry.annotation, polygons[roles.index(UNKNOWN)])
    ann_mod.check_inside(entry.annotation, polygons, *dims)
    result = SlideAnnotations({c: [] for c in cmap.annotated}, [], [])
    for poly, role in zip(polygons, roles):
        if role == EXCLUDE:
            result.exclude.append(poly)
        elif role in (UNKNOWN, UNSAMPLED):
            result.other.append(poly)
        else:
            result.regions[role].append(poly)
    unknown = sorted({p.group for p in result.other if cmap.role(p) == UNKNOWN})
    if unknown:
        print(
            f"extract-wsi: warning: {entry.annotation}: groups {unknown} are neither tumour_groups "
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
        return sample_random(labels, cov.cell, quotas(scfg, wsi_cfg["labels"]["classes"]), rng, n_classes)
    return sample_grid(labels, cov, dims, plan.footprint, scfg["overlap"], scfg["max_patches"], rng, n_classes)

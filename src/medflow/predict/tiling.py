"""The tiles of a slide that whole-slide prediction classifies: a regular grid over the tissue.

Tiles are the model's patches (``plan.footprint`` level-0 pixels, read as extraction reads them) on
a lattice of stride ``footprint · (1 − overlap)`` from (0, 0). The tissue mask is resampled onto
cells of 1/16 tile (nearest neighbour at cell centres, as extraction's coverage grid), so the
stride is a whole number of cells (the overlap is rounded to 1/16 tile) and an integral image
gives every tile's tissue fraction exactly. A tile is predicted when that fraction is at least
``tissue_min`` (and above zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from ..extract.wsi.sampling import tissue_on_grid
from ..extract.wsi.slide import ReadPlan
from ..extract.wsi.tissue import TissueMask

CELLS_PER_TILE = 16  # tissue lookup resolution and overlap granularity: 1/16 tile


@dataclass(frozen=True)
class TileGrid:
    """Tissue tiles of one slide on the lattice ``(row, col) → level-0 (col·stride, row·stride)``."""

    footprint: float  # tile edge, level-0 px
    stride: float  # lattice step, level-0 px
    shape: tuple[int, int]  # (rows, cols) of the whole lattice
    rc: np.ndarray  # (N, 2) int64 lattice (row, col) of the tissue tiles, row-major
    coords: np.ndarray  # (N, 2) int64 level-0 top-left (x, y)
    tissue: np.ndarray  # (N,) float32 tissue fraction of each tile

    @property
    def centres(self) -> np.ndarray:
        """(N, 2) float64 level-0 (x, y) of the tile centres."""
        return self.coords + self.footprint / 2.0

    def to_grid(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Per-tile values (N, ...) placed on the lattice (rows, cols, ...), ``fill`` elsewhere."""
        out = np.full((*self.shape, *values.shape[1:]), fill, dtype=np.float32)
        out[self.rc[:, 0], self.rc[:, 1]] = values
        return out


def stride_cells(overlap: float) -> int:
    return max(1, int(round(CELLS_PER_TILE * (1.0 - overlap))))


def _box_counts(mask: np.ndarray, k: int) -> np.ndarray:
    """True cells in every k×k window, indexed by the window's top-left cell (integral image)."""
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1, out=s[1:, 1:])
    return s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]


def tile_grid(dims: tuple[int, int], plan: ReadPlan, tm: TissueMask, overlap: float, tissue_min: float) -> TileGrid:
    """The tissue tiles of a ``dims`` = (width, height) slide; InputError when the slide is smaller than a tile."""
    k = CELLS_PER_TILE
    cell = plan.footprint / k
    gw, gh = int(dims[0] // cell), int(dims[1] // cell)
    if gw < k or gh < k:
        raise InputError(None, f"slide {dims[0]}×{dims[1]} is smaller than one tile ({plan.footprint:.0f} level-0 px)")
    step = stride_cells(overlap)
    counts = _box_counts(tissue_on_grid(tm, (gh, gw), cell), k)
    rows = np.arange(0, gh - k + 1, step)
    cols = np.arange(0, gw - k + 1, step)
    fraction = counts[np.ix_(rows, cols)] / float(k * k)
    keep = (fraction >= tissue_min) & (fraction > 0)
    rc = np.argwhere(keep).astype(np.int64)  # row-major: neighbouring tiles share decoded slide tiles
    stride = step * cell
    coords = np.round(rc[:, ::-1] * stride).astype(np.int64)
    return TileGrid(
        footprint=plan.footprint,
        stride=stride,
        shape=(len(rows), len(cols)),
        rc=rc,
        coords=coords,
        tissue=fraction[keep].astype(np.float32),
    )

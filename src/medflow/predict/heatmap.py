"""Heatmap figures: tile probabilities over the slide thumbnail, with a colour bar (matplotlib, Agg).

Each tile is drawn as the stride × stride square centred on its centre (the squares of neighbouring
tiles meet exactly), transparent where no tile was predicted. Two classes: one overlay of the
positive class; more: one overlay per class. The plain thumbnail is the first panel.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..core import fsio  # noqa: E402
from .tiling import TileGrid  # noqa: E402

CMAP = "jet"  # the usual pathology heatmap scale; blue = low, red = high
ALPHA = 0.5
_PNG_META = {"Software": None}  # byte-stable PNGs


def lattice_extent(grid: TileGrid, thumb_cell: float) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) of the lattice squares in thumbnail pixels."""
    margin = (grid.footprint - grid.stride) / 2.0
    left = top = margin / thumb_cell
    right = left + grid.shape[1] * grid.stride / thumb_cell
    bottom = top + grid.shape[0] * grid.stride / thumb_cell
    return left, right, bottom, top


def write_heatmap(
    path: str | Path,
    thumb: np.ndarray,
    thumb_cell: float,
    grid: TileGrid,
    prob_grid: np.ndarray,
    class_names: list[str],
    panels: list[int],
    title: str,
) -> None:
    """PNG: the thumbnail, then one overlay per class index in ``panels`` (prob_grid: rows × cols × C)."""
    h, w = thumb.shape[:2]
    n = 1 + len(panels)
    panel_w = 4.2 if w >= h else 4.2 * w / h
    fig, axes = plt.subplots(1, n, figsize=(panel_w * n + 0.8 * len(panels), 4.2 * h / w * (w / max(w, h)) + 0.7))
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap(CMAP).with_extremes(bad=(0, 0, 0, 0))
    axes[0].imshow(thumb)
    axes[0].set_title("slide", fontsize=9)
    extent = lattice_extent(grid, thumb_cell)
    for ax, c in zip(axes[1:], panels):
        ax.imshow(thumb)
        img = ax.imshow(
            np.ma.masked_invalid(prob_grid[..., c]),
            cmap=cmap,
            vmin=0.0,
            vmax=1.0,
            alpha=ALPHA,
            extent=extent,
            interpolation="nearest",
        )
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(f"P({class_names[c]})", fontsize=9)
        bar = fig.colorbar(img, ax=ax, fraction=0.046, pad=0.02)
        if bar.solids is not None:
            bar.solids.set_alpha(1.0)
        bar.set_label(f"probability of {class_names[c]} (tiles; none = not tissue)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=_PNG_META)
    plt.close(fig)

"""From a tile probability map to objects other tools read: region polygons (GeoJSON that QuPath
imports) and point detections (CAMELYON16's submission CSV).

A tile stands for the stride × stride square centred on its centre (the tiles overlap; these
squares tile the plane), so thresholded tiles become exact rectilinear polygons: the boundary of
the union of their squares, traced edge by edge, holes kept. Detections are the local maxima of
the positive-class map within a radius (greedy non-maximum suppression), at tile centres.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..core import fsio

Ring = np.ndarray  # (K, 2) float64 (x, y), closed (first vertex repeated last)

# Directed boundary edges of a foreground pixel (r, c), interior on the right (screen coordinates, y down):
# top (if the pixel above is background), right, bottom, left; as (corner from, corner to) offsets (x, y).
_SIDES = (
    ((-1, 0), ((0, 0), (1, 0))),
    ((0, 1), ((1, 0), (1, 1))),
    ((1, 0), ((1, 1), (0, 1))),
    ((0, -1), ((0, 1), (0, 0))),
)


def raster_polygons(mask: np.ndarray) -> list[tuple[Ring, list[Ring]]]:
    """Polygons (exterior, holes) of the 4-connected foreground components of a boolean (rows, cols)
    mask, in pixel-corner units (x = column, y = row); vertices only at corners (collinear ones dropped)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    labels, _ = ndimage.label(mask)  # 4-connectivity: pixels touching at a corner are separate regions
    padded = np.pad(mask, 1)
    outgoing: dict[tuple[int, int], list[tuple[tuple[int, int], int]]] = defaultdict(list)
    for (dr, dc), (a, b) in _SIDES:
        neighbour = padded[1 + dr : padded.shape[0] - 1 + dr, 1 + dc : padded.shape[1] - 1 + dc]
        for r, c in np.argwhere(mask & ~neighbour).tolist():
            start, end = (c + a[0], r + a[1]), (c + b[0], r + b[1])
            outgoing[start].append((end, int(labels[r, c])))
    rings: list[tuple[np.ndarray, int]] = []
    while outgoing:
        start = next(iter(outgoing))
        points, label, prev, here = [start], None, None, start
        while True:
            options = outgoing[here]
            idx = _right_turn(options, prev, here) if len(options) > 1 else 0
            nxt, label = options.pop(idx)
            if not options:
                del outgoing[here]
            prev, here = here, nxt
            if here == start:
                break
            points.append(here)
        rings.append((_drop_collinear(np.asarray(points, dtype=np.float64)), int(label or 0)))
    exteriors: dict[int, Ring] = {}
    holes: dict[int, list[Ring]] = defaultdict(list)
    for ring, label in rings:
        if _signed_area(ring) > 0:  # the orientation of a single pixel's boundary
            exteriors[label] = _closed(ring)
        else:
            holes[label].append(_closed(ring))
    return [(exteriors[lab], holes.get(lab, [])) for lab in sorted(exteriors)]


def _right_turn(options: list[tuple[tuple[int, int], int]], prev: Any, here: tuple[int, int]) -> int:
    """At a pinch corner (two pixels touching diagonally) keep hugging the same pixel: turn right."""
    if prev is None:
        return 0
    dx, dy = here[0] - prev[0], here[1] - prev[1]
    want = (here[0] - dy, here[1] + dx)  # right turn in screen coordinates
    for i, (end, _) in enumerate(options):
        if end == want:
            return i
    return 0


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    prev = np.roll(points, 1, axis=0)
    nxt = np.roll(points, -1, axis=0)
    cross = (points[:, 0] - prev[:, 0]) * (nxt[:, 1] - points[:, 1]) - (points[:, 1] - prev[:, 1]) * (
        nxt[:, 0] - points[:, 0]
    )
    return points[cross != 0]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def _closed(ring: np.ndarray) -> np.ndarray:
    return np.vstack([ring, ring[:1]])


# ---- GeoJSON (QuPath) ------------------------------------------------------------------------------
def region_features(
    mask: np.ndarray,
    prob: np.ndarray,
    stride: float,
    offset: float,
    class_name: str,
    colour: tuple[int, int, int],
    level0_mpp: float,
) -> list[dict[str, Any]]:
    """GeoJSON Features (QuPath annotations) of the thresholded lattice ``mask``; lattice corner (c, r)
    maps to level-0 (offset + c·stride, offset + r·stride). Measurements: area, max and mean probability."""
    labels, _ = ndimage.label(mask)
    features = []
    for exterior, holes in raster_polygons(mask):
        rings = [offset + ring * stride for ring in (exterior, *holes)]
        r, c = int(exterior[0, 1]), int(exterior[0, 0])  # the first corner's pixel is in the region
        region = labels == labels[r, c]
        values = prob[region & np.isfinite(prob)]
        area_px = float(region.sum()) * stride * stride
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [np.round(ring, 2).tolist() for ring in rings]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"{class_name} region",
                    "classification": {"name": class_name, "color": list(colour)},
                    "isLocked": False,
                    "measurements": {
                        "area_um2": area_px * level0_mpp * level0_mpp,
                        "max_probability": float(values.max()) if values.size else None,
                        "mean_probability": float(values.mean()) if values.size else None,
                    },
                },
            }
        )
    return features


def write_geojson(path: str | Path, features: list[dict[str, Any]]) -> None:
    fsio.write_json(path, {"type": "FeatureCollection", "features": features})


# ---- detections (CAMELYON16) ---------------------------------------------------------------------
def detections(prob_grid: np.ndarray, radius_cells: float, min_probability: float) -> np.ndarray:
    """(K, 3) float64 (row, col, probability) by greedy non-maximum suppression on a lattice map
    (NaN = no tile): the highest remaining tile ≥ ``min_probability`` is kept and every tile within
    ``radius_cells`` of it suppressed, until none is left. Ties go in row-major order."""
    p = np.where(np.isfinite(prob_grid), prob_grid, -np.inf)
    r = max(0, int(np.floor(radius_cells)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = yy * yy + xx * xx <= radius_cells * radius_cells
    suppressed = np.zeros((p.shape[0] + 2 * r, p.shape[1] + 2 * r), dtype=bool)  # padded by r
    cand = np.argwhere(p >= min_probability)
    order = np.lexsort((cand[:, 1], cand[:, 0], -p[cand[:, 0], cand[:, 1]]))
    kept = []
    for a, b in cand[order].tolist():
        if suppressed[a + r, b + r]:
            continue
        kept.append((a, b, p[a, b]))
        suppressed[a : a + 2 * r + 1, b : b + 2 * r + 1] |= disk
    return np.array(kept, dtype=np.float64).reshape(-1, 3)


def write_detections_csv(path: str | Path, points: np.ndarray) -> None:
    """CAMELYON16 submission format: one line ``probability,x,y`` per detection, x/y integer level-0
    pixels, no header (the challenge's evaluation script reads it as is)."""
    lines = [f"{p:.6f},{int(round(x))},{int(round(y))}" for x, y, p in points.tolist()]
    fsio.write_text(path, "".join(line + "\n" for line in lines))


def read_detections_csv(path: str | Path) -> np.ndarray:
    """(K, 3) float64 (x, y, probability) from a CAMELYON16 detection CSV."""
    rows = [line.split(",") for line in Path(path).read_text().splitlines() if line.strip()]
    return np.array([(float(x), float(y), float(p)) for p, x, y in rows], dtype=np.float64).reshape(-1, 3)

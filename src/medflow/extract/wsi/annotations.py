"""Slide annotations → polygons with holes → label masks.

Reads ASAP XML (CAMELYON16/17: ``<Annotation PartOfGroup=...><Coordinates><Coordinate Order X Y>``)
and GeoJSON (QuPath exports: FeatureCollection, a bare list of Features, Feature, or geometry;
Polygon / MultiPolygon with holes; class from ``properties.classification.name``). Coordinates are
level-0 pixels. ``rasterize`` draws the union of the polygons of some groups, minus their holes,
minus the polygons of exclusion groups, into a boolean mask at any downsample.

Nested groups: an ASAP ``<Group Name=... PartOfGroup=...>`` chain, and QuPath's derived classes
(``"Tumor: Positive"``, or ``classification.names``), give each polygon its ancestor groups
(``Polygon.parents``, nearest first), so a class map can name a parent group.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from ...core import fsio
from ...core.errors import InputError

# ASAP annotation types that enclose an area; Dot/PointSet/Measurement carry no area and are ignored.
_ASAP_AREA_TYPES = {"polygon", "spline", "rectangle"}
_GEOJSON_EXTS = {".json", ".geojson"}


@dataclass
class Polygon:
    """One annotated region: an exterior ring and optional hole rings, (K,2) float level-0 (x, y)."""

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    group: str = ""
    name: str = ""
    parents: tuple[str, ...] = ()  # ancestor groups of ``group``, nearest first

    @property
    def lineage(self) -> tuple[str, ...]:
        """The polygon's group followed by its ancestors."""
        return (self.group, *self.parents) if self.group else self.parents

    def bounds(self) -> tuple[float, float, float, float]:
        x0, y0 = self.exterior.min(axis=0)
        x1, y1 = self.exterior.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    def n_vertices(self) -> int:
        return len(self.exterior) + sum(len(h) for h in self.holes)


# ---- parsing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mark:
    """An annotation without an area (a point, a line, an ASAP dot or measurement): never a region."""

    group: str
    kind: str
    name: str = ""


def load(path: str | Path, marks: list[Mark] | None = None) -> list[Polygon]:
    """Polygons of an ASAP XML or GeoJSON file (by extension); InputError names the file otherwise.
    Annotations without an area are appended to ``marks`` when given (else ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "annotation file not found")
    suffix = path.suffix.lower()
    marks = [] if marks is None else marks
    if suffix == ".xml":
        return parse_asap_xml(path, marks)
    if suffix in _GEOJSON_EXTS:
        return parse_geojson(path, marks)
    raise InputError(path, f"unknown annotation format {suffix!r}; expected .xml (ASAP) or .json/.geojson")


def parse_asap_xml(path: str | Path, marks: list[Mark] | None = None) -> list[Polygon]:
    """ASAP XML → polygons (vertices in ``Order``); groups from ``PartOfGroup``; dots, point sets and
    measurements go to ``marks``."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(path, f"malformed ASAP XML ({exc})") from None
    if root.tag != "ASAP_Annotations":
        raise InputError(path, f"not an ASAP annotation file (root element <{root.tag}>)")
    parent_of = {g.get("Name", ""): g.get("PartOfGroup", "None") for g in root.iter("Group")}
    polygons = []
    for ann in root.iter("Annotation"):
        if ann.get("Type", "Polygon").lower() not in _ASAP_AREA_TYPES:
            if marks is not None:
                marks.append(Mark(ann.get("PartOfGroup", ""), ann.get("Type", ""), ann.get("Name", "")))
            continue
        name = ann.get("Name", "")
        coords = ann.find("Coordinates")
        points = [] if coords is None else list(coords.iter("Coordinate"))
        try:
            ordered = sorted(points, key=lambda c: int(float(c.get("Order", "0"))))
            ring = np.array([[float(c.get("X", "")), float(c.get("Y", ""))] for c in ordered], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(path, f"annotation {name!r}: coordinate without numeric X/Y/Order") from None
        polygon = _checked(path, ring, [], ann.get("PartOfGroup", ""), name)
        polygon.parents = _ancestors(path, polygon.group, parent_of)
        polygons.append(polygon)
    return polygons


def _ancestors(path: str | Path, group: str, parent_of: dict[str, str]) -> tuple[str, ...]:
    """ASAP's ``Group`` chain above ``group`` ("None" or an undeclared group ends it); a cycle is an error."""
    chain: list[str] = []
    current = group
    while (parent := parent_of.get(current, "None")) not in ("None", ""):
        if parent == group or parent in chain:
            raise InputError(path, f"annotation groups form a cycle: {' → '.join([group, *chain, parent])}")
        chain.append(parent)
        current = parent
    return tuple(chain)


def parse_geojson(path: str | Path, marks: list[Mark] | None = None) -> list[Polygon]:
    """GeoJSON (QuPath export) → polygons; holes kept; Points/LineStrings go to ``marks``."""
    path = Path(path)
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"malformed GeoJSON ({exc})") from None
    polygons: list[Polygon] = []
    for feature in _features(path, doc):
        group, name = _feature_class(feature.get("properties") or {})
        _collect_geometry(path, feature.get("geometry"), group, name, polygons, marks)
    for polygon in polygons:
        polygon.parents = derived_class_parents(polygon.group)
    return polygons


def _features(path: Path, doc: Any) -> list[dict]:
    items: Any
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        items = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        items = [doc]
    elif isinstance(doc, dict) and "coordinates" in doc or isinstance(doc, dict) and "geometries" in doc:
        items = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        raise InputError(path, "GeoJSON must be a FeatureCollection, a Feature, a geometry or a list of Features")
    if not isinstance(items, list) or not all(isinstance(f, dict) for f in items):
        raise InputError(path, "GeoJSON 'features' must be a list of objects")
    return items


def _feature_class(props: dict) -> tuple[str, str]:
    """QuPath puts the class in ``classification.name`` (derived classes: ``names``, or "A: B" in the
    name); other tools use ``classification``/``label``."""
    cls = props.get("classification")
    if isinstance(cls, dict):
        names = cls.get("names")
        cls = cls.get("name") or (": ".join(map(str, names)) if isinstance(names, list) else None)
    group = cls or props.get("label") or props.get("class") or props.get("name") or ""
    return str(group), str(props.get("name") or "")


def derived_class_parents(group: str) -> tuple[str, ...]:
    """QuPath derived classes: "Tumor: Positive" has the parent "Tumor" (nearest first)."""
    parts = group.split(": ")
    return tuple(": ".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))


def _collect_geometry(
    path: Path, geom: Any, group: str, name: str, out: list[Polygon], marks: list[Mark] | None = None
) -> None:
    if geom is None:
        return
    if not isinstance(geom, dict) or "type" not in geom:
        raise InputError(path, f"feature {name or group!r}: geometry without a type")
    kind = geom["type"]
    try:
        if kind == "Polygon":
            out.append(_polygon_from_rings(path, geom["coordinates"], group, name))
        elif kind == "MultiPolygon":
            for rings in geom["coordinates"]:
                out.append(_polygon_from_rings(path, rings, group, name))
        elif kind == "GeometryCollection":
            for sub in geom["geometries"]:
                _collect_geometry(path, sub, group, name, out, marks)
        elif kind in {"Point", "MultiPoint", "LineString", "MultiLineString"}:
            if marks is not None:
                marks.append(Mark(group, kind, name))
        else:
            raise InputError(path, f"feature {name or group!r}: unknown geometry type {kind!r}")
    except (KeyError, TypeError) as exc:
        raise InputError(path, f"feature {name or group!r}: malformed {kind} ({exc!r})") from None


def _polygon_from_rings(path: Path, rings: Sequence, group: str, name: str) -> Polygon:
    if not rings:
        raise InputError(path, f"feature {name or group!r}: polygon without rings")
    try:
        arrays = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings]
    except (ValueError, IndexError):
        raise InputError(path, f"feature {name or group!r}: ring is not a list of [x, y] pairs") from None
    return _checked(path, arrays[0], arrays[1:], group, name)


def _checked(path: str | Path, ring: np.ndarray, holes: list[np.ndarray], group: str, name: str) -> Polygon:
    for r in (ring, *holes):
        if r.ndim != 2 or len(r) < 3 or not np.isfinite(r).all():
            raise InputError(path, f"annotation {name or group!r}: a ring needs ≥ 3 finite vertices")
    return Polygon(exterior=ring, holes=list(holes), group=group, name=name)


# ---- writing (demo slides, benchmark inputs, tests) ------------------------------------------
def write_asap_xml(path: str | Path, groups: dict[str, list[np.ndarray]]) -> None:
    """ASAP/CAMELYON annotation XML: one Polygon annotation per (K,2) array of level-0 (x, y)."""
    colours = ["#F4FA58", "#64FE2E", "#FA5858", "#5882FA"]
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    n = 0
    for g, (group, polygons) in enumerate(groups.items()):
        for poly in polygons:
            lines.append(
                f'\t\t<Annotation Name="Annotation {n}" Type="Polygon" PartOfGroup={quoteattr(group)} '
                f'Color="{colours[g % len(colours)]}">'
            )
            lines.append("\t\t\t<Coordinates>")
            for order, (x, y) in enumerate(np.asarray(poly, dtype=float)):
                lines.append(f'\t\t\t\t<Coordinate Order="{order}" X="{x:.1f}" Y="{y:.1f}" />')
            lines.append("\t\t\t</Coordinates>")
            lines.append("\t\t</Annotation>")
            n += 1
    lines += ["\t</Annotations>", "\t<AnnotationGroups>"]
    for group in groups:
        lines += [
            f'\t\t<Group Name={quoteattr(group)} PartOfGroup="None" Color="#ff0000">',
            "\t\t\t<Attributes />",
            "\t\t</Group>",
        ]
    lines += ["\t</AnnotationGroups>", "</ASAP_Annotations>", ""]
    fsio.write_text(path, "\n".join(lines))


# ---- checks and rasterisation --------------------------------------------------------------------
def check_inside(
    path: str | Path, polygons: Iterable[Polygon], width: int, height: int, tolerance: float = 0.01
) -> None:
    """InputError if a polygon reaches outside the slide (beyond a small relative tolerance).

    Vertices far outside usually mean the annotation belongs to another slide or another level.
    """
    tol_x, tol_y = tolerance * width, tolerance * height
    for i, poly in enumerate(polygons):
        x0, y0, x1, y1 = poly.bounds()
        if x0 < -tol_x or y0 < -tol_y or x1 > width + tol_x or y1 > height + tol_y:
            raise InputError(
                path,
                f"annotation {poly.name or i!r} (group {poly.group!r}) spans "
                f"x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}, outside the "
                f"{width}×{height} slide",
            )


def select(polygons: Iterable[Polygon], groups: Iterable[str]) -> list[Polygon]:
    wanted = set(groups)
    return [p for p in polygons if p.group in wanted]


def rasterize(
    polygons: Sequence[Polygon], shape: tuple[int, int], cell: float, exclude: Sequence[Polygon] = ()
) -> np.ndarray:
    """Boolean mask (rows, cols) = shape where cell (r, c) covers level-0 [c*cell, (c+1)*cell) × [r*cell, …).

    A cell is inside a polygon when its centre is inside the exterior ring and outside every hole
    (exact scan conversion at cell centres, even-odd rule per polygon). The mask is the union over
    ``polygons`` minus the union over ``exclude``.
    """
    mask = np.zeros(shape, dtype=bool)
    for poly in polygons:
        _paint(mask, poly, cell, True)
    for poly in exclude:
        _paint(mask, poly, cell, False)
    return mask


def _paint(mask: np.ndarray, poly: Polygon, cell: float, value: bool) -> None:
    """Scan-convert one polygon (with its holes) inside its bounding box, then OR / AND-NOT into ``mask``."""
    rows, cols = mask.shape
    x0, y0, x1, y1 = poly.bounds()
    r0, r1 = max(int(math.floor(y0 / cell)), 0), min(int(math.ceil(y1 / cell)) + 1, rows)
    c0, c1 = max(int(math.floor(x0 / cell)), 0), min(int(math.ceil(x1 / cell)) + 1, cols)
    if r1 <= r0 or c1 <= c0:
        return
    inside = _scanline_fill([poly.exterior, *poly.holes], cell, r0, r1, c0, c1)
    box = mask[r0:r1, c0:c1]
    if value:
        box |= inside
    else:
        box &= ~inside


def _scanline_fill(rings: Sequence[np.ndarray], cell: float, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Cells of rows r0..r1-1, cols c0..c1-1 whose centre is inside the rings (even-odd), vectorised.

    Every edge contributes one crossing per row centre y with min(ya, yb) <= y < max(ya, yb)
    (half-open, so vertices are counted once and each row has an even number of crossings); sorted
    crossings pair up into spans, filled through a difference array.
    """
    a = np.concatenate([r for r in rings])
    b = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
    ya, yb = a[:, 1] / cell - 0.5, b[:, 1] / cell - 0.5  # in row-centre units
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    start = np.clip(np.ceil(lo), r0, r1).astype(np.int64)
    stop = np.clip(np.ceil(hi), r0, r1).astype(np.int64)
    n = stop - start
    edge = np.repeat(np.arange(len(a)), n)
    row = start[edge] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    t = (row - ya[edge]) / (yb[edge] - ya[edge])
    xcol = (a[edge, 0] + t * (b[edge, 0] - a[edge, 0])) / cell - 0.5  # in column-centre units
    order = np.lexsort((xcol, row))
    row, xcol = row[order], xcol[order]
    first = np.clip(np.ceil(xcol[0::2]), c0, c1).astype(np.int64) - c0
    last = np.clip(np.ceil(xcol[1::2]), c0, c1).astype(np.int64) - c0
    rr = row[0::2] - r0
    diff = np.zeros((r1 - r0, c1 - c0 + 1), dtype=np.int32)
    np.add.at(diff, (rr, first), 1)
    np.add.at(diff, (rr, last), -1)
    return np.cumsum(diff, axis=1)[:, :-1] > 0

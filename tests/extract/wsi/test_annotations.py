"""ASAP XML / GeoJSON parsing and rasterisation (medflow.annotations)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from medflow.core.errors import InputError
from medflow.extract.wsi import annotations as ann


def _inside(poly: ann.Polygon, points: np.ndarray) -> np.ndarray:
    """Independent point-in-polygon: exterior minus holes (matplotlib)."""
    inside = MplPath(poly.exterior).contains_points(points)
    for hole in poly.holes:
        inside &= ~MplPath(hole).contains_points(points)
    return inside


def _circle(cx: float, cy: float, r: float, k: int = 64) -> list[list[float]]:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).tolist()


def test_real_camelyon17_xml_parses_every_polygon_and_vertex(shared_data: Path) -> None:
    path = shared_data / "camelyon17_xml" / "patient_004_node_4.xml"
    root = ET.parse(path).getroot()
    expected = [(a.get("PartOfGroup"), len(a.findall("./Coordinates/Coordinate"))) for a in root.iter("Annotation")]
    polygons = ann.load(path)
    assert [(p.group, len(p.exterior)) for p in polygons] == expected
    assert len(polygons) == len(expected) > 0
    assert {p.group for p in polygons} == {"metastases"}
    first = root.find(".//Annotation/Coordinates/Coordinate[@Order='0']")
    assert polygons[0].exterior[0].tolist() == [float(first.get("X")), float(first.get("Y"))]


def test_asap_vertices_follow_the_order_attribute(tmp_path: Path) -> None:
    xml = tmp_path / "a.xml"
    xml.write_text("""<?xml version="1.0"?><ASAP_Annotations><Annotations>
      <Annotation Name="A" Type="Polygon" PartOfGroup="_0"><Coordinates>
        <Coordinate Order="2" X="10" Y="10"/><Coordinate Order="0" X="0" Y="0"/>
        <Coordinate Order="1" X="10" Y="0"/><Coordinate Order="3" X="0" Y="10"/>
      </Coordinates></Annotation>
      <Annotation Name="dot" Type="Dot" PartOfGroup="_0"><Coordinates>
        <Coordinate Order="0" X="5" Y="5"/></Coordinates></Annotation>
    </Annotations></ASAP_Annotations>""")
    (poly,) = ann.load(xml)
    assert poly.exterior.tolist() == [[0, 0], [10, 0], [10, 10], [0, 10]]
    assert poly.group == "_0"


def test_geojson_multipolygon_with_holes_rasterises_like_point_in_polygon(tmp_path: Path) -> None:
    donut = [_circle(400, 400, 300), _circle(400, 400, 120)]
    square = [[[800, 100], [1000, 100], [1000, 300], [800, 300], [800, 100]]]
    doc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "MultiPolygon", "coordinates": [donut, square]},
                "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
            },
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
        ],
    }
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(doc))
    polygons = ann.load(path)
    assert [len(p.holes) for p in polygons] == [1, 0]
    assert {p.group for p in polygons} == {"Tumor"}

    cell = 10.0
    mask = ann.rasterize(polygons, (80, 110), cell)
    rr, cc = np.mgrid[0:80, 0:110]
    centres = np.stack([(cc.ravel() + 0.5) * cell, (rr.ravel() + 0.5) * cell], axis=1)
    expected = np.zeros(len(centres), bool)
    for poly in polygons:
        expected |= _inside(poly, centres)
    expected = expected.reshape(mask.shape)
    assert not mask[40, 40]  # centre of the hole
    assert mask[40, 40 + 20] and mask[20, 90]  # ring and square
    disagree = (mask != expected).mean()
    assert disagree < 0.002, f"{disagree:.3%} of cells disagree with point-in-polygon"


def test_exclusion_groups_are_subtracted(tmp_path: Path) -> None:
    tumour = ann.Polygon(np.array([[0, 0], [100, 0], [100, 100], [0, 100]], float), group="_0")
    excl = ann.Polygon(np.array([[50, 0], [100, 0], [100, 100], [50, 100]], float), group="_2")
    mask = ann.rasterize([tumour], (10, 10), 10.0, exclude=[excl])
    assert mask[:, :4].all() and not mask[:, 6:].any()


@pytest.mark.parametrize(
    "name,text,problem",
    [
        ("bad.xml", "<ASAP_Annotations><Annotations><Annotation>", "malformed ASAP XML"),
        ("other.xml", "<svg></svg>", "not an ASAP annotation file"),
        (
            "nan.xml",
            '<ASAP_Annotations><Annotations><Annotation Type="Polygon"><Coordinates>'
            '<Coordinate Order="0" X="a" Y="1"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
            "numeric",
        ),
        ("bad.geojson", '{"type": "FeatureCollection", "features": [', "malformed GeoJSON"),
        ("ring.geojson", '{"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}', "≥ 3 finite vertices"),
        ("kind.json", '{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [0, 0]}}', "unknown geometry"),
        ("notes.txt", "hello", "unknown annotation format"),
    ],
)
def test_malformed_annotations_name_the_file(tmp_path: Path, name: str, text: str, problem: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as err:
        ann.load(path)
    assert err.value.path == str(path)
    assert problem in err.value.problem


def test_annotation_outside_the_slide_is_an_error() -> None:
    poly = ann.Polygon(np.array([[100, 100], [5000, 100], [5000, 400]], float), group="_0", name="A7")
    ann.check_inside("x.xml", [poly], 6000, 1000)  # inside: no error
    with pytest.raises(InputError, match="outside the 4000×1000 slide"):
        ann.check_inside("x.xml", [poly], 4000, 1000)

"""More than two classes from annotations: wsi.labels.groups (nested ASAP groups, QuPath classes),
precedence, exclusions, unsampled groups, per-class quotas, errors; the two-class form unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from test_wsi_extraction import _assert_nothing_written, _cli, _cohort_cfg, _load, _run

from medflow.core.errors import InputError
from medflow.core.manifest import ImageEntry
from medflow.extract.wsi import annotations as ann_mod
from medflow.extract.wsi import classes
from medflow.extract.wsi.pyramid import write_pyramid_tiff
from medflow.extract.wsi.sampling import Coverage, label_map, slide_annotations

W, H, MARGIN, P = 2240, 1792, 64, 224  # slide, tissue margin, patch (0.5 µm/px, level 0)
CLASSES = ["normal", "stroma", "tumour"]
GROUPS = {"Tumor": "tumour", "Stroma": "stroma", "Ignore_me": ""}


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


# Regions on multiples of 28 px (the coverage cell, 224/8), so patch coverages are exact eighths.
TUMOUR = _rect(224, 224, 1120, 896)  # group Tumor_invasive, child of Tumor
STROMA = _rect(896, 672, 1792, 1344)  # group Stroma (child of the unmapped Tissue_types); overlaps TUMOUR
EXCLUDED = _rect(448, 448, 672, 672)  # group Exclusion: a hole in the tumour → unannotated tissue
IGNORED = _rect(1568, 224, 2016, 448)  # group Ignore_me, mapped to "": never sampled
HALF = _rect(1792 - 112, 1344, 1792 + 112, 1568)  # Stroma covering half of patch (1792, 1344)

NESTED_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
{annotations}
  </Annotations>
  <AnnotationGroups>
    <Group Name="Tumor" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
    <Group Name="Tumor_invasive" PartOfGroup="Tumor" Color="#ff0000"><Attributes /></Group>
    <Group Name="Tissue_types" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>
    <Group Name="Stroma" PartOfGroup="Tissue_types" Color="#00ff00"><Attributes /></Group>
    <Group Name="Exclusion" PartOfGroup="None" Color="#000000"><Attributes /></Group>
    <Group Name="Ignore_me" PartOfGroup="None" Color="#888888"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def _asap(name: str, group: str, ring: np.ndarray) -> str:
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(ring))
    return f'    <Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}"><Coordinates>{coords}</Coordinates></Annotation>'


def _feature(cls: dict | str, ring: np.ndarray) -> dict:
    coords = [[*map(float, p)] for p in ring] + [[*map(float, ring[0])]]
    props = {"classification": cls if isinstance(cls, dict) else {"name": cls}}
    return {"type": "Feature", "properties": props, "geometry": {"type": "Polygon", "coordinates": [coords]}}


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_classes_slide(tmp_path_factory.mktemp("classes"))


def write_classes_slide(d: Path, seed: int = 11) -> dict[str, Path]:
    """A textured pyramid with three classes' regions as nested ASAP XML and as GeoJSON (+ one unmapped);
    ``seed`` draws the texture (distinct slides for distinct patients)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((H, W, 3), 242, np.uint8)
    rgb[MARGIN : H - MARGIN, MARGIN : W - MARGIN] = rng.integers(0, 60, (H - 2 * MARGIN, W - 2 * MARGIN, 3)) + np.array(
        [170, 90, 140], np.uint8
    )
    write_pyramid_tiff(d / "slide.tiff", rgb, mpp=0.5, tile=256)
    items = [
        ("t", "Tumor_invasive", TUMOUR),
        ("s", "Stroma", STROMA),
        ("e", "Exclusion", EXCLUDED),
        ("i", "Ignore_me", IGNORED),
        ("h", "Stroma", HALF),
    ]
    (d / "nested.xml").write_text(NESTED_XML.format(annotations="\n".join(_asap(*item) for item in items)))
    features = [
        _feature({"names": ["Tumor", "Positive"]}, TUMOUR),  # QuPath ≥ 0.4 derived class, parent "Tumor"
        _feature("Stroma", STROMA),
        _feature("Exclusion", EXCLUDED),
        _feature("Ignore_me", IGNORED),
        _feature("Stroma", HALF),
    ]
    (d / "classes.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    features.append(_feature("Necrosis", _rect(300, 1300, 500, 1500)))
    (d / "unmapped.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return {"slide": d / "slide.tiff", "xml": d / "nested.xml", "geojson": d / "classes.geojson",
            "unmapped": d / "unmapped.geojson"}  # fmt: skip


def _mapping_cfg(default_cfg: dict, tmp: Path, rows: list[dict], **over) -> dict:
    labels = {"classes": CLASSES, "groups": GROUPS, "background": "normal", **over.pop("labels", {})}
    return _cohort_cfg(default_cfg, tmp, rows, mpp=0.5, labels=labels, **over)


# ---- independent truth: point-in-polygon at the 28-px cell centres (matplotlib) --------------------------
def _cover(ring: np.ndarray, x: int, y: int) -> np.ndarray:
    g = (np.arange(8) + 0.5) * P / 8
    pts = np.stack(np.meshgrid(x + g, y + g), axis=-1).reshape(-1, 2)
    return MplPath(ring).contains_points(pts)


def _expected(x: int, y: int) -> int | None:
    """Label of the grid patch at (x, y): tumour over stroma, minus the exclusion, background = normal."""
    hole = _cover(EXCLUDED, x, y)
    tumour = _cover(TUMOUR, x, y) & ~hole
    stroma = (_cover(STROMA, x, y) | _cover(HALF, x, y)) & ~hole & ~tumour
    ignored = _cover(IGNORED, x, y)
    g = (np.arange(8) + 0.5) * P / 8
    px, py = np.meshgrid(x + g, y + g)
    tissue = ((px > MARGIN) & (px < W - MARGIN) & (py > MARGIN) & (py < H - MARGIN)).ravel()
    tumour, stroma = tumour & tissue, stroma & tissue  # tumour_on_tissue
    best = max((tumour.mean(), 2), (stroma.mean(), 1))
    if best[0] >= 0.6:
        return best[1]
    if not tumour.any() and not stroma.any() and not ignored.any() and tissue.mean() >= 0.8:
        return 0
    return None


def _grid_labels(path: Path) -> dict[tuple[int, int], int]:
    _, coords, labels, _ = _load(path)
    return {tuple(c): int(v) for c, v in zip(coords.tolist(), labels.tolist())}


# ---- the mapping form ------------------------------------------------------------------------------------
def test_nested_asap_groups_map_to_three_classes_with_precedence_and_exclusion(slide, default_cfg, tmp_path):
    rows = [{"image_id": "x", "patient_id": "p", "image": slide["slide"], "annotation": slide["xml"]}]
    cfg = _mapping_cfg(default_cfg, tmp_path, rows, sampling={"mode": "grid"})
    rec = _run(cfg, tmp_path, "x")
    got = _grid_labels(tmp_path / "out" / "x.h5")
    want = {(x, y): _expected(x, y) for x in range(0, W - P + 1, P) for y in range(0, H - P + 1, P)}
    assert got == {xy: lab for xy, lab in want.items() if lab is not None}
    assert got[(896, 672)] == 2  # tumour and stroma overlap: the later class (tumour) wins
    assert got[(448, 448)] == 0  # the excluded hole in the tumour is unannotated tissue
    assert (1568, 224) not in got and (1792, 224) not in got  # Ignore_me ("") is never sampled
    assert (1568, 1344) not in got and (1792, 1344) not in got  # half-covered by stroma: neither class
    assert got[(1568, 1120)] == 1 and got[(224, 1344)] == 0  # fully stroma; plain tissue
    assert rec["counts"] == {name: sum(v == i for v in got.values()) for i, name in enumerate(CLASSES)}
    assert all(rec["counts"][c] > 0 for c in CLASSES) and rec["wsi"]["unsampled_groups"] == ["Ignore_me"]
    attrs = _load(tmp_path / "out" / "x.h5")[3]
    assert attrs["class_names"] == CLASSES


def test_geojson_classes_and_derived_classes_give_the_same_shard_as_the_xml(slide, default_cfg, tmp_path):
    rows = [
        {"image_id": "xml", "patient_id": "p", "image": slide["slide"], "annotation": slide["xml"]},
        {"image_id": "geo", "patient_id": "p", "image": slide["slide"], "annotation": slide["geojson"]},
    ]
    cfg = _mapping_cfg(default_cfg, tmp_path, rows, sampling={"mode": "grid"})
    _run(cfg, tmp_path, "xml")
    _run(cfg, tmp_path, "geo")
    a, b = _load(tmp_path / "out" / "xml.h5"), _load(tmp_path / "out" / "geo.h5")
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    assert set(a[2].tolist()) == {0, 1, 2}


def test_per_class_quotas_in_random_mode(slide, default_cfg, tmp_path):
    rows = [{"image_id": "q", "patient_id": "p", "image": slide["slide"], "annotation": slide["xml"]}]
    cfg = _mapping_cfg(default_cfg, tmp_path, rows, sampling={"per_class": 7, "quota": {"tumour": 5, "stroma": 0}})
    rec = _run(cfg, tmp_path, "q")
    assert rec["counts"] == {"normal": 7, "stroma": 0, "tumour": 5}


def test_unannotated_tissue_is_not_sampled_without_a_background_class(slide, default_cfg, tmp_path):
    rows = [{"image_id": "b", "patient_id": "p", "image": slide["slide"], "annotation": slide["xml"]}]
    labels = {"classes": ["stroma", "tumour"], "groups": GROUPS, "background": ""}
    cfg = _mapping_cfg(default_cfg, tmp_path, rows, labels=labels, sampling={"mode": "grid"})
    _run(cfg, tmp_path, "b")
    got = _grid_labels(tmp_path / "out" / "b.h5")
    grid = [(x, y) for x in range(0, W - P + 1, P) for y in range(0, H - P + 1, P)]
    assert got == {xy: _expected(*xy) - 1 for xy in grid if _expected(*xy) in (1, 2)}  # classes [stroma, tumour]
    assert (448, 448) not in got and (224, 1344) not in got and set(got.values()) == {0, 1}


# ---- errors ------------------------------------------------------------------------------------------------
def test_an_annotation_class_not_in_the_map_is_one_line_exit_2_nothing_written(slide, default_cfg, tmp_path, capsys):
    rows = [{"image_id": "u", "patient_id": "p", "image": slide["slide"], "annotation": slide["unmapped"]}]
    cfg = _mapping_cfg(default_cfg, tmp_path, rows)
    assert _cli(cfg, tmp_path, "u") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow extract-wsi: error: {slide['unmapped']}: annotation group 'Necrosis'")
    assert "wsi.labels.groups" in err and "\n" not in err
    _assert_nothing_written(tmp_path / "out")


def test_real_camelyon17_xml_maps_its_group_or_names_it(shared_data, slide, default_cfg, tmp_path, capsys):
    xml = shared_data / "camelyon17_xml" / "patient_004_node_4.xml"
    entry = ImageEntry(image_id="c17", patient_id="p", image="", annotation=str(xml))
    labels = {"classes": CLASSES, "groups": {"metastases": "tumour", "Stroma": "stroma"}, "background": "normal"}
    cmap = classes.class_map({**default_cfg["wsi"]["labels"], **labels})
    ann = slide_annotations(entry, (100_000, 220_000), cmap)  # CAMELYON17 level 0 is ~100k × 220k px
    assert [len(ann.regions[c]) for c in (1, 2)] == [0, 3] and not ann.exclude and not ann.other
    assert [len(p.exterior) for p in ann.regions[2]] == [len(p.exterior) for p in ann_mod.load(xml)]
    # the same file under a map without its group: one line naming the file and the group, exit 2
    rows = [{"image_id": "c", "patient_id": "p", "image": slide["slide"], "annotation": xml}]
    cfg = _mapping_cfg(default_cfg, tmp_path, rows, labels={"groups": {"Tumor": "tumour", "Stroma": "stroma"}})
    assert _cli(cfg, tmp_path, "c") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow extract-wsi: error: {xml}: annotation group 'metastases'") and "\n" not in err
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "labels, sampling, problem",
    [
        ({"classes": CLASSES, "groups": {}}, {}, "wsi.labels.classes: ['normal', 'stroma', 'tumour'] must be"),
        ({"groups": {**GROUPS, "Tumor": "cancer"}}, {}, "wsi.labels.groups.Tumor: 'cancer' is not one of"),
        ({"background": "other"}, {}, "wsi.labels.background: 'other' is not one of"),
        ({"background": ""}, {}, "wsi.labels.classes: ['normal'] is neither wsi.labels.background"),
        ({"groups": {**GROUPS, "Exclusion": "tumour"}}, {}, "wsi.labels.groups: ['Exclusion'] are also in"),
        ({"classes": ["normal", "tumour", "normal"]}, {}, "duplicate class names"),
        ({}, {"quota": {"necrosis": 3}}, "wsi.sampling.quota: ['necrosis'] not in wsi.labels.classes"),
    ],
)
def test_inconsistent_label_config_is_one_line_naming_the_key(
    slide, default_cfg, tmp_path, capsys, labels, sampling, problem
):
    rows = [{"image_id": "k", "patient_id": "p", "image": slide["slide"], "annotation": slide["xml"]}]
    cfg = _mapping_cfg(default_cfg, tmp_path, rows, labels=labels, sampling=sampling)
    assert _cli(cfg, tmp_path, "k") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow extract-wsi: error: {tmp_path / 'config.yaml'}: ") and problem in err
    assert "\n" not in err
    _assert_nothing_written(tmp_path / "out")


def test_group_cycle_is_an_input_error(tmp_path):
    xml = tmp_path / "cycle.xml"
    xml.write_text(
        NESTED_XML.format(annotations=_asap("a", "A", TUMOUR)).replace(
            '<Group Name="Tumor" PartOfGroup="None"',
            '<Group Name="A" PartOfGroup="B"><Attributes /></Group><Group Name="B" PartOfGroup="A"',
        )
    )
    with pytest.raises(InputError, match="annotation groups form a cycle: A → B → A"):
        ann_mod.load(xml)


def test_lineage_of_asap_groups_and_qupath_classes(slide):
    by_name = {p.name: p for p in ann_mod.load(slide["xml"])}
    assert by_name["t"].lineage == ("Tumor_invasive", "Tumor")
    assert by_name["s"].lineage == ("Stroma", "Tissue_types")
    assert ann_mod.derived_class_parents("Tumor: Positive: Strong") == ("Tumor: Positive", "Tumor")
    geo = ann_mod.load(slide["geojson"])
    assert geo[0].group == "Tumor: Positive" and geo[0].lineage == ("Tumor: Positive", "Tumor")


# ---- the two-class form is unchanged -----------------------------------------------------------------------
def test_two_class_label_map_equals_the_original_rule() -> None:
    """The original (pre-mapping) rule, restated: tumour where tumour coverage ≥ tumour_min; normal where
    no tumour, no unrecognised annotation and tissue ≥ normal_tissue_min."""
    rng = np.random.default_rng(4)
    k, shape = 8, (40, 50)
    tumour = rng.choice([0, 0, 0, 10, 40, 64], shape).astype(np.uint16)
    tissue = rng.integers(40, 65, shape).astype(np.uint16)
    other = rng.choice([0, 0, 0, 5], shape).astype(np.uint16)
    labels_cfg = {"tumour_min": 0.6, "normal_tissue_min": 0.8}
    old = np.full(shape, -1, np.int8)
    old[(tumour == 0) & (other == 0) & (tissue >= math.ceil(0.8 * 64))] = 0
    old[tumour >= math.ceil(0.6 * 64)] = 1
    cov = Coverage(cell=28.0, k=k, regions={1: tumour}, tissue=tissue, other=other)
    np.testing.assert_array_equal(label_map(cov, labels_cfg, background=0), old)
    assert set(np.unique(old)) == {-1, 0, 1}


def test_two_class_form_is_the_default_class_map(default_cfg) -> None:
    cmap = classes.class_map(default_cfg["wsi"]["labels"])
    assert cmap.classes == ("normal", "tumour") and cmap.background == 0 and not cmap.strict
    assert cmap.annotated == [1] and set(cmap.groups) == set(default_cfg["wsi"]["labels"]["tumour_groups"])

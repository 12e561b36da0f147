"""The QC image of an extracted slide (<image_id>.qc.png): what it draws, where, and its lifecycle."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image
from test_wsi_extraction import MARGIN, H, W, _cli, _cohort_cfg, _load, _run, write_synthetic

from medflow.core import fsio
from medflow.extract.wsi import qc
from medflow.extract.wsi.annotations import Polygon, write_asap_xml
from medflow.extract.wsi.sampling import SlideAnnotations
from medflow.extract.wsi.tissue import TissueMask


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"))


def test_overlay_draws_boxes_polygons_and_contour_in_their_colours() -> None:
    rgb = np.full((100, 200, 3), 230, np.uint8)
    thumb = qc.Thumb(rgb=rgb, scale_x=10.0, scale_y=10.0)  # a 2000 × 1000 px slide
    mask = np.zeros((50, 100), bool)  # cell 20 level-0 px
    mask[10:40, 20:80] = True  # tissue: level-0 x 400..1600, y 200..800 → thumbnail x 40..160, y 20..80
    tm = TissueMask(mask=mask, cell=20.0, threshold=10.0, level=0)
    tumour = Polygon(exterior=np.array([[500.0, 300.0], [900.0, 300.0], [900.0, 700.0], [500.0, 700.0]]))
    hole = Polygon(exterior=np.array([[600.0, 400.0], [700.0, 400.0], [700.0, 500.0], [600.0, 500.0]]))
    ann = SlideAnnotations({1: [tumour]}, [hole], [])
    colours = qc.class_colours(["normal", "tumour"])
    coords = np.array([[1000, 300], [1300, 500]])
    labels = np.array([0, 1])
    rejected = np.array([[400, 600]])
    image = np.asarray(qc.overlay(thumb, tm, ann, colours, coords, labels, rejected, 200.0))
    assert tuple(image[30 + 10, 100]) == qc.NAMED_COLOURS["normal"]  # left edge of the box at (100, 30)
    assert tuple(image[30 + 10, 101]) == (230, 230, 230)  # its inside is left clear
    assert tuple(image[50 + 10, 130 + 19]) == qc.NAMED_COLOURS["tumour"]  # right edge of the box at (130, 50)
    assert tuple(image[60 + 10, 40]) == qc.REJECTED_COLOUR  # left edge of the rejected box at (40, 60)
    assert tuple(image[50, 90]) == qc.NAMED_COLOURS["tumour"]  # the polygon's right side (x 90)
    assert tuple(image[45, 60]) == qc.EXCLUDE_COLOUR  # the exclusion's left side (x 60)
    assert tuple(image[20, 120]) == qc.TISSUE_COLOUR and tuple(image[50, 160]) == qc.TISSUE_COLOUR
    assert tuple(image[5, 5]) == (230, 230, 230) and tuple(image[50, 110]) == (230, 230, 230)  # untouched


def test_thumbnail_takes_a_fitting_level_or_the_scanner_thumbnail(shared_data, tmp_path) -> None:
    svs = openslide.OpenSlide(str(shared_data / "cmu1_small_region" / "CMU-1-Small-Region.svs"))
    thumb = qc.read_thumbnail(svs, 1024)  # one level of 2220 × 2967: the scanner's 574 × 768 thumbnail
    assert thumb.rgb.shape == (768, 574, 3)
    np.testing.assert_array_equal(thumb.rgb, np.asarray(svs.associated_images["thumbnail"].convert("RGB")))
    small = qc.read_thumbnail(svs, 300)  # no level or thumbnail within [150, 300]: level 0 reduced
    assert max(small.rgb.shape[:2]) == 300 and small.scale_y == pytest.approx(2967 / 300, rel=0.01)


def test_extraction_writes_the_qc_image_and_records_it(synthetic, default_cfg, tmp_path) -> None:
    rows = [{"image_id": "s", "patient_id": "p", "image": synthetic["slide"], "annotation": synthetic["xml"]}]
    cfg = _cohort_cfg(default_cfg, tmp_path, rows, mpp=0.5, sampling={"mode": "grid"})
    rec = _run(cfg, tmp_path, "s")
    png = tmp_path / "out" / "s.qc.png"
    assert rec["qc"]["png"] == "s.qc.png" and png.is_file() and rec["timings_s"]["qc"] > 0
    with Image.open(png) as img:
        assert img.format == "PNG" and list(img.size) == rec["qc"]["size"]
        # the slide (2240 × 1792) at its pyramid level of 560 × 448 (within [512, 1024]), title and legend
        assert img.width == 560 and img.height > 448
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    for colour in (qc.NAMED_COLOURS["normal"], qc.NAMED_COLOURS["tumour"], qc.TISSUE_COLOUR, qc.EXCLUDE_COLOUR):
        assert min(sum(abs(a - b) for a, b in zip(colour, c)) for c in colours) <= 24, colour  # 256-colour palette
    tissue_mm2 = (W - 2 * MARGIN) * (H - 2 * MARGIN) * 0.5**2 / 1e6  # the textured rectangle
    assert rec["wsi"]["tissue_mm2"] == pytest.approx(tissue_mm2, rel=0.05)


def test_rejected_patches_of_a_real_slide_are_counted_and_drawn(shared_data, default_cfg, tmp_path) -> None:
    svs = shared_data / "cmu1_small_region" / "CMU-1-Small-Region.svs"
    rows = [{"image_id": "cmu", "patient_id": "p", "image": svs}]
    cfg = _cohort_cfg(default_cfg, tmp_path, rows, mpp=0.5, sampling={"per_class": 30}, quality={"max_white": 0.1})
    rec = _run(cfg, tmp_path, "cmu")
    assert rec["quality_rejected"] > 0 and rec["n_patches"] == 30
    assert rec["qc"]["rejected_fraction"] == pytest.approx(rec["quality_rejected"] / rec["patches_read"])
    assert rec["qc"]["size"][0] == 574  # the scanner's thumbnail (574 × 768), as it is
    with Image.open(tmp_path / "out" / "cmu.qc.png") as img:
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert min(sum(abs(a - b) for a, b in zip(qc.REJECTED_COLOUR, c)) for c in colours) <= 24


def test_qc_off_writes_no_image(synthetic, default_cfg, tmp_path) -> None:
    rows = [{"image_id": "n", "patient_id": "p", "image": synthetic["slide"]}]
    cfg = _cohort_cfg(default_cfg, tmp_path, rows, sampling={"per_class": 5}, qc={"max_px": 0})
    rec = _run(cfg, tmp_path, "n")
    assert "qc" not in rec and "qc" not in rec["timings_s"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["n.h5", "n.record.json"]


def test_a_failed_rerun_keeps_or_removes_the_qc_image_with_the_shard(synthetic, default_cfg, tmp_path) -> None:
    row = {"image_id": "f", "patient_id": "p", "image": synthetic["slide"]}
    good = _cohort_cfg(default_cfg, tmp_path, [row], sampling={"per_class": 5})
    _run(good, tmp_path, "f")
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"f.h5", "f.qc.png", "f.record.json"}
    bad_xml = tmp_path / "far.xml"
    write_asap_xml(bad_xml, {"_0": [np.array([[100, 100], [9000, 100], [9000, 900]], float)]})
    bad_row = {**row, "annotation": bad_xml}
    # on_error: fail — the earlier good outputs survive the failed job, untouched
    assert _cli(_cohort_cfg(default_cfg, tmp_path, [bad_row], sampling={"per_class": 5}), tmp_path, "f") == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # on_error: skip — a failed record and neither shard nor QC image
    skip = _cohort_cfg(default_cfg, tmp_path, [bad_row], sampling={"per_class": 5}, on_error="skip")
    assert _cli(skip, tmp_path, "f") == 0
    assert sorted(p.name for p in out.iterdir()) == ["f.record.json"]
    assert fsio.read_json(out / "f.record.json")["status"] == "failed"


def test_the_qc_image_shows_what_the_shard_holds(synthetic, default_cfg, tmp_path, monkeypatch) -> None:
    """The boxes drawn are the shard's coords and labels (read back from the written shard)."""
    seen: dict = {}
    original = qc.draw

    def spy(thumb, tm, ann, names, coords, labels, rejected, footprint, title):
        seen.update(coords=coords, labels=labels, footprint=footprint)
        return original(thumb, tm, ann, names, coords, labels, rejected, footprint, title)

    monkeypatch.setattr(qc, "draw", spy)
    rows = [{"image_id": "w", "patient_id": "p", "image": synthetic["slide"], "annotation": synthetic["geojson"]}]
    cfg = _cohort_cfg(default_cfg, tmp_path, rows, mpp=1.0, patch_size=96, sampling={"per_class": 9})
    _run(cfg, tmp_path, "w")
    _, coords, labels, attrs = _load(tmp_path / "out" / "w.h5")
    np.testing.assert_array_equal(seen["coords"], coords)
    np.testing.assert_array_equal(seen["labels"], labels)
    assert seen["footprint"] == attrs["read_size"] * attrs["downsample"] == 192

"""The synthetic demo cohort: real formats (OpenSlide pyramids, ASAP XML, raw mosaics), deterministic."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import openslide
import pytest
from PIL import Image

from medflow.core import config as config_mod
from medflow.core import fsio
from medflow.core import manifest as cohort
from medflow.core.seeds import rng_for
from medflow.demo import cohort as synth
from medflow.demo.content import _polygon_mask, hsi_signatures, make_hsi, make_slide
from medflow.extract.wsi.pyramid import write_pyramid_tiff


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = config_mod.validate(
        {
            "seed": 7,
            "synth": {
                "out": str(out / "demo"),
                "wsi": {"patients": 2, "width": 1024, "height": 768},
                "hsi": {"patients": 2, "mosaic_height": 100, "mosaic_width": 150},
            },
            "cohorts": {
                "w": {"kind": "wsi", "manifest": str(out / "demo" / "wsi" / "manifest.csv")},
                "h": {"kind": "hsi", "manifest": str(out / "demo" / "hsi" / "manifest.csv")},
            },
        }
    )
    synth.write_cohort(cfg)
    return cfg


def test_plan_matches_written_manifests_and_files(small_cohort):
    cfg = small_cohort
    planned = synth.plan(cfg)
    for kind, name in (("wsi", "w"), ("hsi", "h")):
        written = cohort.read_manifest(cfg["cohorts"][name]["manifest"])
        assert cfg["cohorts"][name]["manifest"] == synth.manifest_path(cfg, kind)
        assert [e.image_id for e in written] == [e.image_id for e in planned[kind]]
        assert [e.patient_id for e in written] == [e.patient_id for e in planned[kind]]
        for w, p in zip(written, planned[kind]):
            assert [fsio.sha256_file(a) for a in w.files()] == [fsio.sha256_file(b) for b in p.files()]
    for path in synth.planned_files(cfg):
        assert fsio.sha256_file(path)  # exists and readable


def test_parallel_slide_writers_write_the_same_files(small_cohort, tmp_path):
    """Each slide has its own random stream, so `--workers 2` writes byte-identical slides and annotations."""
    cfg = {**small_cohort, "synth": {**small_cohort["synth"], "out": str(tmp_path / "demo")}}
    synth.write_cohort(cfg, only="wsi", workers=2)
    one, two = synth.plan(small_cohort)["wsi"], synth.plan(cfg)["wsi"]
    assert len(one) == len(two) > 1
    for a, b in zip(one, two):
        assert a.image != b.image
        assert [fsio.sha256_file(f) for f in (a.image, a.annotation)] == [
            fsio.sha256_file(f) for f in (b.image, b.annotation)
        ]


def test_slides_are_openslide_pyramids_with_mpp(small_cohort):
    for e in synth.plan(small_cohort)["wsi"]:
        slide = openslide.OpenSlide(e.image)
        assert slide.level_count > 1
        assert slide.level_dimensions[0] == (1024, 768)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5, rel=1e-3)
        assert slide.level_downsamples[1] == pytest.approx(2.0)


def test_tumour_polygons_mark_darker_denser_tissue(small_cohort):
    for e in synth.plan(small_cohort)["wsi"]:
        root = ET.parse(e.annotation).getroot()
        polys = [
            np.array([[float(c.get("X")), float(c.get("Y"))] for c in a.iter("Coordinate")])
            for a in root.iter("Annotation")
        ]
        assert polys and all(a.get("PartOfGroup") == "metastases" for a in root.iter("Annotation"))
        rgb = np.asarray(openslide.OpenSlide(e.image).read_region((0, 0), 0, (1024, 768)).convert("RGB"), float)
        inside = _polygon_mask((768, 1024), polys)
        tissue = rgb.mean(axis=2) < 225
        assert inside.sum() > 1000
        # Tumour regions are darker (more, larger hematoxylin-stained nuclei) than normal tissue.
        assert rgb[inside & tissue].mean() < rgb[~inside & tissue].mean() - 5


def test_hsi_mosaic_references_and_ground_truth(small_cohort):
    for e in synth.plan(small_cohort)["hsi"]:
        raw, white, dark = (np.load(p) for p in (e.image, e.white, e.dark))
        gt = np.asarray(Image.open(e.annotation))
        assert raw.shape == white.shape == dark.shape == (100, 150)
        assert gt.shape == (20, 30)  # mosaic / 5
        assert set(np.unique(gt)) == {0, 1, 2, 3, 4, 5}  # unlabelled + five classes
        assert np.all(white > dark) and np.all(raw >= dark - 20)


def test_hsi_signatures_distinct_but_healthy_close_to_tumour():
    sig = hsi_signatures()
    sig = sig / np.sqrt((sig**2).mean(axis=1, keepdims=True))  # as after RMS normalisation
    dist = np.sqrt(((sig[:, None] - sig[None]) ** 2).sum(-1))
    off = dist[~np.eye(5, dtype=bool)]
    assert off.min() > 0.01
    assert dist[0, 1] == pytest.approx(off.min())  # healthy vs tumour: the closest pair


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (make_hsi(rng_for(s, "hsi", "x"), 50, 50) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    for seed, name in ((3, "a.tiff"), (3, "b.tiff")):
        rgb, _ = make_slide(rng_for(seed, "wsi", "s"), 600, 520, 0.5)
        write_pyramid_tiff(tmp_path / name, rgb, 0.5)
    assert fsio.sha256_file(tmp_path / "a.tiff") == fsio.sha256_file(tmp_path / "b.tiff")


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"user data")
    with pytest.raises(RuntimeError):
        with fsio.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]

"""WSI extraction (medflow.wsi): real OpenSlide reads of real SVS files and synthetic pyramids."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image

from conftest import write_config
from medflow import cli
from medflow.core import config as config_mod
from medflow.core import fsio
from medflow.core.errors import InputError
from medflow.core.manifest import ImageEntry
from medflow.core.shards import read_attrs
from medflow.extract.wsi import job as wsi
from medflow.extract.wsi.annotations import write_asap_xml
from medflow.extract.wsi.pyramid import write_pyramid_tiff
from medflow.extract.wsi.quality import quality_ok
from medflow.extract.wsi.sampling import _box_counts
from medflow.extract.wsi.slide import ReadPlan, RegionReader, choose_level

# Synthetic slide: 10×8 patches of 224 px at 0.5 µm/px; a tumour "donut" centred on grid patch (4, 3).
W, H, MPP = 2240, 1792, 0.5
CENTRE, R_OUT, R_HOLE = (1008.0, 784.0), 700.0, 200.0
MARGIN = 64


def _circle(r: float, k: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    return np.stack([CENTRE[0] + r * np.cos(t), CENTRE[1] + r * np.sin(t)], axis=1)


def _tumour_fraction(x: int, y: int, size: float, n: int = 32) -> float:
    """Independent label truth: share of an n×n point lattice in the patch inside the donut."""
    g = (np.arange(n) + 0.5) * size / n
    pts = np.stack(np.meshgrid(x + g, y + g), axis=-1).reshape(-1, 2)
    inside = MplPath(_circle(R_OUT)).contains_points(pts) & ~MplPath(_circle(R_HOLE)).contains_points(pts)
    return float(inside.mean())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"))


def write_synthetic(d: Path) -> dict[str, Path]:
    """A textured tissue pyramid (deflate, exact pixels) + the donut as GeoJSON (hole) and ASAP (exclusion)."""
    rng = np.random.default_rng(3)
    rgb = np.full((H, W, 3), 242, np.uint8)
    tissue = rng.integers(0, 60, (H - 2 * MARGIN, W - 2 * MARGIN, 3)).astype(np.uint8) + np.array(
        [170, 90, 140], np.uint8
    )
    rgb[MARGIN : H - MARGIN, MARGIN : W - MARGIN] = tissue
    write_pyramid_tiff(d / "slide.tiff", rgb, mpp=MPP, tile=256)
    outer, hole = _circle(R_OUT), _circle(R_HOLE)
    geo = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"classification": {"name": "Tumor"}},
                "geometry": {"type": "Polygon", "coordinates": [outer.tolist(), hole.tolist()]},
            }
        ],
    }
    (d / "donut.geojson").write_text(json.dumps(geo))
    write_asap_xml(d / "donut.xml", {"_0": [outer], "_2": [hole]})
    white = np.full((1024, 1024, 3), 243, np.uint8)
    write_pyramid_tiff(d / "blank.tiff", white, mpp=MPP, tile=256)
    (d / "garbage.svs").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    return {
        "dir": d,
        "slide": d / "slide.tiff",
        "geojson": d / "donut.geojson",
        "xml": d / "donut.xml",
        "blank": d / "blank.tiff",
        "garbage": d / "garbage.svs",
    }


def _cohort_cfg(cfg: dict, tmp: Path, rows: list[dict], cohort_mpp: float | None = None, **wsi_over) -> dict:
    """Config with one real manifest cohort 'c' and wsi overrides (nested dicts merged)."""
    cfg = copy.deepcopy(cfg)
    lines = ["image_id,patient_id,image,annotation,mpp,mask"]
    for r in rows:
        lines.append(
            ",".join(str(r.get(k, "")) for k in ("image_id", "patient_id", "image", "annotation", "mpp", "mask"))
        )
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "manifest.csv").write_text("\n".join(lines) + "\n")
    cfg["cohorts"] = {"c": {"kind": "wsi", "manifest": str(tmp / "manifest.csv")}}
    if cohort_mpp:
        cfg["cohorts"]["c"]["mpp"] = cohort_mpp
    for key, value in wsi_over.items():
        if isinstance(value, dict):
            cfg["wsi"][key].update(value)
        else:
            cfg["wsi"][key] = value
    return config_mod.validate(cfg)


def _run(cfg: dict, tmp: Path, image_id: str, **kw) -> dict:
    entry = next(e for e in _entries(cfg) if e.image_id == image_id)
    return wsi.extract_slide(
        entry, cfg, "c", tmp / "out" / f"{image_id}.h5", tmp / "out" / f"{image_id}.record.json", **kw
    )


def _entries(cfg: dict) -> list[ImageEntry]:
    from medflow.core import manifest as cohort

    return cohort.entries(cfg, "c")


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as h5:
        return h5["patches"][:], h5["coords"][:], h5["labels"][:], read_attrs(h5)


def _cli(cfg: dict, tmp: Path, image_id: str) -> int:
    cfg_path = write_config(cfg, tmp / "config.yaml")
    return cli.main(
        [
            "extract-wsi",
            "--config",
            str(cfg_path),
            "--cohort",
            "c",
            "--image-id",
            image_id,
            "--out",
            str(tmp / "out" / f"{image_id}.h5"),
            "--record",
            str(tmp / "out" / f"{image_id}.record.json"),
        ]
    )


def _assert_same_as_read_region(path: Path, slide_path: Path) -> None:
    patches, coords, _, attrs = _load(path)
    slide = openslide.OpenSlide(str(slide_path))
    n = attrs["patch_size"]
    for patch, (x, y) in zip(patches, coords):
        ref = np.asarray(slide.read_region((int(x), int(y)), attrs["level"], (n, n)))[..., :3]
        np.testing.assert_array_equal(patch, ref)


# ---- units ---------------------------------------------------------------------------------------
def test_choose_level_picks_a_level_or_resamples() -> None:
    ds = [1.0, 2.0, 4.0, 8.0]
    p = choose_level(ds, 0.25, 0.5, 224, 0.05)
    assert (p.level, p.read_size, p.resample) == (1, 224, False)
    p = choose_level(ds, 0.25, 0.75, 224, 0.05)  # between levels: finer level, 336 → 224
    assert (p.level, p.read_size, p.resample) == (1, 336, True) and p.mpp == pytest.approx(0.75)
    p = choose_level(ds, 0.25, 0.24, 224, 0.05)  # within tolerance of level 0
    assert (p.level, p.read_size) == (0, 224)
    p = choose_level(ds, 0.25, 4.0, 224, 0.05)  # coarser than the top level
    assert (p.level, p.read_size) == (3, 448)
    with pytest.raises(InputError, match="requested mpp impossible"):
        choose_level(ds, 0.25, 0.2, 224, 0.05, "s.svs")


def test_box_counts_equal_brute_force_window_sums() -> None:
    mask = np.random.default_rng(5).random((23, 31)) < 0.4
    k = 8
    got = _box_counts(mask, k)
    want = np.array([[mask[r : r + k, c : c + k].sum() for c in range(31 - k + 1)] for r in range(23 - k + 1)])
    np.testing.assert_array_equal(got, want)
    assert not _box_counts(np.zeros((10, 12), bool), k).any()


def test_quality_rejects_white_black_and_blur() -> None:
    rng = np.random.default_rng(0)
    textured = rng.integers(60, 200, (1, 64, 64, 3)).astype(np.uint8)
    white = np.full((1, 64, 64, 3), 250, np.uint8)
    black = np.zeros((1, 64, 64, 3), np.uint8)
    flat = np.full((1, 64, 64, 3), 150, np.uint8)
    batch = np.concatenate([textured, white, black, flat])
    q = {"max_white": 0.6, "max_black": 0.3, "min_sharpness": 0.0}
    assert quality_ok(batch, q).tolist() == [True, False, False, True]
    assert quality_ok(batch, {**q, "min_sharpness": 50.0}).tolist() == [True, False, False, False]


# ---- synthetic pyramids --------------------------------------------------------------------------
def test_random_extraction_pixels_labels_and_provenance(synthetic, default_cfg, tmp_path) -> None:
    cfg = _cohort_cfg(
        default_cfg,
        tmp_path,
        [{"image_id": "s1", "patient_id": "p1", "image": synthetic["slide"], "annotation": synthetic["geojson"]}],
        mpp=0.5,
        sampling={"mode": "random", "per_class": 25},
    )
    rec = _run(cfg, tmp_path, "s1")
    shard = tmp_path / "out" / "s1.h5"
    assert rec["status"] == "ok" and rec["shard"] == "s1.h5"
    assert rec["counts"] == {"normal": 25, "tumour": 25} and rec["n_patches"] == 50
    assert set(rec["timings_s"]) >= {"open", "mask", "annotations", "sampling", "read", "write", "qc", "other"}
    # one clock, non-overlapping stages: they and "other" add up to the wall time; the writer thread's
    # time overlaps "read" and is reported apart
    assert sum(rec["timings_s"].values()) == pytest.approx(rec["wall_s"], abs=1e-9)
    assert 0 < rec["concurrent_s"]["write_thread"] <= rec["timings_s"]["read"] + rec["timings_s"]["write"]
    assert rec["throughput"]["bytes_written"] == shard.stat().st_size
    _assert_same_as_read_region(shard, synthetic["slide"])
    patches, coords, labels, attrs = _load(shard)
    for (x, y), label in zip(coords, labels):
        frac = _tumour_fraction(int(x), int(y), 224)
        if label == 1:
            assert frac >= 0.5, (x, y, frac)
        else:
            assert frac <= 0.1, (x, y, frac)
    assert attrs["kind"] == "wsi" and attrs["image_id"] == "s1" and attrs["patient_id"] == "p1"
    assert attrs["class_names"] == ["normal", "tumour"] and attrs["level"] == 0 and attrs["mpp"] == pytest.approx(0.5)
    assert attrs["source_sha256"] == fsio.sha256_file(synthetic["slide"])
    assert attrs["source_bytes"] == synthetic["slide"].stat().st_size
    assert attrs["config_hash"] == rec["config_hash"] and attrs["seed"] == cfg["seed"]
    assert set(attrs["timings_s"]) >= {"mask", "read"}
    assert len({tuple(c) for c in coords.tolist()}) == len(coords)


def test_grid_labels_hole_is_normal_ring_is_tumour(synthetic, default_cfg, tmp_path) -> None:
    cfg = _cohort_cfg(
        default_cfg,
        tmp_path,
        [{"image_id": "g", "patient_id": "p", "image": synthetic["slide"], "annotation": synthetic["geojson"]}],
        mpp=0.5,
        sampling={"mode": "grid"},
    )
    _run(cfg, tmp_path, "g")
    _, coords, labels, _ = _load(tmp_path / "out" / "g.h5")
    got = {tuple(c): int(lab) for c, lab in zip(coords.tolist(), labels.tolist())}
    assert got[(896, 672)] == 0  # the patch inside the hole
    assert got[(1344, 672)] == 1  # two patches to the right: fully in the ring
    assert got[(224, 1344)] == 0  # plain tissue far from the annotation
    for (x, y), lab in got.items():  # every grid patch agrees with the polygon truth
        frac = _tumour_fraction(x, y, 224)
        assert (lab == 1 and frac >= 0.5) or (lab == 0 and frac <= 0.1), (x, y, lab, frac)
    assert all(x % 224 == 0 and y % 224 == 0 for x, y in got)


def test_asap_exclusion_group_equals_geojson_hole(synthetic, default_cfg, tmp_path) -> None:
    rows = [
        {"image_id": "geo", "patient_id": "p", "image": synthetic["slide"], "annotation": synthetic["geojson"]},
        {"image_id": "xml", "patient_id": "p", "image": synthetic["slide"], "annotation": synthetic["xml"]},
    ]
    cfg = _cohort_cfg(default_cfg, tmp_path, rows, mpp=0.5, sampling={"mode": "grid"})
    _run(cfg, tmp_path, "geo")
    _run(cfg, tmp_path, "xml")
    _, c1, l1, _ = _load(tmp_path / "out" / "geo.h5")
    _, c2, l2, _ = _load(tmp_path / "out" / "xml.h5")
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(l1, l2)
    assert 0 < l1.sum() < len(l1)


def test_resampled_patches_match_the_documented_reference(synthetic, default_cfg, tmp_path) -> None:
    cfg = _cohort_cfg(
        default_cfg,
        tmp_path,
        [{"image_id": "r", "patient_id": "p", "image": synthetic["slide"]}],
        mpp=0.8,
        patch_size=64,
        sampling={"mode": "random", "per_class": 12},
    )
    _run(cfg, tmp_path, "r")
    patches, coords, labels, attrs = _load(tmp_path / "out" / "r.h5")
    read = round(64 * 0.8 / 0.5)  # level 0 (0.5 µm/px) is the finest level ≤ 0.8
    assert (attrs["level"], attrs["read_size"]) == (0, read) and attrs["mpp"] == pytest.approx(read * 0.5 / 64)
    assert len(patches) == 12 and set(labels.tolist()) == {0}
    slide = openslide.OpenSlide(str(synthetic["slide"]))
    for patch, (x, y) in zip(patches, coords):
        region = np.asarray(slide.read_region((int(x), int(y)), 0, (read, read)))[..., :3]
        ref = np.asarray(Image.fromarray(region).resize((64, 64), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(patch, ref)


@pytest.mark.parametrize("read_size", [64, 90])  # direct, and resampled to 64
def test_fast_reader_equals_the_public_api_path(synthetic, read_size) -> None:
    slide = openslide.OpenSlide(str(synthetic["slide"]))
    plan = ReadPlan(level=1, level_downsample=2.0, level0_mpp=MPP, read_size=read_size, patch_size=64)
    coords = np.array([[0, 0], [300, 500], [2100, 1700], [2230, 1780]])  # the last ones cross the edge
    fast = RegionReader(slide, plan, synthetic["slide"])
    public = RegionReader(slide, plan, synthetic["slide"])
    public._fast = None
    assert fast._fast is not None
    np.testing.assert_array_equal(fast.read(coords), public.read(coords))


def test_coarser_level_read_directly(synthetic, default_cfg, tmp_path) -> None:
    cfg = _cohort_cfg(
        default_cfg,
        tmp_path,
        [{"image_id": "l1", "patient_id": "p", "image": synthetic["slide"], "annotation": synthetic["xml"]}],
        mpp=1.0,
        patch_size=96,
        sampling={"mode": "random", "per_class": 10},
    )
    rec = _run(cfg, tmp_path, "l1")
    attrs = _load(tmp_path / "out" / "l1.h5")[3]
    assert (attrs["level"], attrs["downsample"], attrs["read_size"]) == (1, 2.0, 96)
    assert rec["counts"] == {"normal": 10, "tumour": 10}
    _assert_same_as_read_region(tmp_path / "out" / "l1.h5", synthetic["slide"])


def test_two_worker_processes_write_the_same_shard(synthetic, default_cfg, tmp_path) -> None:
    rows = [{"image_id": "w", "patient_id": "p", "image": synthetic["slide"], "annotation": synthetic["geojson"]}]
    one = _cohort_cfg(default_cfg, tmp_path, rows, mpp=0.5, sampling={"per_class": 40})
    two = _cohort_cfg(default_cfg, tmp_path, rows, mpp=0.5, sampling={"per_class": 40}, workers=2)
    _run(one, tmp_path / "a", "w")
    _run(two, tmp_path / "b", "w")
    for x, y in zip(_load(tmp_path / "a" / "out" / "w.h5")[:3], _load(tmp_path / "b" / "out" / "w.h5")[:3]):
        np.testing.assert_array_equal(x, y)


def test_rerun_is_skipped_until_the_config_changes(synthetic, default_cfg, tmp_path, capsys) -> None:
    rows = [{"image_id": "s", "patient_id": "p", "image": synthetic["slide"]}]
    cfg = _cohort_cfg(default_cfg, tmp_path, rows, sampling={"per_class": 5})
    assert _cli(cfg, tmp_path, "s") == 0
    shard = tmp_path / "out" / "s.h5"
    stamp = shard.stat().st_mtime_ns
    assert _cli(cfg, tmp_path, "s") == 0
    assert "up to date" in capsys.readouterr().out and shard.stat().st_mtime_ns == stamp
    (tmp_path / "out" / "s.record.json").unlink()  # killed after the shard: record rebuilt from it
    assert _cli(cfg, tmp_path, "s") == 0
    assert fsio.read_json(tmp_path / "out" / "s.record.json")["n_patches"] == 5
    cfg["wsi"]["sampling"]["per_class"] = 7
    assert _cli(cfg, tmp_path, "s") == 0
    assert shard.stat().st_mtime_ns != stamp and len(_load(shard)[1]) == 7


# ---- bad input -----------------------------------------------------------------------------------
def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("case", ["garbage", "blank", "outside", "impossible"])
def test_bad_input_exits_2_with_one_clear_line(case, synthetic, default_cfg, tmp_path, capsys) -> None:
    row = {"image_id": "b", "patient_id": "p", "image": synthetic["slide"]}
    over: dict = {}
    if case == "garbage":
        row["image"], problem, named = synthetic["garbage"], "not a slide OpenSlide can read", synthetic["garbage"]
    elif case == "blank":
        row["image"], problem, named = synthetic["blank"], "no tissue found", synthetic["blank"]
    elif case == "outside":
        bad = tmp_path / "far.xml"
        write_asap_xml(bad, {"_0": [np.array([[100, 100], [9000, 100], [9000, 900]], float)]})
        row["annotation"], problem, named = bad, "outside the 2240×1792 slide", bad
    else:
        over, problem, named = {"mpp": 0.2}, "requested mpp impossible", synthetic["slide"]
    cfg = _cohort_cfg(default_cfg, tmp_path, [row], **over)
    assert _cli(cfg, tmp_path, "b") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow extract-wsi: error: {named}: ") and problem in err and "\n" not in err
    _assert_nothing_written(tmp_path / "out")


def test_on_error_skip_writes_a_failed_record_and_no_shard(synthetic, default_cfg, tmp_path) -> None:
    cfg = _cohort_cfg(
        default_cfg, tmp_path, [{"image_id": "b", "patient_id": "p", "image": synthetic["garbage"]}], on_error="skip"
    )
    assert _cli(cfg, tmp_path, "b") == 0
    rec = fsio.read_json(tmp_path / "out" / "b.record.json")
    assert rec["status"] == "failed" and rec["shard"] is None and rec["n_patches"] == 0
    assert rec["error"].startswith(str(synthetic["garbage"]))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.record.json"]


# ---- real slides ---------------------------------------------------------------------------------
def test_real_svs_patches_equal_read_region(shared_data, default_cfg, tmp_path) -> None:
    svs = shared_data / "cmu1_small_region" / "CMU-1-Small-Region.svs"
    cfg = _cohort_cfg(
        default_cfg,
        tmp_path,
        [{"image_id": "cmu1", "patient_id": "p", "image": svs}],
        mpp=0.5,
        sampling={"mode": "random", "per_class": 30},
    )
    rec = _run(cfg, tmp_path, "cmu1")
    assert rec["counts"] == {"normal": 30, "tumour": 0}
    attrs = _load(tmp_path / "out" / "cmu1.h5")[3]
    assert attrs["mpp"] == pytest.approx(0.499) and attrs["level"] == 0 and attrs["mpp_source"] == "slide"
    assert attrs["source_sha256"] == "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
    _assert_same_as_read_region(tmp_path / "out" / "cmu1.h5", svs)


def test_real_svs_without_mpp_needs_an_explicit_mpp(shared_data, default_cfg, tmp_path, capsys) -> None:
    svs = shared_data / "tcga_cr7395_svs" / "tcga-cr-7395-01a-01-ts1.svs"
    rows = [{"image_id": "tcga", "patient_id": "p", "image": svs}]
    cfg = _cohort_cfg(default_cfg, tmp_path / "none", rows, mpp=0.5)
    assert _cli(cfg, tmp_path / "none", "tcga") == 2
    err = capsys.readouterr().err
    assert f"{svs}: no mpp metadata; set mpp in the manifest or cohorts.c.mpp" in err
    _assert_nothing_written(tmp_path / "none" / "out")
    cfg = _cohort_cfg(default_cfg, tmp_path / "mpp", rows, cohort_mpp=0.25, mpp=0.5, sampling={"per_class": 8})
    rec = _run(cfg, tmp_path / "mpp", "tcga")
    attrs = _load(tmp_path / "mpp" / "out" / "tcga.h5")[3]
    assert (attrs["level"], attrs["mpp_source"], rec["n_patches"]) == (1, "cohort", 8)  # 0.25 × 2.0005 ≈ 0.5
    _assert_same_as_read_region(tmp_path / "mpp" / "out" / "tcga.h5", svs)


def test_truncated_real_svs_gives_the_clear_error(shared_data, default_cfg, tmp_path, capsys) -> None:
    src = shared_data / "cmu1_small_region" / "CMU-1-Small-Region.svs"
    broken = tmp_path / "truncated.svs"
    broken.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    cfg = _cohort_cfg(default_cfg, tmp_path, [{"image_id": "t", "patient_id": "p", "image": broken}], mpp=0.5)
    assert _cli(cfg, tmp_path, "t") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow extract-wsi: error: {broken}: ") and "\n" not in err
    _assert_nothing_written(tmp_path / "out")


# mask from the thumbnail, or from the corrupt level; reading in this process or in 2 workers
@pytest.mark.parametrize("mask_mpp,workers", [(16.0, 1), (0.5, 1), (16.0, 2)])
def test_corrupt_tiles_give_a_decode_error_and_no_shard(
    shared_data, default_cfg, tmp_path, capsys, mask_mpp, workers
) -> None:
    import tifffile

    src = shared_data / "cmu1_small_region" / "CMU-1-Small-Region.svs"
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        for i in range(0, len(page.dataoffsets), 3):  # zero every third JPEG tile's payload
            o, n = page.dataoffsets[i], page.databytecounts[i]
            data[o + 10 : o + n - 10] = bytes(n - 20)
    broken = tmp_path / "corrupt.svs"
    broken.write_bytes(bytes(data))
    cfg = _cohort_cfg(
        default_cfg,
        tmp_path,
        [{"image_id": "k", "patient_id": "p", "image": broken}],
        mpp=0.5,
        tissue={"mask_mpp": mask_mpp},
        sampling={"per_class": 200},
        workers=workers,
    )
    assert _cli(cfg, tmp_path, "k") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow extract-wsi: error: {broken}: decode error") and "\n" not in err
    _assert_nothing_written(tmp_path / "out")


def test_unrecognised_annotation_groups_are_never_sampled_as_normal(synthetic, default_cfg, tmp_path, capsys) -> None:
    geo = json.loads(synthetic["geojson"].read_text())
    square = [[1792, 1344], [2016, 1344], [2016, 1568], [1792, 1568], [1792, 1344]]
    geo["features"].append(
        {
            "type": "Feature",
            "properties": {"classification": {"name": "Necrosis"}},
            "geometry": {"type": "Polygon", "coordinates": [square]},
        }
    )
    path = tmp_path / "with_other.geojson"
    path.write_text(json.dumps(geo))
    cfg = _cohort_cfg(
        default_cfg,
        tmp_path,
        [{"image_id": "o", "patient_id": "p", "image": synthetic["slide"], "annotation": path}],
        mpp=0.5,
        sampling={"mode": "grid"},
    )
    rec = _run(cfg, tmp_path, "o")
    assert "groups ['Necrosis'] are neither" in capsys.readouterr().out
    assert rec["wsi"]["unsampled_groups"] == ["Necrosis"]
    got = {tuple(c): int(lab) for c, lab in zip(*(a.tolist() for a in _load(tmp_path / "out" / "o.h5")[1:3]))}
    assert (1792, 1344) not in got and got[(1568, 1344)] == 0


def test_progress_lines_count_kept_patches_and_quiet(synthetic, default_cfg, tmp_path, capsys) -> None:
    rows = [{"image_id": "s", "patient_id": "p", "image": synthetic["slide"]}]
    cfg = _cohort_cfg(default_cfg, tmp_path, rows, sampling={"per_class": 5})
    cfg["progress"] = {"mode": "lines", "interval_s": 0}
    assert _cli(cfg, tmp_path, "s") == 0
    err = capsys.readouterr().err
    assert "extract-wsi s: done 5/5 patches (100%)" in err, err
    cfg["wsi"]["sampling"]["per_class"] = 6  # a new shard, made with --quiet
    cfg_path = write_config(cfg, tmp_path / "quiet.yaml")
    out = tmp_path / "out"
    argv = ["extract-wsi", "--config", str(cfg_path), "--cohort", "c", "--image-id", "s", "--quiet"]
    assert cli.main([*argv, "--out", str(out / "s.h5"), "--record", str(out / "s.record.json")]) == 0
    assert capsys.readouterr().err == "" and len(_load(out / "s.h5")[1]) == 6

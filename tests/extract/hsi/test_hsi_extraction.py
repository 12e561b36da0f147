"""HSI chain steps against hand-computed values, patch extraction, the extract-hsi job, bad input, SalinasA."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from conftest import write_config
from hsi_cohorts import SALINAS_VALUES, make_mosaic_cohort, salinas_cfg, write_envi
from medflow import cli
from medflow.core import config as config_mod
from medflow.core.errors import InputError
from medflow.core.index import build_index
from medflow.core.manifest import ImageEntry
from medflow.core.shards import read_attrs
from medflow.extract.hsi import chain as hsi
from medflow.extract.hsi import job as hsi_job
from medflow.extract.hsi import patches as hsi_patches


@pytest.fixture
def tiny(default_cfg: dict, tmp_path: Path) -> tuple[dict, Path]:
    """(cfg with cohort 'tiny', config file path)."""
    manifest = make_mosaic_cohort(tmp_path / "data")
    cfg = copy.deepcopy(default_cfg)
    cfg["cohorts"]["tiny"] = {"kind": "hsi", "manifest": str(manifest)}
    cfg["hsi"].update(per_class=0, dtype="float32", patch=3)
    cfg = config_mod.validate(cfg)
    return cfg, write_config(cfg, tmp_path / "config.yaml")


def extract(cfg_path: Path, out_dir: Path, image_id: str = "img0", cohort: str = "tiny") -> int:
    return cli.main(
        [
            "extract-hsi",
            "--config",
            str(cfg_path),
            "--cohort",
            cohort,
            "--image-id",
            image_id,
            "--out",
            str(out_dir / f"{image_id}.h5"),
            "--record",
            str(out_dir / f"{image_id}.record.json"),
        ]
    )


# ---- chain steps vs hand-computed values ------------------------------------------------------------------
def test_calibrate_formula_and_dead_pixel_guard() -> None:
    raw = np.array([[30, 50], [5, 7]], np.uint16)
    white = np.array([[110, 90], [5, 9]], np.uint16)
    dark = np.array([[10, 10], [5, 1]], np.uint16)
    out, dead = hsi.calibrate(raw, white, dark)
    assert out.dtype == np.float32 and dead == 1
    np.testing.assert_allclose(out, [[0.2, 0.5], [0.0, 0.75]])


def test_demosaic_band_order_by_hand() -> None:
    mosaic = np.arange(16).reshape(4, 4)
    cube = hsi.demosaic(mosaic, 2)
    assert cube.shape == (2, 2, 4) and cube.dtype == np.float32
    np.testing.assert_array_equal(cube[0, 0], [0, 1, 4, 5])
    np.testing.assert_array_equal(cube[0, 1], [2, 3, 6, 7])
    np.testing.assert_array_equal(cube[1, 0], [8, 9, 12, 13])
    np.testing.assert_array_equal(cube[1, 1], [10, 11, 14, 15])
    reordered = hsi.demosaic(mosaic, 2, [3, 0, 2, 1])
    np.testing.assert_array_equal(reordered[0, 0], [5, 0, 4, 1])
    np.testing.assert_array_equal(reordered[1, 1], [15, 10, 14, 11])


def test_demosaic_5x5_matches_strided_definition() -> None:
    mosaic = np.random.default_rng(2).random((10, 15)).astype(np.float32)
    order = list(np.random.default_rng(3).permutation(25))
    cube = hsi.demosaic(mosaic, 5, order)
    for b, p in enumerate(order):
        np.testing.assert_array_equal(cube[:, :, b], mosaic[p // 5 :: 5, p % 5 :: 5])
    with pytest.raises(ValueError, match="not a multiple"):
        hsi.demosaic(mosaic[:, :14], 5)
    with pytest.raises(ValueError, match="distinct"):
        hsi.demosaic(mosaic, 5, [0, 0, 1])


def test_active_area_offset_and_crop() -> None:
    mosaic = np.arange(7 * 9).reshape(7, 9).astype(np.float32)
    active = hsi.active_area(mosaic, (1, 2), (4, 6))
    cube = hsi.demosaic(active, 2)
    assert cube.shape == (2, 3, 4)
    # cube[r, c, b] = mosaic[1 + 2r + b//2, 2 + 2c + b%2]
    assert cube[0, 0, 0] == mosaic[1, 2] == 11
    assert cube[1, 2, 3] == mosaic[1 + 2 + 1, 2 + 4 + 1] == 43
    assert hsi.active_area(mosaic, (1, 2), (0, 0)).shape == (6, 7)  # 0 = to the end
    with pytest.raises(ValueError, match="exceeds"):
        hsi.active_area(mosaic, (4, 0), (4, 0))


def test_correction_is_row_vector_times_matrix() -> None:
    cube = np.array([[[1, 2, 3], [0, 1, 0]]], np.float32)
    matrix = np.array([[1, 0, 0], [0, 2, 0], [1, 0, 1]], np.float32)
    out = hsi.correct(cube, matrix)
    np.testing.assert_allclose(out, [[[4, 4, 3], [0, 2, 0]]])
    with pytest.raises(ValueError):
        hsi.correct(cube, np.eye(4, dtype=np.float32))


def test_normalise_rms_one_and_zero_guard() -> None:
    cube = np.array([[[3, 4], [0, 0]]], np.float32)
    out, zero = hsi.normalise(cube.copy())
    assert zero == 1
    np.testing.assert_allclose(out[0, 0], [3 / np.sqrt(12.5), 4 / np.sqrt(12.5)], rtol=1e-6)
    np.testing.assert_array_equal(out[0, 1], [0, 0])
    big = np.random.default_rng(4).random((20, 30, 25)).astype(np.float32) * 100
    out, zero = hsi.normalise(big)
    assert zero == 0
    np.testing.assert_allclose(np.sqrt((out**2).mean(axis=-1)), 1.0, rtol=1e-5)


def test_map_labels_default_and_class_map() -> None:
    gt = np.array([[0, 1, 5], [2, 0, 3]])
    np.testing.assert_array_equal(hsi_patches.map_labels(gt, {}, 5, "gt"), [[-1, 0, 4], [1, -1, 2]])
    np.testing.assert_array_equal(
        hsi_patches.map_labels(gt, {"5": 0, "2": 1, "3": -1}, 2, "gt"), [[-1, -1, 0], [1, -1, -1]]
    )
    with pytest.raises(InputError, match=r"\[5\]") as err:
        hsi_patches.map_labels(gt, {}, 4, "gt.png")
    assert err.value.path == "gt.png"


def test_select_pixels_border_and_stratified_subsample() -> None:
    labels = np.full((10, 12), -1)
    labels[0, :] = 0  # a whole border row of class 0
    labels[3:8, 3:9] = 1  # 30 interior pixels of class 1
    rows, cols = hsi_patches.select_pixels(labels, 3, "reflect", 0, np.random.default_rng(0))
    assert len(rows) == 12 + 30
    assert np.all(np.diff(rows * 12 + cols) > 0)  # raster order
    rows, cols = hsi_patches.select_pixels(labels, 3, "skip", 0, np.random.default_rng(0))
    assert len(rows) == 30 and rows.min() >= 1
    picks = [hsi_patches.select_pixels(labels, 3, "reflect", 5, np.random.default_rng(s)) for s in (7, 7, 8)]
    assert np.bincount(labels[picks[0]]).tolist() == [5, 5]
    np.testing.assert_array_equal(picks[0][0], picks[1][0])  # same seed → same subsample
    assert not np.array_equal(picks[0][0] * 12 + picks[0][1], picks[2][0] * 12 + picks[2][1])


def test_extract_patches_equal_reflect_padded_windows() -> None:
    cube = np.random.default_rng(5).random((9, 11, 4)).astype(np.float32)
    padded = np.pad(cube, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    rows, cols = np.array([0, 4, 8, 0, 8]), np.array([0, 5, 10, 10, 0])
    patches = hsi_patches.extract_patches(cube, rows, cols, 5)
    assert patches.shape == (5, 5, 5, 4)
    for p, r, c in zip(patches, rows, cols):
        np.testing.assert_array_equal(p, padded[r : r + 5, c : c + 5])
    inner = hsi_patches.extract_patches(cube, np.array([4]), np.array([5]), 5)  # interior only: no padding path
    np.testing.assert_array_equal(inner[0], cube[2:7, 3:8])


def test_blocked_chain_equals_whole_frame_steps(default_cfg: dict) -> None:
    """chain_cube (block by block) = the four step functions applied to the whole frame."""
    rng = np.random.default_rng(9)
    rows, cols = 5 * 21 + 3, 5 * 13 + 4  # 21 cube rows: not a multiple of the block
    raw = rng.integers(100, 900, (rows, cols)).astype(np.uint16)
    dark = rng.integers(50, 60, (rows, cols)).astype(np.uint16)
    white = dark + rng.integers(900, 1000, (rows, cols)).astype(np.uint16)
    white[10, 10] = dark[10, 10]  # one dead pixel
    matrix = (np.eye(25) + rng.normal(0, 0.05, (25, 25))).astype(np.float32)
    order = list(rng.permutation(25))
    hcfg = copy.deepcopy(default_cfg["hsi"])
    hcfg["mosaic"].update(offset=[2, 1], crop=[105, 65], band_order=order)
    cube, timings, chain, demosaiced = hsi.chain_cube(raw, hcfg, white, dark, matrix)
    act = (slice(2, 107), slice(1, 66))
    calibrated, dead = hsi.calibrate(raw[act], white[act], dark[act])
    expected, _ = hsi.normalise(hsi.correct(hsi.demosaic(calibrated, 5, order), matrix))
    np.testing.assert_allclose(cube, expected, rtol=1e-6, atol=1e-7)
    assert cube.shape == (21, 13, 25) and demosaiced and dead == 1 and chain["dead_pixels"] == 1
    assert chain["mosaic"]["crop"] == [105, 65] and chain["correction_matrix"] == "correction matrix"
    assert all(timings[s] > 0 for s in hsi.STEPS)


# ---- the extract-hsi job ---------------------------------------------------------------------------------
def test_extract_hsi_shard_record_and_index(tiny: tuple[dict, Path], tmp_path: Path) -> None:
    cfg, cfg_path = tiny
    out = tmp_path / "shards"
    assert extract(cfg_path, out) == 0
    shard, record_path = out / "img0.h5", out / "img0.record.json"
    record = json.loads(record_path.read_text())
    assert record["status"] == "ok" and record["shard"] == "img0.h5" and record["job"] == "extract-hsi"
    assert set(record["timings_s"]) == {*hsi_job.TIMING_KEYS, "other"}
    assert sum(record["timings_s"].values()) == pytest.approx(record["wall_s"], abs=1e-9)  # stages + other = wall
    assert {"s_per_patch", "patches_per_s", "s_per_image", "bytes_written"} <= set(record["throughput"])
    assert record["counts"] == {"healthy": 10, "tumour": 10, "venous": 10, "arterial": 10, "dura": 10}
    entry = ImageEntry(
        image_id="img0",
        patient_id="pat0",
        image=str(tmp_path / "data/img0/raw.npy"),
        annotation=str(tmp_path / "data/img0/gt.png"),
        white=str(tmp_path / "data/img0/white.npy"),
        dark=str(tmp_path / "data/img0/dark.npy"),
    )
    cube, labels, _ = hsi.process_image(entry, cfg)
    assert cube.shape == (12, 14, 25)
    with h5py.File(shard) as h5:
        attrs = read_attrs(h5)
        patches, coords, stored = h5["patches"][:], h5["coords"][:], h5["labels"][:]
    assert attrs["kind"] == "hsi" and attrs["patch_size"] == 3 and attrs["bands"] == attrs["channels"] == 25
    assert attrs["chain"]["calibrate"] and attrs["chain"]["demosaic"] and attrs["chain"]["normalise"]
    assert len(attrs["wavelengths"]) == 25 and attrs["wavelengths"][0] == 665.0
    assert attrs["source_sha256"] and attrs["config_hash"] == record["config_hash"]
    assert set(attrs["timings_s"]) >= {"load", "calibrate", "demosaic", "correct", "normalise", "patches"}
    padded = np.pad(cube, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    for p, (r, c), label in zip(patches, coords, stored):
        np.testing.assert_array_equal(p, padded[r : r + 3, c : c + 3])
        assert labels[r, c] == label
    # the labelled reflectance survives calibration: normalised spectra have RMS 1
    np.testing.assert_allclose(np.sqrt((patches[:, 1, 1] ** 2).mean(axis=-1)), 1.0, rtol=1e-5)
    index = build_index([record_path], tmp_path / "index" / "tiny.json", "tiny", "hsi", cfg)
    assert index["totals"]["tumour"] == 10 and index["shards"][0]["n"] == 50


def test_extract_hsi_chain_matches_hand_calibration(tiny: tuple[dict, Path], tmp_path: Path) -> None:
    cfg, _ = tiny
    cfg["hsi"]["chain"].update(normalise=False)
    d = tmp_path / "data" / "img1"
    entry = ImageEntry(
        image_id="img1",
        patient_id="pat1",
        image=str(d / "raw.npy"),
        annotation=str(d / "gt.png"),
        white=str(d / "white.npy"),
        dark=str(d / "dark.npy"),
    )
    cube, _, timings = hsi.process_image(entry, cfg)
    raw, white, dark = (np.load(d / f"{n}.npy").astype(np.float64) for n in ("raw", "white", "dark"))
    expected = (raw - dark) / (white - dark)
    np.testing.assert_allclose(cube[3, 4, 7], expected[3 * 5 + 1, 4 * 5 + 2], rtol=1e-6)  # band 7 = tile (1, 2)
    assert set(timings) >= {"load", "calibrate", "demosaic", "correct", "normalise"}


def test_extract_hsi_skips_when_up_to_date_and_redoes_on_change(tiny: tuple[dict, Path], tmp_path: Path) -> None:
    cfg, cfg_path = tiny
    out = tmp_path / "shards"
    assert extract(cfg_path, out) == 0
    created = read_attrs(h5py.File(out / "img0.h5"))["created"]
    mtime = (out / "img0.h5").stat().st_mtime_ns
    assert extract(cfg_path, out) == 0
    assert (out / "img0.h5").stat().st_mtime_ns == mtime
    cfg["hsi"]["patch"] = 5
    write_config(cfg, cfg_path)
    assert extract(cfg_path, out) == 0
    with h5py.File(out / "img0.h5") as h5:
        assert h5["patches"].shape[1:] == (5, 5, 25)
        assert read_attrs(h5)["created"] >= created


def test_stratified_subsample_and_float16(tiny: tuple[dict, Path], tmp_path: Path) -> None:
    cfg, cfg_path = tiny
    cfg["hsi"].update(per_class=4, dtype="float16", border="skip")
    write_config(cfg, cfg_path)
    assert extract(cfg_path, tmp_path / "s") == 0
    with h5py.File(tmp_path / "s" / "img0.h5") as h5:
        assert h5["patches"].dtype == np.float16
        assert np.bincount(h5["labels"][:]).tolist() == [4, 4, 4, 4, 4]
        first = h5["coords"][:]
    assert extract(cfg_path, tmp_path / "t") == 0
    with h5py.File(tmp_path / "t" / "img0.h5") as h5:
        np.testing.assert_array_equal(h5["coords"][:], first)  # seeded


def _assert_nothing_written(out: Path) -> None:
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == [], leftovers


BAD_INPUTS = {
    "matrix size": "correction",
    "gt shape": "annotation",
    "mosaic pattern": "image",
    "nan": "image",
    "empty labels": "annotation",
    "unreadable": "image",
    "white equals dark": "white",
    "no references": "image",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_naming_the_file(
    case: str, tiny: tuple[dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg, cfg_path = tiny
    d = tmp_path / "data" / "img0"
    named = {
        "image": d / "raw.npy",
        "annotation": d / "gt.png",
        "white": d / "white.npy",
        "correction": tmp_path / "m.csv",
    }[BAD_INPUTS[case]]
    if case == "matrix size":
        np.savetxt(named, np.eye(24), delimiter=",")
        cfg["hsi"]["correction_matrix"] = str(named)
    elif case == "gt shape":
        Image.fromarray(np.ones((12, 13), np.uint8)).save(named)
    elif case == "mosaic pattern":
        np.save(named, np.load(named)[:, :-3])
        for ref in ("white", "dark"):
            np.save(d / f"{ref}.npy", np.load(d / f"{ref}.npy")[:, :-3])
    elif case == "nan":
        np.save(named, np.full((60, 70), np.nan, np.float32))
    elif case == "empty labels":
        Image.fromarray(np.zeros((12, 14), np.uint8)).save(named)
    elif case == "unreadable":
        named.write_bytes(b"\x93NUMPY\x01\x00garbage")
    elif case == "white equals dark":
        np.save(named, np.load(d / "dark.npy"))
    elif case == "no references":
        manifest = Path(cfg["cohorts"]["tiny"]["manifest"])
        lines = manifest.read_text().splitlines()
        manifest.write_text(
            "\n".join(
                [lines[0]]
                + [",".join(f if i not in (4, 5) else "" for i, f in enumerate(line.split(","))) for line in lines[1:]]
            )
            + "\n"
        )
    write_config(cfg, cfg_path)
    out = tmp_path / "shards"
    assert extract(cfg_path, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("medflow extract-hsi: error: ")
    assert str(named) in err
    _assert_nothing_written(out)


def test_on_error_skip_writes_failed_record(tiny: tuple[dict, Path], tmp_path: Path) -> None:
    cfg, cfg_path = tiny
    cfg["hsi"]["on_error"] = "skip"
    write_config(cfg, cfg_path)
    Image.fromarray(np.zeros((12, 14), np.uint8)).save(tmp_path / "data" / "img0" / "gt.png")
    out = tmp_path / "shards"
    assert extract(cfg_path, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img0.record.json"]
    record = json.loads((out / "img0.record.json").read_text())
    assert record["status"] == "failed" and record["shard"] is None and "no labelled pixel" in record["error"]


def test_config_checks(tiny: tuple[dict, Path]) -> None:
    cfg, _ = tiny
    for key, value, match in (
        ("patch", 4, "odd"),
        ("class_map", {"x": 1}, "not an integer"),
        ("class_map", {"3": 9}, "not a class id"),
    ):
        bad = copy.deepcopy(cfg)
        bad["hsi"][key] = value
        with pytest.raises(InputError, match=match):
            hsi.check_config(bad["hsi"])
    bad = copy.deepcopy(cfg)
    bad["hsi"]["mosaic"]["band_order"] = [0, 25]
    with pytest.raises(InputError, match="band_order"):
        hsi.check_config(bad["hsi"])


def test_envi_cube_input_skips_calibration(tiny: tuple[dict, Path], tmp_path: Path) -> None:

    cfg, _ = tiny
    cube = np.random.default_rng(6).random((8, 9, 6)).astype(np.float32) + 0.1
    write_envi(tmp_path / "c.hdr", cube, interleave="bil", wavelengths=[400, 450, 500, 550, 600, 650])
    Image.fromarray(np.ones((8, 9), np.uint8)).save(tmp_path / "c_gt.png")
    cfg["hsi"]["chain"]["normalise"] = False
    entry = ImageEntry(
        image_id="c", patient_id="p", image=str(tmp_path / "c.hdr"), annotation=str(tmp_path / "c_gt.png")
    )
    result = hsi.run_chain(entry, cfg)
    np.testing.assert_array_equal(result.cube, cube)
    assert not result.chain["calibrate"] and not result.chain["demosaic"]
    assert result.wavelengths == [400, 450, 500, 550, 600, 650]
    record = hsi_job.extract_image(entry, cfg, "c", tmp_path / "o" / "c.h5", tmp_path / "o" / "c.record.json")
    assert (
        record["n_patches"] == 72 and "image_data" in read_attrs(h5py.File(tmp_path / "o" / "c.h5"))["inputs"]["files"]
    )


# ---- real data: SalinasA (AVIRIS, 83×86×204) --------------------------------------------------------------
def test_salinas_shard_equals_cube_windows(shared_data: Path, default_cfg: dict, tmp_path: Path) -> None:
    cfg = salinas_cfg(default_cfg, shared_data, tmp_path)
    cfg_path = write_config(cfg, tmp_path / "config.yaml")
    out = tmp_path / "shards"
    assert extract(cfg_path, out, "salinasA", "salinas") == 0
    cube = scipy.io.loadmat(shared_data / "salinasA" / "SalinasA_corrected.mat")["salinasA_corrected"]
    gt = scipy.io.loadmat(shared_data / "salinasA" / "SalinasA_gt.mat")["salinasA_gt"]
    assert cube.shape == (83, 86, 204)
    padded = np.pad(cube.astype(np.float32), ((3, 3), (3, 3), (0, 0)), mode="reflect")
    with h5py.File(out / "salinasA.h5") as h5:
        attrs = read_attrs(h5)
        patches, coords, labels = h5["patches"][:], h5["coords"][:], h5["labels"][:]
    assert patches.shape == (int((gt > 0).sum()), 7, 7, 204) and attrs["bands"] == 204
    for i in np.random.default_rng(0).choice(len(patches), 200, replace=False):
        r, c = coords[i]
        np.testing.assert_array_equal(patches[i], padded[r : r + 7, c : c + 7])
        assert SALINAS_VALUES[labels[i]] == gt[r, c]
    record = json.loads((out / "salinasA.record.json").read_text())
    assert record["counts"] == {f"c{v}": int((gt == v).sum()) for v in SALINAS_VALUES}
    assert attrs["wavelengths"] == [] and not attrs["chain"]["calibrate"]


def test_salinas_normalised_rms(shared_data: Path, default_cfg: dict, tmp_path: Path) -> None:
    cfg = salinas_cfg(default_cfg, shared_data, tmp_path)
    cfg["hsi"]["chain"]["normalise"] = True
    entry = ImageEntry(
        image_id="salinasA",
        patient_id="salinas",
        image=str(shared_data / "salinasA" / "SalinasA_corrected.mat"),
        annotation=str(shared_data / "salinasA" / "SalinasA_gt.mat"),
    )
    cube, labels, timings = hsi.process_image(entry, cfg)
    rms = np.sqrt((cube.astype(np.float64) ** 2).mean(axis=-1))
    nonzero = rms > 0
    np.testing.assert_allclose(rms[nonzero], 1.0, rtol=1e-5)
    gt = scipy.io.loadmat(shared_data / "salinasA" / "SalinasA_gt.mat")["salinasA_gt"]
    np.testing.assert_array_equal(labels >= 0, gt > 0)
    assert timings["normalise"] > 0 and timings["calibrate"] == 0


def test_map_labels_sparse_huge_values() -> None:
    gt = np.array([[0, 4_000_000_000], [7, 0]], dtype=np.int64)
    out = hsi_patches.map_labels(gt, {"4000000000": 1, "7": 0}, 2, "gt")
    np.testing.assert_array_equal(out, [[-1, 1], [0, -1]])
    with pytest.raises(InputError, match="4000000000"):
        hsi_patches.map_labels(gt, {}, 5, "gt")


def test_progress_lines_and_quiet(tiny: tuple[dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Not on a terminal, progress is a line per interval on stderr (here every block); --quiet: none."""
    cfg, _ = tiny
    cfg["progress"] = {"mode": "lines", "interval_s": 0}
    cfg_path = write_config(cfg, tmp_path / "lines.yaml")
    argv = ["extract-hsi", "--config", str(cfg_path), "--cohort", "tiny", "--image-id", "img0"]
    assert cli.main([*argv, "--out", str(tmp_path / "a.h5"), "--record", str(tmp_path / "a.json")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"extract-hsi img0: 50/50 patches \(100%\), [\d.]+ patches/s, elapsed", err), err
    assert "extract-hsi img0: done 50/50 patches" in err
    assert cli.main([*argv, "--out", str(tmp_path / "b.h5"), "--record", str(tmp_path / "b.json"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "50 patches" in captured.out  # the job's own summary line stays

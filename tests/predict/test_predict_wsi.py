"""Whole-slide inference on the real slides: the grid covers exactly the tissue tiles, tile
probabilities equal a direct forward pass of the same pixels; outputs, ranks and bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, VENV_BIN, mpi_launcher
from medflow import cli
from medflow.core import config as config_mod
from medflow.core.manifest import ImageEntry
from medflow.extract.wsi import annotations, stain, tissue
from medflow.extract.wsi.pyramid import write_pyramid_tiff
from medflow.extract.wsi.slide import open_slide
from medflow.predict import regions, tiling, wsi
from medflow.train import models

SLIDES = {  # image_id → (path below the shared data, manifest mpp: the TCGA slide has no mpp metadata)
    "cmu": ("cmu1_small_region/CMU-1-Small-Region.svs", ""),
    "tcga": ("tcga_cr7395_svs/tcga-cr-7395-01a-01-ts1.svs", "0.25"),
}


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_config(tmp_path: Path, rows: list[str], **predict: object) -> Path:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    del cfg["synth"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image_id,patient_id,image,annotation,mpp,label\n" + "".join(r + "\n" for r in rows))
    cfg["cohorts"] = {"real": {"kind": "wsi", "manifest": str(manifest)}}
    cfg["studies"] = {}
    cfg["results"] = str(tmp_path / "results")
    cfg["predict_wsi"] = {"batch_size": 16, **predict}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_model(path: Path, patch_size: int = 224, classes: tuple[str, ...] = ("normal", "tumour")) -> Path:
    torch.manual_seed(0)
    net = models.build({"name": "resnet18", "input_size": 48}, len(classes), 3, patch_size)
    models.save_model(path, net, {"class_names": list(classes), "kind": "wsi", "positive_class": classes[-1]})
    return path


def run_predict(cfg: Path, model: Path, out: Path, *ids: str) -> int:
    args = ["predict-wsi", "--config", str(cfg), "--model", str(model), "--cohort", "real", "--out-dir", str(out)]
    return cli.main([*args, "--image-ids", *ids] if ids else [*args, "--all"])


@pytest.fixture(scope="module")
def real_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("predict_wsi")
    rows = [f"{k},p_{k},{shared_data / rel},,{mpp}," for k, (rel, mpp) in SLIDES.items()]
    cfg, model, out = make_config(tmp, rows), make_model(tmp / "model.pt"), tmp / "out"
    assert run_predict(cfg, model, out) == 0
    return cfg, model, out


@pytest.mark.parametrize("image_id", sorted(SLIDES))
def test_grid_covers_exactly_the_tissue_tiles(real_run, shared_data: Path, image_id: str) -> None:
    cfg_path, _, out = real_run
    cfg = config_mod.load(cfg_path)
    rel, mpp = SLIDES[image_id]
    with np.load(out / f"{image_id}.npz") as npz:
        rc, coords, stride, footprint = npz["rc"], npz["coords"], float(npz["stride"]), float(npz["footprint"])
        shape, mpp0 = tuple(npz["grid_shape"]), float(npz["level0_mpp"])
    slide = open_slide(shared_data / rel)
    entry = ImageEntry(image_id, "p", str(shared_data / rel), mpp=float(mpp) if mpp else None)
    tm = tissue.slide_tissue(slide, entry, mpp0, cfg["wsi"]["tissue"])
    # Independently, tile by tile: the tissue mask at the centres of the tile's 16×16 cells.
    cell = footprint / tiling.CELLS_PER_TILE
    expected = set()
    width, height = slide.dimensions
    for r in range(shape[0]):
        for c in range(shape[1]):
            x0, y0 = c * stride, r * stride
            assert x0 + footprint <= width + 1e-6 and y0 + footprint <= height + 1e-6  # the lattice lies on the slide
            centres = (np.arange(tiling.CELLS_PER_TILE) + 0.5) * cell
            rows = np.minimum(((y0 + centres) / tm.cell).astype(int), tm.mask.shape[0] - 1)
            cols = np.minimum(((x0 + centres) / tm.cell).astype(int), tm.mask.shape[1] - 1)
            fraction = tm.mask[np.ix_(rows, cols)].mean()
            if fraction >= cfg["predict_wsi"]["tissue_min"] and fraction > 0:
                expected.add((r, c))
    assert {tuple(x) for x in rc.tolist()} == expected and len(expected) > 10
    np.testing.assert_array_equal(coords, np.round(rc[:, ::-1] * stride).astype(np.int64))


@pytest.mark.parametrize("image_id", sorted(SLIDES))
def test_tile_probabilities_equal_a_direct_forward_pass(real_run, shared_data: Path, image_id: str) -> None:
    _, model_path, out = real_run
    with np.load(out / f"{image_id}.npz") as npz:
        coords, probs, ok = npz["coords"], npz["probabilities"], npz["quality_ok"]
        level, read_size, patch = int(npz["level"]), int(npz["read_size"]), int(npz["patch_size"])
        prob_map, rc = npz["probability_map"], npz["rc"]
    assert ok.sum() > 10 and np.isnan(probs[~ok]).all() and np.isfinite(probs[ok]).all()
    np.testing.assert_array_equal(prob_map[rc[:, 0], rc[:, 1]], probs)
    slide = open_slide(shared_data / SLIDES[image_id][0])
    pixels = []
    for x, y in coords[ok].tolist():  # the documented read: read_region, then Lanczos to the patch size
        rgb = np.asarray(slide.read_region((x, y), level, (read_size, read_size)))[..., :3]
        pixels.append(np.asarray(Image.fromarray(rgb).resize((patch, patch), Image.Resampling.LANCZOS)))
    model, _ = models.load_model(model_path)
    direct = models.predict_proba(model, torch.from_numpy(np.stack(pixels))).numpy()
    np.testing.assert_allclose(probs[ok], direct, rtol=0, atol=1e-5)


def test_outputs_heatmap_geojson_detections_record(real_run) -> None:
    cfg_path, _, out = real_run
    cfg = config_mod.load(cfg_path)
    rec = json.loads((out / "cmu.record.json").read_text())
    assert rec["job"] == "predict-wsi" and rec["status"] == "ok"
    assert rec["geometry"]["mpp_source"] == "slide" and rec["geometry"]["resampled"]
    tcga = json.loads((out / "tcga.record.json").read_text())
    assert tcga["geometry"]["mpp_source"] == "manifest" and tcga["geometry"]["level"] == 1  # 0.5 µm/px level, resized
    with np.load(out / "cmu.npz") as npz:
        probs, ok, prob_map = npz["probabilities"], npz["quality_ok"], npz["probability_map"]
        stride, footprint = float(npz["stride"]), float(npz["footprint"])
    p = probs[ok, 1]
    assert rec["slide"]["score"] == pytest.approx(np.sort(p)[::-1][: cfg["predict_wsi"]["top_k"]].mean())
    assert rec["slide"]["label"] == 0 and rec["slide"]["label_source"] == "no annotation"
    assert rec["tiles"] == {"tissue": len(probs), "predicted": int(ok.sum()), "quality_rejected": int((~ok).sum())}
    png = Image.open(out / "cmu.png")
    assert png.size[0] > 400 and png.size[1] > 300
    # The GeoJSON regions, read back by medflow's own QuPath reader and drawn on the lattice, are exactly
    # the tiles at or above the region threshold (each tile = its stride square around its centre).
    polys = annotations.parse_geojson(out / "cmu.geojson")
    assert {pol.group for pol in polys} <= {"tumour"}
    drawn = annotations.rasterize(
        [
            annotations.Polygon(
                pol.exterior - (footprint - stride) / 2, [h - (footprint - stride) / 2 for h in pol.holes]
            )
            for pol in polys
        ],
        prob_map.shape[:2],
        stride,
    )
    np.testing.assert_array_equal(
        drawn, np.nan_to_num(prob_map[..., 1], nan=-1) >= cfg["predict_wsi"]["region_threshold"]
    )
    det = regions.read_detections_csv(out / "cmu.csv")
    assert len(det) == rec["detections"] and (det[:, 2] >= cfg["predict_wsi"]["detection_min"]).all()
    # every detection is a tile centre carrying that tile's probability
    centres = {
        (round(x + footprint / 2), round(y + footprint / 2)): q
        for (x, y), q in zip(np.load(out / "cmu.npz")["coords"].tolist(), probs[:, 1])
    }
    for x, y, q in det.tolist():
        assert centres[(int(x), int(y))] == pytest.approx(q, abs=1e-6)
    assert rec["lesions"]["fp_probs"] == pytest.approx(det[:, 2].tolist(), abs=1e-6)  # no tumour: all false positives


def test_regions_trace_masks_exactly() -> None:
    rng = np.random.default_rng(3)
    masks = [rng.random((9, 11)) > 0.55 for _ in range(20)]
    checker = np.zeros((4, 4), bool)
    checker[::2, ::2] = checker[1::2, 1::2] = True  # pixels touching only at corners
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False  # a hole
    for mask in [*masks, checker, ring]:
        polys = regions.raster_polygons(mask)
        drawn = annotations.rasterize([annotations.Polygon(e, holes) for e, holes in polys], mask.shape, 1.0)
        np.testing.assert_array_equal(drawn, mask)
        for exterior, _ in polys:
            assert (exterior[0] == exterior[-1]).all()
    assert len(regions.raster_polygons(checker)) == 8
    ((_, holes),) = regions.raster_polygons(ring)
    assert len(holes) == 1


def test_detections_greedy_nms() -> None:
    grid = np.full((5, 7), np.nan)
    grid[1, 1], grid[1, 2], grid[4, 6], grid[3, 3] = 0.9, 0.8, 0.7, 0.04
    grid[2, 5] = 0.9
    points = regions.detections(grid, radius_cells=1.5, min_probability=0.05)
    # 0.9 at (1,1) and (2,5) (row-major tie order), (1,2) suppressed by (1,1), (4,6) is 2.2 cells from (2,5)
    assert points.tolist() == [[1, 1, 0.9], [2, 5, 0.9], [4, 6, 0.7]]


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------------
def _blank_slide(path: Path) -> Path:
    write_pyramid_tiff(path, np.full((1024, 1024, 3), 242, np.uint8), 0.5)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("patch_size", "wsi.patch_size is 224"),
        ("classes", "differ from wsi.labels.classes"),
        ("blank", "no tissue found"),
        ("unreadable", "not a slide OpenSlide can read"),
    ],
)
def test_bad_input_names_file_and_key(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture, case: str, expected: str
) -> None:
    image = shared_data / SLIDES["cmu"][0]
    if case == "blank":
        image = _blank_slide(tmp_path / "blank.tiff")
    if case == "unreadable":
        image = tmp_path / "broken.svs"
        image.write_bytes(b"II*\x00" + b"\x00" * 200)
    cfg = make_config(tmp_path, [f"s1,p1,{image},,,"])
    model = make_model(
        tmp_path / "model.pt",
        patch_size=192 if case == "patch_size" else 224,
        classes=("a", "b", "c") if case == "classes" else ("normal", "tumour"),
    )
    out = tmp_path / "out"
    assert run_predict(cfg, model, out, "s1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and err[0].startswith("medflow predict-wsi: error: ")
    assert str(model if case in ("patch_size", "classes") else image) in err[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
@pytest.mark.mpi
def test_two_ranks_shard_tiles_and_rank0_gathers(real_run, tmp_path: Path) -> None:
    cfg, model, out = real_run
    two = tmp_path / "two"
    cmd = [*mpi_launcher(), "-n", "2", str(VENV_BIN / "medflow"), "predict-wsi", "--config", str(cfg)]
    cmd += ["--model", str(model), "--cohort", "real", "--image-ids", "cmu", "--out-dir", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((two / "cmu.record.json").read_text())
    assert rec["ranks"] == 2
    with np.load(out / "cmu.npz") as a, np.load(two / "cmu.npz") as b:
        np.testing.assert_array_equal(a["rc"], b["rc"])
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-6)


def test_more_than_two_classes_one_map_per_class(tmp_path: Path, shared_data: Path) -> None:
    """Three classes (as multi-class annotations will give): a heatmap panel per class, regions of every
    class but the first, slide score of the positive class."""
    cfg_path = make_config(tmp_path, [f"cmu,p1,{shared_data / SLIDES['cmu'][0]},,,"], overlap=0.0)
    cfg = config_mod.load(cfg_path)
    classes = ["normal", "tumour", "stroma"]
    cfg["wsi"]["labels"].update(classes=classes, groups={"Tumor": "tumour", "Stroma": "stroma"}, background="normal")
    model, meta = models.load_model(make_model(tmp_path / "m3.pt", classes=tuple(classes)))
    job = wsi.SlideJob(cfg, "real", model, meta, str(tmp_path / "m3.pt"), wsi.make_dist(cfg), "tumour")
    entry = ImageEntry("cmu", "p1", str(shared_data / SLIDES["cmu"][0]))
    rec = job.run(entry, tmp_path / "out3", None, None)
    assert rec is not None
    with np.load(tmp_path / "out3" / "cmu.npz") as npz:
        assert npz["probability_map"].shape[-1] == 3 and list(npz["class_names"]) == classes
        ok, probs = npz["quality_ok"], npz["probabilities"]
    assert rec["slide"]["score"] == pytest.approx(np.sort(probs[ok, 1])[::-1][:5].mean())
    groups = {p.group for p in annotations.parse_geojson(tmp_path / "out3" / "cmu.geojson")}
    assert groups <= {"tumour", "stroma"}
    two = Image.open(tmp_path / "out3" / "cmu.png").size[0]
    assert two > 3 * 300  # the slide and three class panels side by side


def test_stain_normalised_model_gets_normalised_tiles(real_run, tmp_path: Path, shared_data: Path) -> None:
    """A model trained on normalised patches sees the tiles through the normaliser its file records;
    the probabilities equal a forward pass of normalise(raw tiles), and differ from the raw ones."""
    cfg_path, model_path, out = real_run
    model, meta = models.load_model(model_path)
    rng = np.random.default_rng(0)
    reference = rng.integers(60, 230, size=(4096, 3), dtype=np.uint8)  # a made-up reference colour spread
    norm = stain.make("reinhard", {}, stain.fit("reinhard", {}, reference))
    stained_path = tmp_path / "stained.pt"
    models.save_model(stained_path, model, {**meta, "stain": norm.record(applied="load", reference="ref.json")})
    args = ["--config", str(cfg_path), "--model", str(stained_path), "--cohort", "real", "--out-dir"]
    assert cli.main(["predict-wsi", *args, str(tmp_path / "out"), "--image-ids", "cmu"]) == 0
    with np.load(tmp_path / "out" / "cmu.npz") as npz:
        coords, probs, ok = npz["coords"], npz["probabilities"], npz["quality_ok"]
        level, size, patch = int(npz["level"]), int(npz["read_size"]), int(npz["patch_size"])
    with np.load(out / "cmu.npz") as raw:
        assert np.abs(raw["probabilities"][ok] - probs[ok]).max() > 1e-3
    slide = open_slide(shared_data / SLIDES["cmu"][0])
    first = coords[ok][:16].tolist()
    tiles = np.stack(
        [
            np.asarray(
                Image.fromarray(np.asarray(slide.read_region((x, y), level, (size, size)))[..., :3]).resize(
                    (patch, patch), Image.Resampling.LANCZOS
                )
            )
            for x, y in first
        ]
    )
    direct = models.predict_proba(model, torch.from_numpy(norm.apply(tiles))).numpy()
    np.testing.assert_allclose(probs[ok][:16], direct, rtol=0, atol=1e-5)
    record = json.loads((tmp_path / "out" / "cmu.record.json").read_text())
    assert record["stain"]["digest"] == norm.digest

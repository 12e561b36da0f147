"""Whole-image HSI prediction: window view, batching, border handling, outputs, the predict-hsi job."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_config
from hsi_cohorts import make_mosaic_cohort, salinas_cfg
from medflow import cli
from medflow.core import config as config_mod
from medflow.extract.hsi import chain as hsi
from medflow.extract.hsi.patches import extract_patches, pixel_windows
from medflow.predict import hsi as hsi_predict


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch: pytest.MonkeyPatch):
    """One intra-op thread, as a 1-CPU cluster job: on a shared 2-core machine more threads only spin."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CentreBands(torch.nn.Module):
    """Stand-in model: logits = the first C bands of the centre pixel (so argmax is known in advance)."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        k = x.shape[1]
        return x[:, k // 2, k // 2, : self.n_classes] * 10.0


@pytest.mark.parametrize("border", ["reflect", "skip"])
def test_predict_cube_classifies_every_pixel_in_batches(border: str) -> None:
    cube = np.random.default_rng(0).random((13, 17, 6)).astype(np.float32)
    model = CentreBands(4)
    labels, probs, timings = hsi_predict.predict_cube(model, cube, 5, border, batch=50)
    assert labels.shape == (13, 17) and labels.dtype == np.int16
    assert probs.shape == (13, 17, 4) and probs.dtype == np.float16
    expected = cube[:, :, :4].argmax(axis=-1)
    if border == "reflect":
        np.testing.assert_array_equal(labels, expected)
        n = 13 * 17
    else:
        inner = np.zeros((13, 17), bool)
        inner[2:-2, 2:-2] = True
        np.testing.assert_array_equal(labels[inner], expected[inner])
        assert (labels[~inner] == -1).all() and (probs[~inner] == 0).all()
        n = 9 * 13
    per_batch = 2 * 17 if border == "reflect" else 3 * 13  # whole rows of windows, ≤ 50 pixels
    assert sum(s[0] for s in model.seen) == n and max(s[0] for s in model.seen) == per_batch
    assert all(s[1:] == (5, 5, 6) for s in model.seen)  # NHWC windows
    np.testing.assert_allclose(probs[labels >= 0].astype(np.float32).sum(axis=-1), 1.0, atol=5e-3)
    assert set(timings) == {"patches", "predict"}


def test_windows_equal_extraction_patches() -> None:
    cube = np.random.default_rng(1).random((8, 9, 3)).astype(np.float32)
    windows, offset = pixel_windows(cube, 3, pad=True)
    assert windows.shape == (8, 9, 3, 3, 3) and offset == 0
    rows, cols = np.divmod(np.arange(72), 9)
    np.testing.assert_array_equal(windows[rows, cols], extract_patches(cube, rows, cols, 3))
    assert np.shares_memory(pixel_windows(cube, 3, pad=False)[0], cube)  # a view, not a copy


def _save_conv2dnet(path: Path, bands: int, class_names: list[str], patch: int) -> None:
    from medflow.train import models

    torch.manual_seed(0)
    net = models.build({"name": "conv2dnet"}, len(class_names), bands, patch)
    models.save_model(path, net, {"class_names": class_names, "kind": "hsi"})


@pytest.fixture
def tiny_predict(default_cfg: dict, tmp_path: Path) -> tuple[dict, Path, Path]:
    manifest = make_mosaic_cohort(tmp_path / "data")
    cfg = copy.deepcopy(default_cfg)
    cfg["cohorts"]["tiny"] = {"kind": "hsi", "manifest": str(manifest)}
    cfg["studies"]["tiny"] = {"cohort": "tiny", "model": {"name": "conv2dnet"}}
    cfg["hsi"].update(patch=5, predict_batch=64)
    cfg = config_mod.validate(cfg)
    model = tmp_path / "model.pt"
    _save_conv2dnet(model, 25, list(cfg["hsi"]["class_names"]), 5)
    return cfg, write_config(cfg, tmp_path / "config.yaml"), model


def predict(cfg_path: Path, model: Path, out: Path, ids: list[str], cohort: str = "tiny", study: str = "tiny") -> int:
    return cli.main(
        [
            "predict-hsi",
            "--config",
            str(cfg_path),
            "--study",
            study,
            "--model",
            str(model),
            "--cohort",
            cohort,
            "--image-ids",
            *ids,
            "--out-dir",
            str(out),
        ]
    )


def test_predict_hsi_writes_maps_and_record(tiny_predict: tuple[dict, Path, Path], tmp_path: Path) -> None:
    cfg, cfg_path, model = tiny_predict
    out = tmp_path / "maps"
    assert predict(cfg_path, model, out, ["img0", "img1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img0.npz", "img0.png", "img1.npz", "img1.png", "record.json"]
    with np.load(out / "img0.npz") as npz:
        labels, probs, names = npz["labels"], npz["probabilities"], list(npz["class_names"])
    assert labels.shape == (12, 14) and labels.dtype == np.int16 and probs.shape == (12, 14, 5)
    assert probs.dtype == np.float16 and names == cfg["hsi"]["class_names"]
    # labels are the float32 argmax; the stored float16 probabilities may tie, never disagree
    at_label = np.take_along_axis(probs, labels[..., None].astype(np.int64), axis=-1)[..., 0]
    np.testing.assert_array_equal(at_label, probs.max(axis=-1))
    with Image.open(out / "img0.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    record = json.loads((out / "record.json").read_text())
    assert record["job"] == "predict-hsi" and record["status"] == "ok" and record["threads"] == 1
    assert {"load", "chain", "patches", "predict", "write", "other"} <= set(record["timings_s"])
    # one clock, stages that do not overlap, and "other": the stages add up to the job's wall time
    assert sum(record["timings_s"].values()) == pytest.approx(record["wall_s"], abs=1e-9)
    assert record["throughput"]["px_per_s"] > 0
    assert [i["image_id"] for i in record["images"]] == ["img0", "img1"]
    metrics = record["metrics"]["images"]["img0"]
    assert metrics["n"] == 50 and 0 <= metrics["oacc"] <= 1
    # the same model, applied to the extraction chain's cube directly, gives the same map
    from medflow.train import models

    net, _ = models.load_model(model)
    entry_cube = hsi.process_image(hsi_entry(cfg, "img0"), cfg)[0].astype(np.float16).astype(np.float32)
    direct, _, _ = hsi_predict.predict_cube(net, entry_cube, 5, "reflect", 1000)
    np.testing.assert_array_equal(direct, labels)


def hsi_entry(cfg: dict, image_id: str):
    from medflow.core.manifest import entry

    return entry(cfg, "tiny", image_id)


def test_class_palette_is_fixed() -> None:
    palette = hsi_predict.class_palette(["healthy", "tumour", "venous", "arterial", "dura", "other"])
    assert palette.shape == (7, 3)
    assert tuple(palette[1]) == (0, 176, 0) and tuple(palette[2]) == (220, 0, 0) and tuple(palette[0]) == (0, 0, 0)
    assert len({tuple(p) for p in palette}) == 7


def test_map_legend_names_every_colour_shown() -> None:
    names = ["healthy", "tumour"]
    labels = np.array([[0, 1], [-1, 1]], np.int16)
    gt = np.array([[0, -1], [1, 1]])
    entries = hsi_predict.legend_entries(labels, names, gt)
    palette = hsi_predict.class_palette(names)
    shown = {tuple(int(v) for v in palette[labels[i, j] + 1]) for i in range(2) for j in range(2)}
    shown.add(hsi_predict.UNLABELLED_GT)  # the ground-truth panel's unlabelled pixel
    assert {rgb for rgb, _ in entries} == shown
    texts = [t for _, t in entries]
    assert texts == ["healthy", "tumour", "not classified (border)", "unlabelled (no ground truth)"]
    assert len({rgb for rgb, _ in entries}) == len(entries)  # no two meanings share a colour
    full = np.zeros((2, 2), np.int16)
    assert [t for _, t in hsi_predict.legend_entries(full, names, np.zeros((2, 2), int))] == names


def test_model_that_does_not_fit_is_refused(
    tiny_predict: tuple[dict, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg, cfg_path, _ = tiny_predict
    wrong = tmp_path / "wrong.pt"
    _save_conv2dnet(wrong, 24, list(cfg["hsi"]["class_names"]), 5)
    out = tmp_path / "maps"
    assert predict(cfg_path, wrong, out, ["img0"]) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "24 bands" in err
    assert not out.exists() or not any(p.suffix in (".npz", ".png", ".json") for p in out.iterdir())


def test_salinas_map_has_cube_shape(shared_data: Path, default_cfg: dict, tmp_path: Path) -> None:
    cfg = salinas_cfg(default_cfg, shared_data, tmp_path)
    cfg["hsi"]["chain"]["normalise"] = True
    cfg["studies"]["salinas"] = {"cohort": "salinas", "positive_class": "c1", "model": {"name": "conv2dnet"}}
    cfg_path = write_config(config_mod.validate(cfg), tmp_path / "config.yaml")
    model = tmp_path / "model.pt"
    _save_conv2dnet(model, 204, list(cfg["hsi"]["class_names"]), 7)
    out = tmp_path / "maps"
    assert predict(cfg_path, model, out, ["salinasA"], cohort="salinas", study="salinas") == 0
    with np.load(out / "salinasA.npz") as npz:
        assert npz["labels"].shape == (83, 86) and npz["probabilities"].shape == (83, 86, 6)
        assert (npz["labels"] >= 0).all()
    assert (out / "salinasA.png").stat().st_size > 1000
    record = json.loads((out / "record.json").read_text())
    assert record["metrics"]["images"]["salinasA"]["n"] == 5348


def test_predict_without_ground_truth(default_cfg: dict, tmp_path: Path) -> None:
    """A cube with no annotation: map and probabilities, no accuracy; `border: skip` leaves −1 edges."""
    from medflow.core.manifest import ImageEntry, write_manifest

    cube = np.random.default_rng(3).random((9, 10, 4)).astype(np.float32) + 0.1
    np.save(tmp_path / "c.npy", cube)
    write_manifest(tmp_path / "m.csv", [ImageEntry(image_id="c", patient_id="p", image=str(tmp_path / "c.npy"))])
    cfg = copy.deepcopy(default_cfg)
    cfg["cohorts"]["nogt"] = {"kind": "hsi", "manifest": str(tmp_path / "m.csv")}
    cfg["studies"] = {"nogt": {"cohort": "nogt", "positive_class": "b", "model": {"name": "conv2dnet"}}}
    cfg["hsi"].update(patch=3, border="skip", class_names=["a", "b"])
    cfg_path = write_config(config_mod.validate(cfg), tmp_path / "config.yaml")
    _save_conv2dnet(tmp_path / "model.pt", 4, ["a", "b"], 3)
    assert predict(cfg_path, tmp_path / "model.pt", tmp_path / "maps", ["c"], cohort="nogt", study="nogt") == 0
    with np.load(tmp_path / "maps" / "c.npz") as npz:
        labels = npz["labels"]
    assert labels.shape == (9, 10) and (labels[0] == -1).all() and (labels[1:-1, 1:-1] >= 0).all()
    record = json.loads((tmp_path / "maps" / "record.json").read_text())
    assert record["images"][0]["accuracy"] is None and record["metrics"] == {"images": {}}
    assert record["images"][0]["classified"] == 7 * 8


def test_predict_test_images_of_an_outer_fold(default_cfg: dict, tmp_path: Path) -> None:
    """`--folds PLAN --outer I` (as the Snakemake rule calls it) maps exactly the outer test patients' images."""
    from medflow.core import fsio
    from medflow.core.index import build_index, load_index
    from medflow.core.manifest import entries
    from medflow.extract.hsi import job as hsi_mod
    from medflow.train import splits

    manifest = make_mosaic_cohort(tmp_path / "data", n_images=4)
    cfg = copy.deepcopy(default_cfg)
    cfg["cohorts"]["tiny"] = {"kind": "hsi", "manifest": str(manifest)}
    cfg["studies"]["tiny"] = {"cohort": "tiny", "model": {"name": "conv2dnet"}}
    cfg["hsi"].update(patch=3, per_class=3)
    cfg["folds"].update(outer=2, inner=2)
    cfg = config_mod.validate(cfg)
    cfg_path = write_config(cfg, tmp_path / "config.yaml")
    records = []
    for e in entries(cfg, "tiny"):
        records.append(tmp_path / "shards" / f"{e.image_id}.record.json")
        hsi_mod.extract_image(e, cfg, "tiny", tmp_path / "shards" / f"{e.image_id}.h5", records[-1], verbose=False)
    build_index(records, tmp_path / "index.json", "tiny", "hsi", cfg)
    plan = splits.make_plan(load_index(tmp_path / "index.json"), cfg, "tiny")
    fsio.write_json(tmp_path / "folds.json", plan)
    _save_conv2dnet(tmp_path / "model.pt", 25, list(cfg["hsi"]["class_names"]), 3)
    out = tmp_path / "maps"
    assert (
        cli.main(
            [
                "predict-hsi",
                "--config",
                str(cfg_path),
                "--study",
                "tiny",
                "--model",
                str(tmp_path / "model.pt"),
                "--cohort",
                "tiny",
                "--folds",
                str(tmp_path / "folds.json"),
                "--outer",
                "1",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    test_patients = set(plan["outer"][1]["test_patients"])
    expected = sorted(e.image_id for e in entries(cfg, "tiny") if e.patient_id in test_patients)
    assert sorted(p.stem for p in out.glob("*.npz")) == expected and expected
    record = json.loads((out / "record.json").read_text())
    assert record["outer"] == 1 and sorted(i["image_id"] for i in record["images"]) == expected


def test_model_trained_on_one_patient_maps_another(default_cfg: dict, tmp_path: Path) -> None:
    """End to end on the demo generator's real-format files: extract-hsi shards → train conv2dnet on
    patient 1's patches → predict-hsi on patient 0. Far above chance only if extraction and whole-image
    prediction agree on the chain, the band order and the window geometry."""
    from medflow.core.index import build_index, load_index
    from medflow.demo import cohort as synth
    from medflow.train import models
    from medflow.train.patchset import PatchSet

    cfg = copy.deepcopy(default_cfg)
    cfg["synth"]["hsi"].update(patients=2, mosaic_height=250, mosaic_width=300)
    cfg["hsi"].update(per_class=80, dtype="float16", patch=5)
    cfg["studies"]["hsi_demo"] = {"cohort": "hsi_demo", "model": {"name": "conv2dnet"}}
    cfg = config_mod.validate(cfg)
    cfg_path = write_config(cfg, tmp_path / "config.yaml")
    synth.write_cohort(cfg, only="hsi")
    records = []
    for image_id in ("hsi_p00_i0", "hsi_p01_i0"):
        records.append(tmp_path / "shards" / f"{image_id}.record.json")
        assert (
            cli.main(
                [
                    "extract-hsi",
                    "--config",
                    str(cfg_path),
                    "--cohort",
                    "hsi_demo",
                    "--image-id",
                    image_id,
                    "--out",
                    str(records[-1].with_name(f"{image_id}.h5")),
                    "--record",
                    str(records[-1]),
                ]
            )
            == 0
        )
    build_index(records, tmp_path / "index.json", "hsi_demo", "hsi", cfg)
    train = PatchSet(load_index(tmp_path / "index.json"), ["hsi_p01"])
    x = torch.from_numpy(train.read(np.arange(len(train))).astype(np.float32))
    y = torch.from_numpy(train.labels)
    torch.manual_seed(0)
    net = models.build({"name": "conv2dnet"}, 5, 25, 5)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(40):
        for b in torch.randperm(len(x)).split(40):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    models.save_model(tmp_path / "model.pt", net.eval(), {"class_names": train.class_names, "kind": "hsi"})
    assert (
        predict(cfg_path, tmp_path / "model.pt", tmp_path / "maps", ["hsi_p00_i0"], cohort="hsi_demo", study="hsi_demo")
        == 0
    )
    record = json.loads((tmp_path / "maps" / "record.json").read_text())
    assert record["images"][0]["accuracy"] > 0.7  # chance is 0.2


def test_progress_in_images_and_quiet(tiny_predict: tuple[dict, Path, Path], tmp_path: Path, capsys) -> None:
    cfg, _, model = tiny_predict
    cfg["progress"] = {"mode": "lines", "interval_s": 0}
    cfg_path = write_config(cfg, tmp_path / "lines.yaml")
    assert predict(cfg_path, model, tmp_path / "a", ["img0", "img1"]) == 0
    err = capsys.readouterr().err
    assert "predict-hsi tiny: 1/2 images (50%)" in err and "predict-hsi tiny: done 2/2 images" in err
    argv = ["predict-hsi", "--config", str(cfg_path), "--study", "tiny", "--model", str(model), "--cohort", "tiny"]
    assert cli.main([*argv, "--image-ids", "img0", "--out-dir", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""

"""End to end: the real Snakemake DAG on a small synthetic cohort (real OpenSlide, HDF5, MPI, training)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import ROOT, VENV_BIN, removed_unless_failed

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

E2E_CONFIG = ROOT / "tests" / "e2e" / "config.yaml"  # the smallest real run (README: quickest real run)


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [
        str(VENV_BIN / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(E2E_CONFIG),
        "--cores",
        "2",
        *args,
    ]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, request):
    work = tmp_path_factory.mktemp("wf")
    t0 = time.perf_counter()
    proc = snakemake(work)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    print(f"workflow wall time: {elapsed:.0f} s")
    with removed_unless_failed(request, work):
        yield work, work / "results" / "laptop"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_shards_hold_labelled_patches_matching_the_index(demo_run):
    _, res = demo_run
    for cohort, kind in (("wsi_demo", "wsi"), ("hsi_demo", "hsi")):
        index = read_json(res / "index" / f"{cohort}.json")
        assert index["kind"] == kind and not index["failed"]
        assert len(index["shards"]) == len(list((res / "shards" / cohort).glob("*.h5")))
        for entry in index["shards"]:
            with h5py.File(res / "index" / entry["path"], "r") as h5:
                labels = h5["labels"][:]
                assert h5["patches"].shape[0] == len(labels) == len(h5["coords"]) == entry["n"] > 0
                counts = {name: int((labels == i).sum()) for i, name in enumerate(json.loads(h5.attrs["class_names"]))}
                assert counts == entry["counts"]
                assert h5.attrs["patient_id"] == entry["patient_id"]
                if kind == "wsi":
                    assert h5["patches"].shape[1:] == (224, 224, 3) and h5["patches"].dtype == np.uint8
                    assert set(np.unique(labels)) <= {0, 1}
                    assert max(counts.values()) <= 12  # n per class per slide
                else:
                    assert h5["patches"].shape[1:] == (7, 7, 25)
                    assert max(counts.values()) <= 40


def test_fold_plan_keeps_each_patient_on_one_side(demo_run):
    _, res = demo_run
    for study in ("wsi_demo", "hsi_demo"):
        plan = read_json(res / "folds" / f"{study}.json")
        tested = []
        for outer in plan["outer"]:
            test = set(outer["test_patients"])
            tested += sorted(test)
            for inner in outer["inner"]:
                train, val = set(inner["train_patients"]), set(inner["val_patients"])
                assert not (train & val) and not (train & test) and not (val & test)
                assert train | val == set(outer["train_patients"])
        assert len(tested) == len(set(tested)) == 4  # every patient tested exactly once


def test_training_learns_and_runs_on_two_ranks(demo_run):
    _, res = demo_run
    for study in ("wsi_demo", "hsi_demo"):
        for rec_path in sorted((res / "runs" / study).glob("outer*/inner*/record.json")):
            rec = read_json(rec_path)
            assert rec["status"] == "ok" and rec["launch"]["ranks"] == 2
            assert rec["launch"]["launcher"] == "mpiexec"
            with open(rec_path.parent / "curves.csv") as fh:
                rows = list(csv.DictReader(fh))
            losses = [float(r["train_loss"]) for r in rows]
            assert losses[-1] < losses[0], (rec_path, losses)
    hsi_oacc = [read_json(p)["metrics"]["test"]["oacc"] for p in (res / "runs" / "hsi_demo").glob("outer*/record.json")]
    assert np.mean(hsi_oacc) > 1 / 5 + 0.1  # well above chance on five classes


def test_report_lists_the_site_with_measured_numbers(demo_run):
    _, res = demo_run
    md = (res / "report" / "report.md").read_text()
    html = (res / "report" / "report.html").read_text()
    assert "laptop" in md and "laptop" in html
    summary = read_json(res / "summary.json")
    assert json.dumps(summary)  # machine-readable
    maps = list((res / "runs" / "hsi_demo").glob("outer*/maps/*.png"))
    assert maps
    # The numbers are the records' own: s/epoch over the train jobs, test accuracy over the outer folds.
    table = read_json(res / "report" / "report.json")["tables"]["training"]
    for study in ("wsi_demo", "hsi_demo"):
        row = dict(zip(table["columns"], next(r for r in table["rows"] if r[:2] == ["laptop", study])))
        epochs = [
            read_json(p)["throughput"]["s_per_epoch"] for p in (res / "runs" / study).glob("outer*/inner*/record.json")
        ]
        tests = [read_json(p)["metrics"]["test"]["oacc"] for p in (res / "runs" / study).glob("outer*/record.json")]
        assert row["s_per_epoch_mean"] == pytest.approx(np.mean(epochs)) and row["s_per_epoch_mean"] > 0
        assert row["test_oacc_mean"] == pytest.approx(np.mean(tests))
        assert f"{row['test_oacc_mean']:.3f}" in md


def test_stages_add_up_to_the_wall_time_and_every_slide_has_a_qc_image(demo_run):
    _, res = demo_run
    records = [*res.glob("shards/*/*.record.json"), *res.glob("runs/*/outer*/**/record.json")]
    assert len(records) > 20
    for path in records:
        rec = read_json(path)
        stages = [v for v in rec["timings_s"].values() if not isinstance(v, list)]
        assert sum(stages) == pytest.approx(rec["wall_s"], abs=1e-6), path
    slides = sorted(res.glob("shards/wsi_demo/*.record.json"))
    for path in slides:
        assert (path.parent / read_json(path)["qc"]["png"]).is_file()
    html = (res / "report" / "report.html").read_text()
    assert (
        html.count('<a href="figures/qc/')
        == len(slides)
        == len(list((res / "report" / "figures" / "qc").glob("*.png")))
    )


def test_tensorboard_has_scalar_series_for_every_fold_job(demo_run):
    """`tensorboard --logdir results/<site>/runs`: one run per training job, named <study>/outer<i>/inner<j>
    (and <study>/outer<i>/refit for the refit of each outer fold, trained without validation)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    _, res = demo_run
    cfg = yaml.safe_load(E2E_CONFIG.read_text())
    mux = EventMultiplexer(size_guidance={"scalars": 0})
    mux.AddRunsFromDirectory(str(res / "runs"))
    mux.Reload()
    runs = res / "runs"
    inner = sorted(str(p.parent.relative_to(runs)) for p in runs.glob("*/outer*/inner*/record.json"))
    refit = sorted(str(p.parent.relative_to(runs)) for p in runs.glob("*/outer*/refit/record.json"))
    assert len(inner) == 8 and len(refit) == 4 and sorted(mux.Runs()) == sorted(inner + refit)  # nothing else
    for run in inner + refit:
        study, record = run.split("/")[0], read_json(runs / run / "record.json")
        epochs = record["epochs_run"]
        assert epochs == (record["refit"]["epochs"] if run in refit else cfg["studies"][study]["train"]["epochs"])
        scalars = mux.Runs()[run]["scalars"]
        tags = ("train/loss", "train/acc", "train/lr", "perf/img_per_s")
        for tag in tags + (() if run in refit else ("val/loss", "val/acc", "val/auc")):
            assert [e.step for e in mux.Scalars(run, tag)] == list(range(epochs)), (run, tag)
        assert {"batch/loss", "batch/lr", "batch/img_per_s", "perf/load_ms_per_patch"} <= set(scalars)
        assert ("model/val_oacc" in scalars) == (run not in refit)
        with open(runs / run / "curves.csv") as fh:
            losses = [float(r["train_loss"]) for r in csv.DictReader(fh)]
        assert [e.value for e in mux.Scalars(run, "train/loss")] == pytest.approx(losses)
        assert record["tracking"]["tensorboard"] is True


def test_snakemake_report_shows_learning_curves_and_heatmaps(demo_run, tmp_path):
    work, res = demo_run
    out = tmp_path / "snakemake-report.html"
    proc = snakemake(work, "--report", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    html = out.read_text()
    assert "Learning curves" in html and "curves_wsi_demo.png" in html and "curves_hsi_demo.png" in html
    assert html.count("curves.csv") >= 8 and "Confusion matrices" in html and "Classification maps" in html
    assert "report.html" in html  # the medflow report itself is still there
    assert "Heatmaps" in html and "heatmap_" in html and "Grad-CAM" in html and "Slide QC" in html


def test_rerun_after_success_does_nothing(demo_run):
    work, _ = demo_run
    proc = snakemake(work, "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _tree(root: Path) -> dict[str, str]:
    """Path → sha256 of every file under ``root`` except Snakemake's own state directory."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".snakemake" not in p.relative_to(root).parts
    }


def test_dry_run_writes_nothing(demo_run, tmp_path):
    work, _ = demo_run
    before = _tree(work)
    proc = snakemake(work, "-n", "--forceall")  # every job planned, none run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rule train" in proc.stdout + proc.stderr and _tree(work) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc = snakemake(fresh, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tree(fresh) == {}  # not even the effective config file


def test_wsi_study_has_heatmaps_regions_slide_metrics_and_grad_cam(demo_run):
    _, res = demo_run
    plan = read_json(res / "folds" / "wsi_demo.json")
    index = read_json(res / "index" / "wsi_demo.json")
    summary = read_json(res / "summary.json")["wsi_results"]["wsi_demo"]
    assert len(summary["folds"]) == len(plan["outer"])
    for outer in plan["outer"]:
        fold_dir = res / "runs" / "wsi_demo" / f"outer{outer['index']}"
        test_slides = sorted(s["image_id"] for s in index["shards"] if s["patient_id"] in outer["test_patients"])
        # one predict-wsi job per test slide of the fold, each with all of its outputs
        assert sorted(p.name[: -len(".record.json")] for p in (fold_dir / "wsi").glob("*.record.json")) == test_slides
        for image_id in test_slides:
            for suffix in (".npz", ".png", ".geojson"):
                assert (fold_dir / "wsi" / f"{image_id}{suffix}").stat().st_size > 0
            assert (fold_dir / "wsi" / f"{image_id}.csv").is_file()  # empty when nothing reaches detection_min
            geo = read_json(fold_dir / "wsi" / f"{image_id}.geojson")
            assert geo["type"] == "FeatureCollection"
            assert all(f["geometry"]["type"] == "Polygon" for f in geo["features"])
        metrics = read_json(fold_dir / "wsi" / "record.json")
        assert metrics["job"] == "slide-metrics" and metrics["slide"]["n"] == len(test_slides)
        # every patient of the demo has a tumour slide and a normal one: the fold's slide AUC is defined
        assert metrics["slide"]["auc"] is not None and metrics["froc"] is not None
        assert (fold_dir / "gradcam" / "gradcam.png").stat().st_size > 0
    md = (res / "report" / "report.md").read_text()
    html = (res / "report" / "report.html").read_text()
    assert "Whole-slide results" in md and 'id="heatmaps"' in html and 'id="gradcam"' in html
    slides_csv = (res / "report" / "slides.csv").read_text().splitlines()
    assert len(slides_csv) == 1 + len(plan["outer"])

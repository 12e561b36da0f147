"""End to end: the real Snakemake DAG on a small synthetic cohort (real OpenSlide, HDF5, MPI, training)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import ROOT, VENV_BIN, default_config_with

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

SMALL = {
    "seed": 11,
    "site": {"name": "laptop"},
    "synth": {"wsi": {"patients": 4, "max_slides_per_patient": 2, "width": 2048, "height": 1536},
              "hsi": {"patients": 4, "mosaic_height": 200, "mosaic_width": 250}},
    "wsi": {"sampling": {"mode": "random", "per_class": 12}},
    "hsi": {"per_class": 40},
    "folds": {"outer": 2, "inner": 2},
    "studies": {"wsi_demo": {"train": {"epochs": 2}}, "hsi_demo": {"train": {"epochs": 6}}},
}


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "test.yaml"), "--cores", "2", *args]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("wf")
    (work / "test.yaml").write_text(yaml.safe_dump(default_config_with(SMALL)))
    t0 = time.perf_counter()
    proc = snakemake(work)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    print(f"workflow wall time: {elapsed:.0f} s")
    return work, work / "results" / "laptop"


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
                    assert max(counts.values()) <= 12                   # n per class per slide
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
        assert len(tested) == len(set(tested)) == 4                   # every patient tested exactly once


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
    assert np.mean(hsi_oacc) > 1 / 5 + 0.1                              # well above chance on five classes


def test_report_lists_the_site_with_measured_numbers(demo_run):
    _, res = demo_run
    md = (res / "report" / "report.md").read_text()
    html = (res / "report" / "report.html").read_text()
    assert "laptop" in md and "laptop" in html
    summary = read_json(res / "summary.json")
    assert json.dumps(summary)  # machine-readable
    maps = list((res / "runs" / "hsi_demo").glob("outer*/maps/*.png"))
    assert maps


def test_rerun_after_success_does_nothing(demo_run):
    work, _ = demo_run
    proc = snakemake(work, "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr

"""Three classes from annotations carried through the real commands: extract-wsi → index → plan-folds →
train → select → summarize → report (class lists in shards, index, model; C×C metrics and tables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_classes import CLASSES, GROUPS, write_classes_slide
from test_wsi_extraction import _cohort_cfg

from conftest import ROOT, write_config
from medflow import cli
from medflow.train import models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Path]]:
    """One slide per patient: the same regions, its own texture (one image for two patients is refused)."""
    return [write_classes_slide(tmp_path_factory.mktemp(f"classes{i}"), seed=11 + i) for i in range(4)]


def _medflow(*argv: str) -> None:
    assert cli.main(list(argv)) == 0, argv


def test_three_classes_from_extraction_to_the_report(slides, default_cfg, tmp_path) -> None:
    rows = [{"image_id": f"s{i}", "patient_id": f"P{i}", "image": slide["slide"], "annotation": slide["xml"]}
            for i, slide in enumerate(slides)]  # fmt: skip
    labels = {"classes": CLASSES, "groups": GROUPS, "background": "normal"}
    cfg = _cohort_cfg(default_cfg, tmp_path, rows, mpp=1.0, patch_size=32, labels=labels, sampling={"per_class": 12})
    cfg["studies"] = {
        "c3": {
            "cohort": "c",
            "positive_class": "tumour",
            "model": {"name": "conv2dnet", "head_layers": [16]},
            "train": {"epochs": 2, "batch_size": 16, "lr": 0.003, "optimizer": "adam"},
        }
    }
    cfg["folds"] = {"strategy": "kfold", "outer": 2, "inner": 2, "balance": "stratified"}
    cfg["launch"] = {"backend": "ddp", "ranks": 1, "threads_per_rank": 1}
    site = tmp_path / "results" / "testsite"
    cfg_path = write_config(cfg, tmp_path / "config.yaml")
    c = str(cfg_path)
    shards = site / "shards" / "c"
    for row in rows:
        i = row["image_id"]
        _medflow("extract-wsi", "--config", c, "--cohort", "c", "--image-id", i,
                 "--out", str(shards / f"{i}.h5"), "--record", str(shards / f"{i}.record.json"))  # fmt: skip
    index, folds = site / "index" / "c.json", site / "folds" / "c3.json"
    _medflow(
        "index", "--config", c, "--cohort", "c", "--out", str(index), *map(str, sorted(shards.glob("*.record.json")))
    )
    doc = json.loads(index.read_text())
    assert doc["class_names"] == CLASSES and all(doc["totals"][k] == 4 * 12 for k in CLASSES)
    _medflow("plan-folds", "--config", c, "--study", "c3", "--index", str(index), "--out", str(folds))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for outer in (0, 1):
        run_dir = site / "runs" / "c3" / f"outer{outer}"
        proc = subprocess.run(
            [sys.executable, "-m", "medflow.cli", "train", "--config", c, "--study", "c3", "--index", str(index),
             "--folds", str(folds), "--outer", str(outer), "--inner", "0", "--out-dir", str(run_dir / "inner0")],
            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        _medflow("select", "--config", c, "--study", "c3", "--index", str(index), "--folds", str(folds),
                 "--outer", str(outer), "--inner-dirs", str(run_dir / "inner0"), "--out-dir", str(run_dir))  # fmt: skip
        net, meta = models.load_model(run_dir / "model.pt")
        assert meta["class_names"] == CLASSES and meta["n_classes"] == 3
        assert net(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 3)
        test = json.loads((run_dir / "record.json").read_text())["metrics"]["test"]
        pred = np.load(run_dir / "predictions.npz")
        assert pred["y_prob"].shape[1] == 3 and np.asarray(test["confusion"]).shape == (3, 3)
        assert set(test["per_class_recall"]) == set(CLASSES) and test["n"] == len(pred["y_true"])
    _medflow("summarize", "--config", c, "--site-dir", str(site), "--out", str(site / "summary.json"))
    out = tmp_path / "report"
    _medflow("report", "--config", c, "--out-dir", str(out), str(site))
    md = (out / "report.md").read_text()
    per_class = md.split("## Per-class test recall (mean ± std over outer folds)", 1)[1].split("## ", 1)[0]
    assert all(f"| c3 | {name} |" in per_class for name in CLASSES)
    assert "macro one-vs-rest" in md and (out / "figures" / "confusion_c3.png").is_file()
    qc_rows = [r for r in (out / "slide_qc.csv").read_text().splitlines()[1:] if r]
    assert len(qc_rows) == 4 and len(list((out / "figures" / "qc").glob("*.png"))) == 4

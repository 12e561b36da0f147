"""Slide-level results in the summary and the report: recomputed here from fake slide-metrics records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medflow.core import config as config_mod
from medflow.predict.slide_metrics import fold_results
from medflow.report import build, summary, wsi_results

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def _slide_record(rng: np.random.Generator, outer: int, i: int, label: int) -> dict:
    score = float(np.clip(rng.normal(0.35 + 0.3 * label, 0.2), 0, 1))
    return {
        "job": "predict-wsi",
        "status": "ok",
        "study": "wsi_s",
        "outer": outer,
        "image_id": f"o{outer}_s{i}",
        "patient_id": f"p{outer}{i}",
        "slide": {"score": score, "label": label, "label_source": "annotation", "threshold": 0.5},
        "lesions": {"tp_probs": [score] * label, "fp_probs": rng.random(3).tolist(), "n_lesions": label},
        "tiles": {"predicted": 10},
        "outputs": {"png": f"o{outer}_s{i}.png"},
        "throughput": {"tiles_per_s": 20.0 + i},
        "wall_s": 3.0,
    }


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, list[list[dict]]]:
    rng = np.random.default_rng(4)
    site_dir = tmp_path / "results" / "s1"
    folds = []
    for outer in range(3):
        slides = [_slide_record(rng, outer, i, i % 2) for i in range(6)]
        folds.append(slides)
        d = site_dir / "runs" / "wsi_s" / f"outer{outer}" / "wsi"
        d.mkdir(parents=True)
        for rec in slides:
            (d / f"{rec['image_id']}.record.json").write_text(json.dumps(rec))
            (d / f"{rec['image_id']}.png").write_bytes(PNG)
        metrics = {"job": "slide-metrics", "status": "ok", "study": "wsi_s", "outer": outer, "wall_s": 1.0}
        metrics.update(fold_results(slides, 0.5))
        (d / "record.json").write_text(json.dumps(metrics))
        g = site_dir / "runs" / "wsi_s" / f"outer{outer}" / "gradcam"
        g.mkdir(parents=True)
        (g / "gradcam.png").write_bytes(PNG)
        (g / "record.json").write_text(json.dumps({"job": "grad-cam", "status": "ok", "figure": "gradcam.png"}))
    return site_dir, folds


def test_summary_aggregates_and_pools_slide_metrics(site, default_cfg: dict) -> None:
    site_dir, folds = site
    res = summary.summarize(site_dir, default_cfg)["wsi_results"]["wsi_s"]
    per_fold = [roc_auc_score([r["slide"]["label"] for r in f], [r["slide"]["score"] for r in f]) for f in folds]
    assert [f["slide"]["auc"] for f in res["folds"]] == pytest.approx(per_fold)
    assert res["aggregate"]["auc"]["mean"] == pytest.approx(np.mean(per_fold))
    assert res["aggregate"]["auc"]["std"] == pytest.approx(np.std(per_fold, ddof=1))
    every = [r for f in folds for r in f]
    pooled = roc_auc_score([r["slide"]["label"] for r in every], [r["slide"]["score"] for r in every])
    assert res["pooled"]["slide"]["auc"] == pytest.approx(pooled) and res["pooled"]["slide"]["n"] == 18
    assert res["pooled"]["froc"]["lesions"] == 9
    assert len(res["heatmaps"]) == 18 and len(res["gradcam"]) == 3


def test_report_shows_slide_table_heatmaps_and_grad_cam(site, default_cfg: dict, tmp_path: Path) -> None:
    site_dir, folds = site
    cfg = config_mod.validate(default_cfg)
    doc = build.build_report([summary.summarize(site_dir, cfg)], cfg, tmp_path / "report")
    rows = doc["tables"]["slides"]["rows"]
    assert len(rows) == 3 and [r[2] for r in rows] == [0, 1, 2]
    assert len(doc["tables"]["slide_scores"]["rows"]) == 18
    html = (tmp_path / "report" / "report.html").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    assert 'id="heatmaps"' in html and 'id="gradcam"' in html and "Whole-slide results" in md
    assert html.count('class="maps"') == 2
    table = wsi_results.display_table([summary.summarize(site_dir, cfg)], ["s1"])
    assert table is not None and [r[1] for r in table.rows] == ["0", "1", "2", "mean ± std", "pooled"]

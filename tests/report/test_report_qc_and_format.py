"""Report: slide QC (flags, table, gallery), per-class recall, cores per job, number formats, error bars."""

from __future__ import annotations

import base64
import io
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import _csv, _md_table, _records, build_site

from conftest import write_config
from medflow import cli
from medflow.core.records import JobRecord
from medflow.report import slide_qc
from medflow.report.plots import clipped_errors
from medflow.report.tables import fmt_metric_ms, fmt_ms


@pytest.fixture(scope="module")
def report(tmp_path_factory, module_cfg: dict) -> dict:
    root = tmp_path_factory.mktemp("qcsites")
    a = build_site(root / "results", "alpha", seed=1, gpus=["NVIDIA A100"])
    b = build_site(root / "results", "beta", seed=2)
    cfg = json.loads(json.dumps(module_cfg))
    cfg["report"]["qc"] = {"max_slides": 3, "thumb_px": 120}
    cfg_path = write_config(cfg, root / "config.yaml")
    out = root / "report"
    assert cli.main(["report", "--config", str(cfg_path), "--out-dir", str(out), str(a), str(b)]) == 0
    return {"out": out, "sites": (a, b), "cfg": cfg}


@pytest.fixture(scope="module")
def module_cfg() -> dict:
    from conftest import ROOT
    from medflow.core import config as config_mod

    return config_mod.load(ROOT / "config.yaml")


# ---- slide QC ------------------------------------------------------------------------------------------
def test_flags_follow_the_configured_thresholds() -> None:
    th = {"min_tissue_fraction": 0.05, "min_tissue_mm2": 0.0, "max_rejected_fraction": 0.25}
    ok = {"status": "ok", "tissue_fraction": 0.3, "tissue_mm2": 5.0, "rejected_fraction": 0.1}
    assert slide_qc.flags(ok, th) == []
    assert slide_qc.flags({**ok, "tissue_fraction": 0.04}, th) == ["little tissue"]
    assert slide_qc.flags({**ok, "rejected_fraction": 0.26}, th) == ["many rejected"]
    assert slide_qc.flags({**ok, "tissue_mm2": 0.5}, {**th, "min_tissue_mm2": 1.0}) == ["little tissue"]
    assert slide_qc.flags({**ok, "tissue_fraction": 0.04}, {**th, "min_tissue_fraction": 0.01}) == []
    assert slide_qc.flags({"status": "failed"}, th) == ["failed"]
    # records without the QC fields (older runs) are not flagged for what they do not say
    assert slide_qc.flags({"status": "ok"}, th) == []


def test_slide_qc_csv_has_one_row_per_slide_with_the_record_numbers(report) -> None:
    rows = _csv(report["out"] / "slide_qc.csv")
    for site_dir in report["sites"]:
        recs = _records(site_dir, "shards/wsi_demo/*.record.json")
        mine = [r for r in rows if r["site"] == site_dir.name]
        assert [r["image_id"] for r in mine] == [r["image_id"] for r in recs]
        for row, rec in zip(mine, recs):
            if rec["status"] != "ok":
                assert row["flags"] == "failed" and row["png"] == ""
                continue
            assert float(row["rejected_fraction"]) == pytest.approx(rec["quality_rejected"] / rec["patches_read"])
            assert float(row["tissue_fraction"]) == rec["wsi"]["tissue_fraction"]
            assert row["png"] == f"shards/wsi_demo/{rec['image_id']}.qc.png"
        assert [r["flags"] for r in mine] == ["little tissue", "many rejected", "failed"]


def test_flagged_slides_table(report) -> None:
    table = _md_table((report["out"] / "report.md").read_text(), "Slide QC: flagged slides")
    assert table[0][:3] == ["site", "cohort", "slide"]
    flagged = {(r[0], r[2]): r[-1] for r in table[1:]}
    assert flagged[("alpha", "wsi_demo_img0")] == "little tissue"
    assert flagged[("beta", "wsi_demo_img1")] == "many rejected"
    assert flagged[("alpha", "wsi_demo_img2")] == "failed: slide.svs: corrupt"
    assert len(flagged) == 6
    row = next(r for r in table[1:] if r[:3] == ["alpha", "wsi_demo", "wsi_demo_img0"])
    assert row[3] == "2.0 % (0.10 mm²)"
    assert "6 of 6 slides flagged" in (report["out"] / "report.md").read_text()  # the failed ones too


def test_gallery_embeds_small_thumbnails_flagged_first_and_links_full_size(report) -> None:
    html_text = (report["out"] / "report.html").read_text()
    gallery = html_text.split('id="slide-qc-images"', 1)[1].split("<h2", 1)[0]
    links = re.findall(
        r'<a href="(figures/qc/[^"]+)"><img alt="QC ([^"]+)" src="data:image/jpeg;base64,([^"]+)"', gallery
    )
    assert len(links) == 3  # report.qc.max_slides
    for href, _title, data in links:
        full = report["out"] / href
        assert full.is_file()
        with Image.open(full) as big, Image.open(io.BytesIO(base64.b64decode(data))) as small:
            assert small.format == "JPEG" and small.width == 120 and big.width == 400
            assert abs(small.height / small.width - big.height / big.width) < 0.02
    # 4 slides have QC images (2 ok slides × 2 sites), all flagged: the 4th is listed as a link
    more = re.findall(r'1 more \(report.qc.max_slides\): <a href="(figures/qc/[^"]+)"', gallery)
    assert len(more) == 1 and (report["out"] / more[0]).is_file()
    assert gallery.count('class="flagged"') == 3
    doc = json.loads((report["out"] / "report.json").read_text())
    qc = [f for f in doc["figures"] if f.get("kind") == "qc"]
    assert len(qc) == 4 and all("thumb_uri" not in f and f["flags"] for f in qc)


# ---- per-class recall, cores, formats ------------------------------------------------------------------
def test_per_class_table_handles_five_classes(report) -> None:
    table = _md_table((report["out"] / "report.md").read_text(), "Per-class test recall (mean ± std over outer folds)")
    assert table[0] == ["study", "class", "alpha", "beta"]
    sels = _records(report["sites"][1], "runs/hsi_demo/outer*/record.json")
    for name in ("healthy", "tumour", "venous", "arterial", "dura"):
        row = next(r for r in table[1:] if r[:2] == ["hsi_demo", name])
        recalls = [s["metrics"]["test"]["per_class_recall"][name] for s in sels]
        patches = sum(s["metrics"]["test"]["support"][name] for s in sels)
        mean, rest = row[3].split(" ± ")
        assert abs(float(mean) - statistics.mean(recalls)) <= 5e-4
        assert abs(float(rest.split()[0]) - statistics.stdev(recalls)) <= 5e-4 and f"({patches} patches)" in rest
    assert any(r[:2] == ["wsi_demo", "macro F1"] for r in table[1:])


def test_cores_row_shows_the_jobs_cores_and_the_nodes(report) -> None:
    table = _md_table((report["out"] / "report.md").read_text(), "Sites")
    row = next(r for r in table[1:] if r[0] == "CPU cores per training job (node)")
    ranks, threads = 2, report["cfg"]["launch"]["threads_per_rank"]
    assert row[1:] == [f"{ranks * threads} (node 8)"] * 2  # fake records: 2 ranks on 8-core nodes


@pytest.mark.parametrize(
    "stat, kwargs, text",
    [
        ({"mean": 0.99972, "std": 0.000504, "n": 3}, {"decimals": 3}, "1.000 ± 0.001"),
        ({"mean": 0.8, "std": 0.0, "n": 3}, {"decimals": 3}, "0.800 ± 0.000"),
        ({"mean": 12.345, "std": 4.567, "n": 2}, {}, "12.3 ± 4.6"),
        ({"mean": 0.0016, "std": 4.91e-05, "n": 4}, {}, "0.00160 ± 0.00005"),
        ({"mean": 1234.5, "std": 56.0, "n": 4}, {}, "1234 ± 56"),
        ({"mean": 3.0, "std": 0.0, "n": 1}, {}, "3.00"),
        ({"mean": None, "std": None, "n": 0}, {}, "–"),
    ],
)
def test_mean_std_share_their_decimals(stat, kwargs, text) -> None:
    assert fmt_ms(stat, **kwargs) == text


def test_every_mean_std_cell_has_equal_decimals(report) -> None:
    md = (report["out"] / "report.md").read_text()
    cells = re.findall(r"(-?\d+(?:\.(\d+))?) ± (-?\d+(?:\.(\d+))?)", md)
    assert len(cells) > 20
    for _m, mean_dec, _s, std_dec in cells:
        assert len(mean_dec) == len(std_dec)
    assert fmt_metric_ms({"mean": 1.0, "std": 0.000504, "n": 3}) == "1.000 ± 0.001"


def test_error_bars_are_cut_at_the_metric_bounds_not_the_data() -> None:
    means, stds = np.array([0.985, 0.5, 0.01, np.nan]), np.array([0.024, 0.1, 0.05, np.nan])
    lower, upper = clipped_errors(means, stds, (0.0, 1.0))
    np.testing.assert_allclose(upper, [0.015, 0.1, 0.05, 0.0])
    np.testing.assert_allclose(lower, [0.024, 0.1, 0.01, 0.0])
    assert np.all(means[:3] + upper[:3] <= 1.0) and np.all(means[:3] - lower[:3] >= 0.0)
    np.testing.assert_allclose(clipped_errors(means, stds, None), [np.nan_to_num(stds)] * 2)


# ---- stage timings ----------------------------------------------------------------------------------
def test_job_record_stages_and_other_add_up_to_the_wall_time() -> None:
    import time

    t0 = time.perf_counter()
    time.sleep(0.02)  # before the record exists: the wall time counts it (clock_start)
    rec = JobRecord("x", None, clock_start=t0)
    rec["timings_s"]["load_args"] = time.perf_counter() - t0
    with rec.timed("a"):
        time.sleep(0.01)
    time.sleep(0.015)  # in no stage: "other"
    rec["timings_s"]["epochs"] = [1.0, 2.0]  # a breakdown, not a stage
    rec.finish("ok")
    stages = {k: v for k, v in rec["timings_s"].items() if k != "epochs"}
    assert sum(stages.values()) == pytest.approx(rec["wall_s"], abs=1e-9)
    assert rec["wall_s"] >= 0.045 and rec["timings_s"]["other"] >= 0.014
    rec.finish("ok")  # finishing again recomputes "other", never counts it as a stage
    assert sum(v for k, v in rec["timings_s"].items() if k != "epochs") == pytest.approx(rec["wall_s"], abs=1e-9)


def test_stage_table_rows_add_up_to_the_job_wall(tmp_path: Path, module_cfg: dict) -> None:
    from medflow.report import summary as summary_mod

    site = tmp_path / "s"
    for i, stages in enumerate(({"a": 1.0, "b": 2.0, "other": 0.5}, {"a": 2.0, "other": 1.0})):
        rec = {"job": "select", "status": "ok", "study": "x", "outer": i, "wall_s": sum(stages.values())}
        rec["timings_s"] = stages
        path = site / "runs" / "x" / f"outer{i}" / "record.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(rec))
    st = summary_mod.summarize(site, module_cfg)["stages"]["select"]
    assert list(st["timings_s"]) == ["a", "b", "other"]
    assert st["timings_s"]["b"]["mean"] == 1.0 and st["timings_s"]["b"]["n"] == 2  # job 2 ran no "b": 0 s
    assert sum(v["mean"] for v in st["timings_s"].values()) == pytest.approx(st["wall_s"]["mean"])

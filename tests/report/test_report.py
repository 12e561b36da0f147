"""summarize + report: numbers in the tables are recomputed here from the JSON records of two fake sites."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from conftest import write_config
from medflow import cli
from medflow.report import summary as summary_mod

WSI_CLASSES = ["normal", "tumour"]
HSI_CLASSES = ["healthy", "tumour", "venous", "arterial", "dura"]


# ---- a fake site tree following docs/architecture.md ---------------------------------------------
def _common(rng: np.random.Generator, site: str, host: str, job: str, gpus: list[str], wall: float) -> dict:
    return {
        "job": job,
        "status": "ok",
        "site": {
            "name": site,
            "cluster": f"{site}-cluster",
            "host": host,
            "cpu": "Fake CPU 9000",
            "cpu_count": 8,
            "gpus": gpus,
            "gpu_count": len(gpus),
        },
        "software": {"medflow": "0.1.0", "torch": "2.5.0", "horovod": "0.28.1", "mpi": "Open MPI 4.1", "git": "abc"},
        "launch": {
            "backend": "horovod",
            "ranks": 2,
            "launcher": "srun",
            "slurm_job_id": str(rng.integers(1e5)),
            "devices": [f"cuda:{i}" for i in range(len(gpus))] or ["cpu", "cpu"],
        },
        "seed": 7,
        "config_hash": "h",
        "started": "2026-11-21T10:00:00+00:00",
        "finished": f"2026-11-21T10:{int(rng.integers(1, 59)):02d}:00+00:00",
        "wall_s": wall,
    }


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _confusion(rng: np.random.Generator, k: int) -> list[list[int]]:
    return rng.integers(0, 20, size=(k, k)).tolist()


def build_site(root: Path, site: str, seed: int, gpus: list[str] = ()) -> Path:
    """A results/<site> tree: 3 WSI slides (one failed), 2 HSI images, a WSI and an HSI study with
    2 outer × 2 inner folds, curves, select records and one HSI classification map."""
    rng = np.random.default_rng(seed)
    site_dir = root / site
    gpus = list(gpus)
    for cohort, job, stages, n_img in (
        ("wsi_demo", "extract-wsi", ["open", "mask", "annotations", "sampling", "read", "write"], 3),
        ("hsi_demo", "extract-hsi", ["load", "calibrate", "demosaic", "correct", "normalise", "patches", "write"], 2),
    ):
        for i in range(n_img):
            rec = _common(rng, site, f"{site}-n{i % 2}", job, [], float(rng.uniform(2, 9)))
            n = int(rng.integers(40, 90))
            rec.update(
                image_id=f"{cohort}_img{i}",
                patient_id=f"p{i}",
                cohort=cohort,
                shard=f"{cohort}_img{i}.h5",
                error=None,
                n_patches=n,
                counts={"normal": n // 2, "tumour": n - n // 2},
                timings_s={s: float(rng.uniform(0.05, 1.0)) for s in stages},
                throughput={"s_per_patch": rec["wall_s"] / n, "bytes_written": n * 1000},
            )
            if cohort == "wsi_demo":  # slide QC: img0 has little tissue, img1 many rejected patches
                read = n + [0, int(0.7 * n), 3][i]
                rec.update(
                    wsi={"tissue_fraction": [0.02, 0.4, 0.5][i], "tissue_mm2": [0.1, 12.0, 15.0][i]},
                    patches_read=read,
                    quality_rejected=read - n,
                    qc={"png": f"{cohort}_img{i}.qc.png"},
                )
                _write_png(site_dir / "shards" / cohort / f"{cohort}_img{i}.qc.png", rng, (300, 400))
            if cohort == "wsi_demo" and i == 2:
                rec.update(status="failed", shard=None, error="slide.svs: corrupt", n_patches=0, counts={}, qc=None)
            _write(site_dir / "shards" / cohort / f"{cohort}_img{i}.record.json", rec)
    for cohort, kind, classes in (("wsi_demo", "wsi", WSI_CLASSES), ("hsi_demo", "hsi", HSI_CLASSES)):
        _write(
            site_dir / "index" / f"{cohort}.json",
            {
                "format": "medflow-index/1",
                "cohort": cohort,
                "kind": kind,
                "class_names": classes,
                "patients": [f"p{i}" for i in range(4)],
                "shards": [{"image_id": f"i{i}"} for i in range(3)],
                "failed": [{"image_id": "bad"}],
                "totals": {c: 10 * (i + 1) for i, c in enumerate(classes)},
            },
        )
        _write(
            site_dir / "folds" / f"{cohort}.json",
            {
                "format": "medflow-folds/1",
                "study": cohort,
                "strategy": "kfold",
                "balance": "stratified",
                "k_outer": 2,
                "k_inner": 2,
                "patients": [f"p{i}" for i in range(4)],
                "outer": [{"index": 0, "test_patients": ["p0"]}, {"index": 1, "test_patients": ["p1", "p2", "p3"]}],
                "deviation": {"max_abs_outer": {"patches": 0.05, "patients": 0.25, "labels": 0.1}},
            },
        )
    for study, cohort, kind, model, classes in (
        ("wsi_demo", "wsi_demo", "wsi", "resnet18", WSI_CLASSES),
        ("hsi_demo", "hsi_demo", "hsi", "conv2dnet", HSI_CLASSES),
    ):
        for outer in range(2):
            for inner in range(2):
                epochs = [float(x) for x in rng.uniform(1, 3, size=3)]
                rec = _common(rng, site, f"{site}-g0", "train", gpus, float(sum(epochs) + rng.uniform(1, 4)))
                rec.update(
                    study=study,
                    cohort=cohort,
                    kind=kind,
                    model=model,
                    outer=outer,
                    inner=inner,
                    timings_s={
                        "load_args": 0.1,
                        "prepare_train": 0.5,
                        "train": sum(epochs),
                        "epochs": epochs,
                        "prepare_test": 0.2,
                        "predict": 0.3,
                    },
                    throughput={
                        "load_ms_per_patch": float(rng.uniform(0.01, 0.2)),
                        "train_img_per_s": float(rng.uniform(50, 500)),
                        "s_per_epoch": float(np.mean(epochs)),
                    },
                    metrics={
                        "train": {"oacc": float(rng.uniform(0.6, 1)), "loss": 0.3},
                        "val": {"n": 50, "oacc": float(rng.uniform(0.5, 1)), "loss": 0.5},
                    },
                    n_patches={"train": 100, "val": 50},
                    epochs_run=3,
                    best_epoch=2,
                )
                run_dir = site_dir / "runs" / study / f"outer{outer}" / f"inner{inner}"
                _write(run_dir / "record.json", rec)
                lines = ["epoch,train_loss,train_acc,val_loss,val_acc,lr,epoch_s"]
                lines += [
                    f"{e},{1 / (e + 1):.4f},{0.5 + 0.1 * e:.3f},{1.2 / (e + 1):.4f},{0.5 + 0.08 * e:.3f},0.001,{epochs[e]:.3f}"
                    for e in range(3)
                ]
                (run_dir / "curves.csv").write_text("\n".join(lines) + "\n")
            sel = _common(rng, site, f"{site}-g0", "select", gpus[:1], float(rng.uniform(1, 3)))
            sel.update(
                study=study,
                outer=outer,
                selected_inner=int(rng.integers(0, 2)),
                selection_metric="oacc",
                candidates=[{"inner": 0, "value": 0.8}, {"inner": 1, "value": 0.7}],
                metrics={
                    "val": {"n": 50, "oacc": 0.8},
                    "test": {
                        "n": 60,
                        "oacc": float(rng.uniform(0.5, 1)),
                        "sensitivity": float(rng.uniform(0.4, 1)),
                        "specificity": float(rng.uniform(0.4, 1)),
                        "auc": float(rng.uniform(0.5, 1)),
                        "macro_f1": 0.7,
                        "confusion": _confusion(rng, len(classes)),
                        "class_names": classes,
                        "positive_class": "tumour",
                        "per_class_recall": {c: float(rng.uniform(0.3, 1)) for c in classes},
                        "support": {c: int(rng.integers(5, 30)) for c in classes},
                    },
                },
            )
            _write(site_dir / "runs" / study / f"outer{outer}" / "record.json", sel)
            if kind == "hsi":
                maps = _common(rng, site, f"{site}-g0", "predict-hsi", gpus[:1], 1.5)
                maps.update(
                    study=study,
                    outer=outer,
                    timings_s={"load": 0.1, "chain": 0.2, "predict": 0.7},
                    images={f"hsi_demo_img{outer}": {"accuracy": 0.75}},
                )
                maps_dir = site_dir / "runs" / study / f"outer{outer}" / "maps"
                _write(maps_dir / "record.json", maps)
                _write_png(maps_dir / f"hsi_demo_img{outer}.png", rng)
    _write(
        site_dir / "bench" / f"{site}-g0.json",
        {
            "format": "medflow-bench/1",
            "site": {"name": site, "host": f"{site}-g0"},
            "finished": "x",
            "metrics": {"hsi.images_per_s": 10.0 + seed, "hdf5.ms_per_patch": 0.02 * seed},
        },
    )
    return site_dir


def _write_png(path: Path, rng: np.random.Generator, size: tuple[int, int] = (20, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(path)


def _records(site_dir: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(site_dir.glob(pattern))]


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _md_table(md: str, title: str) -> list[list[str]]:
    """The rows (header first) of the Markdown table under '## <title>'."""
    section = md.split(f"## {title}\n", 1)[1]
    lines = [ln for ln in section.lstrip("\n").split("\n\n", 1)[0].splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
    return [rows[0], *rows[2:]]


def _close(text: str, value: float, rel: float = 1e-3) -> bool:
    return math.isclose(float(text), value, rel_tol=rel, abs_tol=1e-12)


@pytest.fixture(scope="module")
def module_cfg(tmp_path_factory) -> dict:
    from conftest import ROOT
    from medflow.core import config as config_mod

    return config_mod.load(ROOT / "config.yaml")


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory, module_cfg: dict) -> tuple[Path, Path, Path]:
    """Two site trees built once per module (the report tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("sites")
    a = build_site(tmp_path / "results", "alpha", seed=1, gpus=["NVIDIA A100", "NVIDIA A100"])
    b = build_site(tmp_path / "results", "beta", seed=2)
    cfg_path = write_config(module_cfg, tmp_path / "config.yaml")
    return a, b, cfg_path


# ---- summarize -------------------------------------------------------------------------------------
def test_summarize_matches_records(two_sites, tmp_path):
    site_a, _, cfg_path = two_sites
    out = tmp_path / "summary.json"
    assert cli.main(["summarize", "--config", str(cfg_path), "--site-dir", str(site_a), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["format"] == "medflow-summary/1"
    assert s["site"]["name"] == "alpha" and s["site"]["gpu_count"] == 2
    assert s["site"]["hosts"] == ["alpha-g0", "alpha-n0", "alpha-n1"]

    wsi = _records(site_a, "shards/wsi_demo/*.record.json")
    ok = [r for r in wsi if r["status"] == "ok"]
    pre = s["preprocessing"]["wsi_demo"]
    assert (pre["images"], pre["failed"], pre["patches"]) == (3, 1, sum(r["n_patches"] for r in ok))
    assert pre["s_per_patch"] == pytest.approx(sum(r["wall_s"] for r in ok) / sum(r["n_patches"] for r in ok))
    assert pre["failed_images"][0]["error"] == "slide.svs: corrupt"

    trains = _records(site_a, "runs/wsi_demo/outer*/inner*/record.json")
    st = s["studies"]["wsi_demo"]
    assert st["val_oacc"]["mean"] == pytest.approx(statistics.mean(r["metrics"]["val"]["oacc"] for r in trains))
    assert st["val_oacc"]["std"] == pytest.approx(statistics.stdev(r["metrics"]["val"]["oacc"] for r in trains))
    sels = _records(site_a, "runs/wsi_demo/outer*/record.json")
    assert st["test_oacc"]["mean"] == pytest.approx(statistics.mean(r["metrics"]["test"]["oacc"] for r in sels))
    assert st["time_n_epochs_s"] == pytest.approx(10 * statistics.mean(r["throughput"]["s_per_epoch"] for r in trains))
    # GPU site: train jobs on 2 GPUs, select on 1
    gpu_h = (2 * sum(r["wall_s"] for r in trains) + sum(r["wall_s"] for r in sels)) / 3600
    assert st["gpu_hours"] == pytest.approx(gpu_h) and st["cpu_core_hours"] == 0
    assert len(st["curves"]) == 4 and st["curves"][0]["val_acc"] == [0.5, 0.58, 0.66]
    assert [m["image_id"] for m in s["studies"]["hsi_demo"]["maps"]] == ["hsi_demo_img0", "hsi_demo_img1"]
    assert s["studies"]["hsi_demo"]["maps"][0]["accuracy"] == 0.75


def test_energy_formula(two_sites, default_cfg):
    _, site_b, _ = two_sites
    cfg = dict(
        default_cfg,
        site={"name": "", "power_w": {"cpu_core": 10.0, "gpu": 250.0}, "pue": 1.5, "carbon_g_per_kwh": 400.0},
    )
    s = summary_mod.summarize(site_b, cfg)
    trains = _records(site_b, "runs/*/outer*/inner*/record.json")
    others = [
        r
        for pat in ("shards/*/*.record.json", "runs/*/outer*/record.json", "runs/*/outer*/maps/record.json")
        for r in _records(site_b, pat)
    ]
    # CPU site: train = ranks (2) × threads_per_rank (1) cores; every other job one core
    core_h = (sum(2 * r["wall_s"] for r in trains) + sum(r["wall_s"] for r in others)) / 3600
    total = s["energy"]["total"]
    assert total["gpu_hours"] == 0 and total["cpu_core_hours"] == pytest.approx(core_h)
    assert total["kwh"] == pytest.approx(core_h * 10.0 * 1.5 / 1000)
    assert total["co2_g"] == pytest.approx(total["kwh"] * 400.0)


def test_summarize_rejects_empty_and_corrupt(tmp_path, default_cfg):
    cfg_path = write_config(default_cfg, tmp_path / "config.yaml")
    empty = tmp_path / "results" / "empty"
    empty.mkdir(parents=True)
    out = empty / "summary.json"
    assert cli.main(["summarize", "--config", str(cfg_path), "--site-dir", str(empty), "--out", str(out)]) == 2
    bad = empty / "shards" / "c" / "x.record.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    assert cli.main(["summarize", "--config", str(cfg_path), "--site-dir", str(empty), "--out", str(out)]) == 2
    assert not out.exists() and not list(empty.glob(".*tmp*"))


# ---- report ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report_dir(two_sites, tmp_path_factory) -> Path:
    site_a, site_b, cfg_path = two_sites
    out = tmp_path_factory.mktemp("report") / "report"
    assert cli.main(["report", "--config", str(cfg_path), "--out-dir", str(out), str(site_a), str(site_b)]) == 0
    return out


def test_report_outputs_exist(report_dir):
    for name in (
        "report.md",
        "report.html",
        "report.json",
        "preprocessing.csv",
        "training.csv",
        "stages.csv",
        "nested_cv.csv",
        "energy.csv",
        "sites.csv",
        "figures/accuracy.png",
        "figures/energy.png",
        "figures/curves_wsi_demo.png",
        "figures/confusion_hsi_demo.png",
    ):
        assert (report_dir / name).is_file(), name
    maps = sorted(p.name for p in (report_dir / "figures").glob("map_*.png"))
    assert len(maps) == 4  # 2 sites × 2 outer folds
    doc = json.loads((report_dir / "report.json").read_text())
    assert doc["sites"] == ["alpha", "beta"] and set(doc["summaries"]) == {"alpha", "beta"}


def test_training_csv_and_markdown_match_records(report_dir, two_sites):
    rows = _csv(report_dir / "training.csv")
    md = (report_dir / "report.md").read_text()
    md_rows = _md_table(md, "Training (accuracy mean ± std over folds)")
    header = md_rows[0]
    for site_dir in two_sites[:2]:
        site = site_dir.name
        for study in ("wsi_demo", "hsi_demo"):
            trains = _records(site_dir, f"runs/{study}/outer*/inner*/record.json")
            sels = _records(site_dir, f"runs/{study}/outer*/record.json")
            row = next(r for r in rows if r["site"] == site and r["study"] == study)
            train_acc = [r["metrics"]["train"]["oacc"] for r in trains]
            test_acc = [r["metrics"]["test"]["oacc"] for r in sels]
            spe = [statistics.mean(r["timings_s"]["epochs"]) for r in trains]
            assert _close(row["train_oacc_mean"], statistics.mean(train_acc), 1e-9)
            assert _close(row["train_oacc_std"], statistics.stdev(train_acc), 1e-9)
            assert _close(row["test_oacc_mean"], statistics.mean(test_acc), 1e-9)
            assert _close(row["s_per_epoch_mean"], statistics.mean(spe), 1e-9)
            assert _close(row["time_n_epochs_s"], 10 * statistics.mean(spe), 1e-9)
            assert _close(
                row["nested_cv_wall_s"],
                sum(r["wall_s"] for r in trains + sels + _records(site_dir, f"runs/{study}/outer*/maps/record.json")),
                1e-9,
            )
            md_row = dict(zip(header, next(r for r in md_rows[1:] if r[0] == study and r[1] == site)))
            mean, std = md_row["val acc"].split(" ± ")
            val_acc = [r["metrics"]["val"]["oacc"] for r in trains]
            # accuracy cells: mean ± std with 3 decimals each
            assert re.fullmatch(r"\d\.\d{3}", mean) and re.fullmatch(r"\d\.\d{3}", std)
            assert abs(float(mean) - statistics.mean(val_acc)) <= 5e-4
            assert abs(float(std) - statistics.stdev(val_acc)) <= 5e-4
            assert _close(md_row["time of 10 epochs (s)"], 10 * statistics.mean(spe))
            assert md_row["model"] == trains[0]["model"]
            assert _close(md_row["train patches/job"], statistics.mean(r["n_patches"]["train"] for r in trains))


def test_preprocessing_side_by_side(report_dir, two_sites):
    md = (report_dir / "report.md").read_text()
    table = _md_table(md, "Data pre-processing")
    assert table[0] == ["", "alpha", "beta"]
    for col, site_dir in enumerate(two_sites[:2], start=1):
        for cohort, what in (("wsi_demo", "WSI patch sampling"), ("hsi_demo", "HSI extraction")):
            ok = [r for r in _records(site_dir, f"shards/{cohort}/*.record.json") if r["status"] == "ok"]
            expect = sum(r["wall_s"] for r in ok) / sum(r["n_patches"] for r in ok)
            row = next(r for r in table[1:] if r[0] == f"{what} (ms/patch) — {cohort}")
            assert _close(row[col], 1000 * expect)
            # per image, as the timings figure draws it: the same unit (ms/patch)
            row = next(r for r in table[1:] if r[0] == f"{what} per image (ms/patch, mean ± std) — {cohort}")
            per_image = [1000 * r["wall_s"] / r["n_patches"] for r in ok]
            mean, std = (float(v) for v in row[col].split(" ± "))
            assert _close(str(mean), statistics.mean(per_image), 5e-3) and _close(
                str(std), statistics.stdev(per_image), 5e-2
            )
        loads = [
            r["throughput"]["load_ms_per_patch"] for r in _records(site_dir, "runs/wsi_demo/outer*/inner*/record.json")
        ]
        row = next(r for r in table[1:] if r[0] == "data loading (ms/patch) — wsi_demo")
        assert _close(row[col].split(" ± ")[0], statistics.mean(loads), 5e-3)
    csv_rows = _csv(report_dir / "preprocessing.csv")
    assert {(r["site"], r["cohort"]) for r in csv_rows} == {
        (s, c) for s in ("alpha", "beta") for c in ("wsi_demo", "hsi_demo")
    }


def test_nested_cv_and_stages_match_records(report_dir, two_sites):
    rows = _csv(report_dir / "nested_cv.csv")
    stages = _csv(report_dir / "stages.csv")
    for site_dir in two_sites[:2]:
        site = site_dir.name
        for sel in _records(site_dir, "runs/*/outer*/record.json"):
            row = next(
                r for r in rows if r["site"] == site and r["study"] == sel["study"] and int(r["outer"]) == sel["outer"]
            )
            for key in ("oacc", "sensitivity", "specificity", "auc"):
                assert _close(row[key], sel["metrics"]["test"][key], 1e-12)
            assert int(row["selected_inner"]) == sel["selected_inner"]
            plan = json.loads((site_dir / "folds" / f"{sel['study']}.json").read_text())
            patients = plan["outer"][sel["outer"]]["test_patients"]
            assert row["test_patients"].split() == patients and int(row["n_test_patients"]) == len(patients)
        ok_wsi = [r for r in _records(site_dir, "shards/wsi_demo/*.record.json") if r["status"] == "ok"]
        row = next(r for r in stages if r["site"] == site and r["job"] == "extract-wsi" and r["stage"] == "sampling")
        assert int(row["n"]) == 2
        assert _close(row["mean_s"], statistics.mean(r["timings_s"]["sampling"] for r in ok_wsi), 1e-12)
    md = (report_dir / "report.md").read_text()
    folds = _md_table(md, "Nested cross-validation: test results per outer fold")
    header = folds[0]
    assert "tumour sensitivity" in header
    for site_dir in two_sites[:2]:
        for sel in _records(site_dir, "runs/*/outer*/record.json"):
            row = dict(
                zip(header, next(r for r in folds[1:] if r[:3] == [sel["study"], str(sel["outer"]), site_dir.name]))
            )
            test = sel["metrics"]["test"]
            for column, key in (("OACC", "oacc"), ("AUC", "auc"), ("tumour sensitivity", "sensitivity")):
                assert re.fullmatch(r"\d\.\d{3}", row[column]) and abs(float(row[column]) - test[key]) <= 5e-4
            plan = json.loads((site_dir / "folds" / f"{sel['study']}.json").read_text())
            assert row["test patients"] == ", ".join(plan["outer"][sel["outer"]]["test_patients"])
    table = _md_table(md, "Stage timings per job type (s, mean ± std over jobs)")
    assert table[0] == ["job", "stage", "alpha", "beta"]
    assert any(r[1] == "demosaic" for r in table[1:])


def test_cohort_table(report_dir, two_sites):
    table = _md_table((report_dir / "report.md").read_text(), "Cohorts and fold plans")
    index = json.loads((two_sites[0] / "index" / "hsi_demo.json").read_text())
    row = next(r for r in table[1:] if r[0] == "hsi_demo: patients / images (failed)")
    assert row[1] == f"{len(index['patients'])} / {len(index['shards'])} ({len(index['failed'])})"
    row = next(r for r in table[1:] if r[0] == "wsi_demo: folds (outer×inner)")
    assert row[1:] == ["kfold 2×2, stratified"] * 2


def test_bench_table(report_dir, two_sites):
    table = _md_table((report_dir / "report.md").read_text(), "Node benchmark (`medflow bench`, per host)")
    assert table[0] == ["metric", "alpha", "beta"]
    row = next(r for r in table[1:] if r[0] == "hsi.images_per_s")
    assert row[1:] == ["11", "12"]  # 10 + seed of each fake site


def test_energy_csv(report_dir, two_sites):
    rows = _csv(report_dir / "energy.csv")
    total = {r["site"]: r for r in rows if r["job"] == "total"}
    assert float(total["beta"]["gpu_hours"]) == 0 and float(total["alpha"]["gpu_hours"]) > 0
    for _site, r in total.items():
        kwh = (
            (
                float(r["gpu_hours"]) * float(r["power_w_gpu"])
                + float(r["cpu_core_hours"]) * float(r["power_w_cpu_core"])
            )
            * float(r["pue"])
            / 1000
        )
        assert _close(r["kwh"], kwh, 1e-9) and _close(r["co2_g"], kwh * float(r["carbon_g_per_kwh"]), 1e-9)


def test_html_is_self_contained(report_dir):
    html_text = (report_dir / "report.html").read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)', html_text)
    assert refs, "expected embedded figures"
    assert not [r for r in refs if re.match(r"(https?:)?//", r)]
    assert not re.search(r"@import|url\(\s*['\"]?https?:", html_text)
    assert "<script" not in html_text.lower()
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', html_text)
    assert imgs and all(re.match(r"data:image/(png|jpeg);base64,", src) for src in imgs)
    # the only links to files: the full-size slide QC images next to the report
    files = [r for r in refs if not r.startswith(("data:", "#"))]
    assert files and all(r.startswith("figures/qc/") and (report_dir / r).is_file() for r in files)
    assert "alpha" in html_text and "beta" in html_text


def test_copied_site_dir(tmp_path, two_sites):
    """A site directory summarised elsewhere and copied here still finds its HSI maps."""
    import shutil

    site_a, _, cfg_path = two_sites
    elsewhere = tmp_path / "elsewhere" / "alpha"
    shutil.copytree(site_a, elsewhere)
    assert (
        cli.main(
            [
                "summarize",
                "--config",
                str(cfg_path),
                "--site-dir",
                str(elsewhere),
                "--out",
                str(elsewhere / "summary.json"),
            ]
        )
        == 0
    )
    moved = tmp_path / "here" / "alpha"
    shutil.move(str(elsewhere), moved)
    out = tmp_path / "rep"
    assert cli.main(["report", "--config", str(cfg_path), "--out-dir", str(out), str(moved)]) == 0
    assert len(list((out / "figures").glob("map_*.png"))) == 2


def test_report_bad_input(tmp_path, two_sites):
    import shutil

    site_a = tmp_path / "alpha"
    shutil.copytree(two_sites[0], site_a)
    cfg_path = two_sites[2]
    out = tmp_path / "rep"
    assert (
        cli.main(["report", "--config", str(cfg_path), "--out-dir", str(out), str(site_a), str(tmp_path / "nope")]) == 2
    )
    assert not out.exists()
    (site_a / "summary.json").write_text(json.dumps({"format": "something-else"}))
    assert cli.main(["report", "--config", str(cfg_path), "--out-dir", str(out), str(site_a)]) == 2
    assert not out.exists()
    # --recompute summarises the records and ignores the stale file
    assert cli.main(["report", "--config", str(cfg_path), "--out-dir", str(out), "--recompute", str(site_a)]) == 0
    assert (out / "report.html").is_file()


def test_map_accuracy_from_either_record_layout():
    as_list = {"images": [{"image_id": "a", "accuracy": 0.5}, {"image_id": "b", "accuracy": None}]}
    as_dict = {"metrics": {"images": {"a": {"oacc": 0.5, "n": 10}}}}
    assert summary_mod._per_image_accuracy(as_list) == {"a": 0.5}
    assert summary_mod._per_image_accuracy(as_dict) == {"a": 0.5}

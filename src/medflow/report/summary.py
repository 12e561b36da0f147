"""Gather every job record of one site directory into ``summary.json`` (format ``medflow-summary/1``).

The summary is what `medflow report` reads: it is computed from the records alone (never logs), is
self-contained (learning curves, confusion matrices and HSI map paths are copied in), so a report can
compare sites whose results directories were produced on different clusters. The format is described
in docs/reports.md; numbers are recomputable from the records by the documented rules below.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..core import config as config_mod
from ..core import fsio, provenance
from ..core.errors import InputError
from ..core.records import now_iso
from . import slide_qc, wsi_results
from .collect import collect_records, read_curves
from .energy import add_hours, device_hours, energy, gpu_devices, job_cores
from .stats import finite, mean_std, parse_time, ratio, total

SUMMARY_FORMAT = "medflow-summary/1"
EXTRACT_JOBS = ("extract-wsi", "extract-hsi")
NESTED_CV_JOBS = ("train", "select", "refit", "test", "predict-hsi", "predict-wsi", "slide-metrics", "grad-cam")


def site_identity(records: dict[str, list[dict]], site_dir: Path, cfg: dict | None = None) -> dict[str, Any]:
    """The site as the jobs recorded it: the most common name, every host, CPU and GPU models seen.

    ``cpu_count`` is what a node offered a job (its CPU affinity: the whole machine outside a batch
    system); ``job_cores`` what a training job held (ranks × threads per rank, as for core-hours)."""
    all_recs = [r for recs in records.values() for r in recs]
    sites = [r.get("site") or {} for r in all_recs]
    names = Counter(s.get("name") for s in sites if s.get("name"))
    train_sites = [r.get("site") or {} for r in records.get("train", [])] or sites

    def most_common(key: str, pool: list[dict]) -> Any:
        c = Counter(str(s.get(key)) for s in pool if s.get(key) not in (None, ""))
        return c.most_common(1)[0][0] if c else None

    gpus = Counter(g for s in train_sites for g in (s.get("gpus") or []))
    cpu_counts = finite(s.get("cpu_count") for s in train_sites)
    gpu_counts = finite(s.get("gpu_count") for s in train_sites)
    return {
        "name": names.most_common(1)[0][0] if names else site_dir.name,
        "dir_name": site_dir.name,
        "cluster": most_common("cluster", sites) or "",
        "hosts": sorted({s.get("host") for s in sites if s.get("host")}),
        "cpu": most_common("cpu", train_sites) or "",
        "cpu_count": int(max(cpu_counts)) if cpu_counts else None,
        "job_cores": max(
            (job_cores(r, cfg or {}) for r in records.get("train") or [r for recs in records.values() for r in recs]),
            default=None,
        ),
        "gpus": sorted(gpus),
        "gpu_count": int(max(gpu_counts)) if gpu_counts else 0,
    }


def software_seen(records: dict[str, list[dict]]) -> dict[str, Any]:
    """Software versions of the training jobs (else any job); a key with several values lists them all."""
    pool = records.get("train") or [r for recs in records.values() for r in recs]
    versions: dict[str, set[str]] = defaultdict(set)
    for rec in pool:
        for key, value in (rec.get("software") or {}).items():
            if value not in (None, ""):
                versions[key].add(str(value))
    return {k: (sorted(v)[0] if len(v) == 1 else sorted(v)) for k, v in sorted(versions.items())}


# ---- pre-processing -----------------------------------------------------------------------------
def preprocessing(records: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per cohort: images, patches, and seconds per patch (total extraction job wall time / patches).

    ``stage_s_per_patch`` divides each summed stage time by the patches, so WSI sampling cost
    (``sampling`` + ``read``) and HSI chain cost can be read apart from I/O (``write``).
    ``load_ms_per_patch`` is the data-loading cost the training jobs on this cohort measured.
    """
    by_cohort: dict[str, list[dict]] = defaultdict(list)
    for job in EXTRACT_JOBS:
        for rec in records.get(job, []):
            by_cohort[str(rec.get("cohort"))].append(rec)
    trains_by_cohort: dict[str, list[dict]] = defaultdict(list)
    for rec in records.get("train", []):
        if rec.get("status") == "ok":
            trains_by_cohort[str(rec.get("cohort"))].append(rec)
    out = {}
    for cohort, recs in sorted(by_cohort.items()):
        ok = [r for r in recs if r.get("status") == "ok"]
        patches = int(total(r.get("n_patches") for r in ok))
        wall = total(r.get("wall_s") for r in ok)
        counts: Counter = Counter()
        for r in ok:
            counts.update({k: int(v) for k, v in (r.get("counts") or {}).items()})
        stages = _stage_sums(ok)
        out[cohort] = {
            "kind": "wsi" if recs[0].get("job") == "extract-wsi" else "hsi",
            "images": len(recs),
            "ok": len(ok),
            "failed": len(recs) - len(ok),
            "failed_images": [
                {"image_id": r.get("image_id"), "error": r.get("error")} for r in recs if r.get("status") != "ok"
            ],
            "patches": patches,
            "counts": dict(counts),
            "wall_s": wall,
            "s_per_patch": ratio(wall, patches),
            "patches_per_s": ratio(patches, wall),
            "s_per_image": ratio(wall, len(ok)),
            "s_per_patch_images": mean_std(ratio(total([r.get("wall_s")]), r.get("n_patches")) for r in ok),
            "load_ms_per_patch": mean_std(
                (r.get("throughput") or {}).get("load_ms_per_patch") for r in trains_by_cohort.get(cohort, [])
            ),
            "stage_s": stages,
            "stage_s_per_patch": {k: v / patches for k, v in stages.items()} if patches else {},
            "bytes_written": int(total((r.get("throughput") or {}).get("bytes_written") for r in ok)),
        }
    return out


def _stage_sums(recs: list[dict]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for r in recs:
        for stage, value in (r.get("timings_s") or {}).items():
            if finite([value]):
                sums[stage] += float(value)
    return dict(sums)


def _s_per_epoch(rec: dict) -> float | None:
    values = finite([(rec.get("throughput") or {}).get("s_per_epoch")])
    if values:
        return values[0]
    epochs = finite((rec.get("timings_s") or {}).get("epochs") or [])
    return sum(epochs) / len(epochs) if epochs else None


def _metric(rec: dict, split: str, key: str) -> Any:
    return ((rec.get("metrics") or {}).get(split) or {}).get(key)


def _model_name(rec: dict) -> str:
    model = rec.get("model")
    if isinstance(model, dict):
        return str(model.get("name", "?"))
    return str(model) if model else "?"


def _elapsed_s(recs: list[dict]) -> float | None:
    starts = [t for t in (parse_time(r.get("started")) for r in recs) if t]
    ends = [t for t in (parse_time(r.get("finished")) for r in recs) if t]
    if not starts or not ends:
        return None
    return max(0.0, (max(ends) - min(starts)).total_seconds())


def studies(records: dict[str, list[dict]], cfg: dict, epochs_for_time: int) -> dict[str, dict[str, Any]]:
    """Per study: accuracy mean ± std over folds, epoch timings, nested-CV cost, per-outer-fold results."""
    names = sorted({str(r.get("study")) for job in NESTED_CV_JOBS for r in records.get(job, [])})
    out = {}
    for study in names:

        def of(job: str) -> list[dict]:
            return [r for r in records.get(job, []) if str(r.get("study")) == study]

        trains, selects, maps = of("train"), of("select"), of("predict-hsi")
        refits, refit_tests = of("refit"), of("test")
        maps_cost = maps + of("predict-wsi") + of("slide-metrics") + of("grad-cam")
        trains_ok = [r for r in trains if r.get("status") == "ok"]
        selects_ok = [r for r in selects if r.get("status") == "ok"]
        tests_ok = [r for r in refit_tests if r.get("status") == "ok"]
        first = (trains or selects or [{}])[0]
        s_epoch = mean_std(_s_per_epoch(r) for r in trains_ok)
        nested_cv_jobs = trains + selects + refits + refit_tests + maps_cost
        hours = {"gpu_hours": 0.0, "cpu_core_hours": 0.0}
        for rec in nested_cv_jobs:
            add_hours(hours, device_hours(rec, cfg))
        launch = first.get("launch") or {}
        out[study] = {
            "cohort": first.get("cohort"),
            "kind": first.get("kind"),
            "model": _model_name(first),
            "backend": launch.get("backend"),
            "ranks": launch.get("ranks"),
            "devices": "gpu" if any(gpu_devices(r) for r in trains) else "cpu",
            "n_outer": len({r.get("outer") for r in selects} | {r.get("outer") for r in trains}),
            "n_train_jobs": len(trains),
            "n_train_failed": len(trains) - len(trains_ok),
            "train_oacc": mean_std(_metric(r, "train", "oacc") for r in trains_ok),
            "val_oacc": mean_std(_metric(r, "val", "oacc") for r in trains_ok),
            "test_oacc": mean_std(_metric(r, "test", "oacc") for r in selects_ok),
            "test_sensitivity": mean_std(_metric(r, "test", "sensitivity") for r in selects_ok),
            "test_specificity": mean_std(_metric(r, "test", "specificity") for r in selects_ok),
            "test_auc": mean_std(_metric(r, "test", "auc") for r in selects_ok),
            **{f"refit_test_{m}": mean_std(_metric(r, "test", m) for r in tests_ok) for m in _REFIT_METRICS},
            "s_per_epoch": s_epoch,
            "epochs_for_time": epochs_for_time,
            "time_n_epochs_s": epochs_for_time * s_epoch["mean"] if s_epoch["mean"] is not None else None,
            "epochs_run": mean_std(r.get("epochs_run") for r in trains_ok),
            "train_patches": mean_std(_n_train(r) for r in trains_ok),
            "train_img_per_s": mean_std((r.get("throughput") or {}).get("train_img_per_s") for r in trains_ok),
            "load_ms_per_patch": mean_std((r.get("throughput") or {}).get("load_ms_per_patch") for r in trains_ok),
            "nested_cv_wall_s": total(r.get("wall_s") for r in nested_cv_jobs),
            "nested_cv_elapsed_s": _elapsed_s(nested_cv_jobs),
            **hours,
            "outer": [
                _outer_result(r, refit_tests)
                for r in sorted(selects, key=lambda r: (r.get("outer") is None, r.get("outer")))
            ],
            "curves": [_curves_of(r) for r in sorted(trains, key=lambda r: (r.get("outer") or 0, r.get("inner") or 0))],
            "maps": [m for r in maps for m in _maps_of(r)],
        }
    return out


def _n_train(rec: dict) -> Any:
    n = rec.get("n_patches")
    return n.get("train") if isinstance(n, dict) else n


_REFIT_METRICS = ("oacc", "sensitivity", "specificity", "auc")


def _outer_result(rec: dict, refit_tests: list[dict]) -> dict[str, Any]:
    """One outer fold: the selected inner model's test metrics, and the refit model's when it was tested."""
    val = (rec.get("metrics") or {}).get("val") or {}
    refit = next((r for r in refit_tests if r.get("outer") == rec.get("outer") and r.get("status") == "ok"), None)
    return {
        "outer": rec.get("outer"),
        "status": rec.get("status"),
        "selected_inner": rec.get("selected_inner"),
        "selection_metric": rec.get("selection_metric"),
        "candidates": rec.get("candidates"),
        "val": {k: val.get(k) for k in ("n", "oacc", "auc") if k in val},
        "test": _test_metrics(rec),
        "refit_test": _test_metrics(refit) if refit else None,
        "wall_s": rec.get("wall_s"),
    }


_TEST_KEYS = (
    "n",
    "oacc",
    "sensitivity",
    "specificity",
    "auc",
    "macro_f1",
    "confusion",
    "class_names",
    "positive_class",
    "per_class_recall",
    "support",
)


def _test_metrics(rec: dict) -> dict[str, Any]:
    test = (rec.get("metrics") or {}).get("test") or {}
    return {k: test.get(k) for k in _TEST_KEYS if k in test}


def _curves_of(rec: dict) -> dict[str, Any]:
    curves = read_curves(Path(rec["_path"]).with_name("curves.csv"))
    return {
        "outer": rec.get("outer"),
        "inner": rec.get("inner"),
        "status": rec.get("status"),
        "best_epoch": rec.get("best_epoch"),
        **curves,
    }


def _maps_of(rec: dict) -> list[dict[str, Any]]:
    """Each classification map PNG next to a predict-hsi record (path relative to the site dir)."""
    maps_dir = Path(rec["_path"]).parent
    site_dir = maps_dir.parents[3]
    accuracy = _per_image_accuracy(rec)
    return [
        {
            "outer": rec.get("outer"),
            "image_id": png.stem,
            "png": str(png.relative_to(site_dir)),
            "accuracy": accuracy.get(png.stem),
        }
        for png in sorted(maps_dir.glob("*.png"))
    ]


def _per_image_accuracy(rec: dict) -> dict[str, float]:
    """predict-hsi records list images either as a dict or a list of {image_id, accuracy|oacc}."""
    images = rec.get("images") or (rec.get("metrics") or {}).get("images") or {}
    if isinstance(images, dict):
        items = [{"image_id": k, **(v if isinstance(v, dict) else {"accuracy": v})} for k, v in images.items()]
    else:
        items = [i for i in images if isinstance(i, dict)]
    out = {}
    for item in items:
        acc = item.get("accuracy", item.get("oacc"))
        if isinstance(acc, dict):
            acc = acc.get("oacc")
        if values := finite([acc]):
            out[str(item.get("image_id"))] = values[0]
    return out


# ---- stage timings ------------------------------------------------------------------------------
def stages(records: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per job type: job count, wall time, and each scalar stage of ``timings_s`` (mean ± std, sum)."""
    out = {}
    for job, recs in sorted(records.items()):
        ok = [r for r in recs if r.get("status") == "ok"]
        names = list(dict.fromkeys(s for r in ok for s, v in (r.get("timings_s") or {}).items() if finite([v])))
        names = [n for n in names if n != "other"] + ["other"] * ("other" in names)
        # A stage a job did not run counts 0 s, so the stage means add up to the mean wall time.
        stage_values: dict[str, list[float]] = {
            stage: [(finite([(r.get("timings_s") or {}).get(stage)]) or [0.0])[0] for r in ok] for stage in names
        }
        out[job] = {
            "n": len(recs),
            "ok": len(ok),
            "wall_s": {**mean_std(r.get("wall_s") for r in ok), "sum": total(r.get("wall_s") for r in ok)},
            "timings_s": {s: {**mean_std(v), "sum": float(sum(v))} for s, v in stage_values.items()},
        }
    return out


def _read_optional(path: Path) -> dict | None:
    try:
        data = fsio.read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cohorts(site_dir: Path) -> dict[str, dict[str, Any]]:
    """What each cohort index says: patients, images (usable / failed), patches per class."""
    out = {}
    for path in sorted(Path(site_dir).glob("index/*.json")):
        index = _read_optional(path)
        if not index or not str(index.get("format", "")).startswith("medflow-index/"):
            continue
        out[str(index.get("cohort") or path.stem)] = {
            "kind": index.get("kind"),
            "patients": len(index.get("patients") or []),
            "images": len(index.get("shards") or []),
            "failed": len(index.get("failed") or []),
            "class_names": index.get("class_names"),
            "totals": index.get("totals") or {},
        }
    return out


def fold_plans(site_dir: Path) -> dict[str, dict[str, Any]]:
    """Per study: the fold plan's strategy and balance, and how far its folds are from equal shares."""
    out = {}
    for path in sorted(Path(site_dir).glob("folds/*.json")):
        plan = _read_optional(path)
        if not plan or not str(plan.get("format", "")).startswith("medflow-folds/"):
            continue
        deviation = plan.get("deviation") or {}
        out[str(plan.get("study") or path.stem)] = {
            "strategy": plan.get("strategy"),
            "balance": plan.get("balance"),
            "k_outer": plan.get("k_outer", len(plan.get("outer") or [])),
            "k_inner": plan.get("k_inner"),
            "patients": len(plan.get("patients") or []),
            "max_abs_deviation_outer": deviation.get("max_abs_outer"),
            "warnings": list(plan.get("warnings") or []),
            "test_patients": {
                int(o["index"]): list(o.get("test_patients") or []) for o in plan.get("outer") or [] if "index" in o
            },
        }
    return out


def verification(site_dir: Path) -> dict[str, Any]:
    """What `medflow verify` found (``verify.json``): status, checks per area, problems; "not run" without it."""
    found = _read_optional(Path(site_dir) / "verify.json")
    if not found or not str(found.get("format", "")).startswith("medflow-verify/"):
        return {"status": "not run", "checked": {}, "problems": []}
    return {key: found.get(key) for key in ("status", "when", "rehashed", "checked", "problems")}


def bench_results(site_dir: Path) -> dict[str, Any]:
    """Node benchmark results (`medflow bench`) found under ``site_dir/bench``: host → metrics."""
    out = {}
    for path in sorted(Path(site_dir).glob("bench/*.json")):
        try:
            data = fsio.read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format", "").startswith("medflow-bench/"):
            out[(data.get("site") or {}).get("host") or path.stem] = {
                "metrics": data.get("metrics", {}),
                "finished": data.get("finished"),
            }
    return out


# ---- the summary ----------------------------------------------------------------------------------
def summarize(site_dir: str | Path, cfg: dict) -> dict[str, Any]:
    """Build the summary of one site directory (raises InputError if it holds no job record)."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise InputError(site_dir, "site results directory not found")
    records = collect_records(site_dir)
    if not records:
        raise InputError(site_dir, "no job records found (expected shards/*/*.record.json or runs/*/…/record.json)")
    epochs_for_time = int(cfg.get("report", {}).get("epochs_for_time", 10))
    all_recs = [r for recs in records.values() for r in recs]
    return {
        "format": SUMMARY_FORMAT,
        "site": site_identity(records, site_dir, cfg),
        "site_dir": str(site_dir.resolve()),
        "generated": now_iso(),
        "generated_by": provenance.software()["medflow"],
        "software": software_seen(records),
        "seeds": sorted({r.get("seed") for r in all_recs if r.get("seed") is not None}),
        "jobs": {
            "total": len(all_recs),
            "ok": sum(r.get("status") == "ok" for r in all_recs),
            "by_type": {job: len(recs) for job, recs in sorted(records.items())},
            "first_started": min((r["started"] for r in all_recs if r.get("started")), default=None),
            "last_finished": max((r["finished"] for r in all_recs if r.get("finished")), default=None),
        },
        "cohorts": cohorts(site_dir),
        "folds": (plans := fold_plans(site_dir)),
        "preprocessing": preprocessing(records),
        "studies": _with_test_patients(studies(records, cfg, epochs_for_time), plans),
        "wsi_results": wsi_results.summarize(records, site_dir),
        "stages": stages(records),
        "slide_qc": slide_qc.slide_rows(records, site_dir),
        "energy": energy(records, cfg),
        "bench": bench_results(site_dir),
        "verification": verification(site_dir),
    }


def _with_test_patients(by_study: dict[str, dict], plans: dict[str, dict]) -> dict[str, dict]:
    """Each outer fold's test patients from the fold plan (records name the fold, the plan its patients)."""
    for study, st in by_study.items():
        tests = (plans.get(study) or {}).get("test_patients", {})
        for fold in st["outer"]:
            patients = tests.get(fold.get("outer"))
            fold["test_patients"] = list(patients) if patients is not None else None
    return by_study


def load_or_build(site_dir: str | Path, cfg: dict) -> dict[str, Any]:
    """``site_dir/summary.json`` if present (checking its format), else computed now (not written)."""
    path = Path(site_dir) / "summary.json"
    if path.is_file():
        data = fsio.read_json_document(path, "summary", SUMMARY_FORMAT)
        # A site directory copied from another cluster: its files (HSI maps) are here now.
        data["site_dir"] = str(Path(site_dir).resolve())
        return data
    return summarize(site_dir, cfg)


# ---- CLI: medflow summarize ---------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--site-dir", required=True, help="results/<site> directory holding the job records")
    p.add_argument("--out", required=True, help="summary JSON to write (usually <site-dir>/summary.json)")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    summary = summarize(args.site_dir, cfg)
    fsio.write_json(args.out, summary)
    jobs = summary["jobs"]
    print(
        f"summary {args.out}: site {summary['site']['name']}, {jobs['total']} job records "
        f"({jobs['ok']} ok), {len(summary['studies'])} studies, {len(summary['preprocessing'])} cohorts"
    )
    return 0

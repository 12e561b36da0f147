"""Report tables: tidy tables for CSV/JSON (one row per site and item, full precision) and display
tables for Markdown/HTML (sites side by side, formatted), all built from site summaries."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.metrics import mean_std as metrics_mean_std

CSV_TABLES = ("sites", "preprocessing", "training", "stages", "nested_cv", "energy")


@dataclass
class Table:
    """A titled table: ``rows`` hold raw values (CSV/JSON) or display strings (Markdown/HTML)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "note": self.note}


# ---- formatting -----------------------------------------------------------------------------
def fmt(value: Any, digits: int = 4) -> str:
    """4 significant digits for floats, plain ints, '–' for missing."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def fmt_ms(stat: dict[str, Any] | None, digits: int = 3, decimals: int | None = None) -> str:
    """'mean ± std' of a summary mean_std dict (just the mean when n == 1), both with the same
    decimals: ``decimals`` when given (bounded metrics: 3), else enough for ``digits`` significant
    digits of the larger of |mean| and std (so "0.999 ± 0.001", never "1 ± 0.000504")."""
    if not stat or stat.get("mean") is None:
        return "–"
    mean = float(stat["mean"])
    std = float(stat["std"]) if (stat.get("n") or 0) > 1 and stat.get("std") is not None else None
    if std is not None and abs(std) < 1e-9 * max(1.0, abs(mean)):  # float noise of identical values
        std = 0.0
    if decimals is None:
        magnitude = max(abs(mean), std or 0.0)
        decimals = max(0, digits - 1 - math.floor(math.log10(magnitude))) if magnitude > 0 else 0
    text = f"{mean:.{decimals}f}"
    return text if std is None else f"{text} ± {std:.{decimals}f}"


#: Decimals of metrics bounded to [0, 1] (accuracy, sensitivity, specificity, AUC, F1) in display tables.
METRIC_DECIMALS = 3


def fmt_metric(value: Any) -> str:
    """A metric in [0, 1] with ``METRIC_DECIMALS`` decimals ('–' when undefined)."""
    return "–" if value is None else f"{float(value):.{METRIC_DECIMALS}f}"


def fmt_metric_ms(stat: dict[str, Any] | None) -> str:
    return fmt_ms(stat, decimals=METRIC_DECIMALS)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def _ms_stat(stat: dict | None) -> dict | None:
    """A seconds mean_std dict in milliseconds."""
    if not stat or stat.get("mean") is None:
        return stat
    return {**stat, "mean": 1000.0 * stat["mean"], "std": None if stat.get("std") is None else 1000.0 * stat["std"]}


def _mean(stat: dict | None) -> float | None:
    return (stat or {}).get("mean")


def _hours(value: float | None) -> float | None:
    return None if value is None else value / 3600.0


def site_labels(summaries: list[dict]) -> list[str]:
    """Site names, made unique with the directory name when two summaries share one."""
    names = [s["site"]["name"] for s in summaries]
    labels = []
    for s, name in zip(summaries, names):
        label = name if names.count(name) == 1 else f"{name} ({s['site'].get('dir_name') or Path(s['site_dir']).name})"
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


def _union(summaries: list[dict], getter: Callable[[dict], dict]) -> list[str]:
    keys: list[str] = []
    for s in summaries:
        for k in getter(s):
            if k not in keys:
                keys.append(k)
    return keys


# ---- tidy tables (CSV / JSON) -------------------------------------------------------------------
def data_tables(summaries: list[dict], labels: list[str]) -> dict[str, Table]:
    tables = {
        t.name: t
        for t in (
            _sites_table(summaries, labels),
            _preprocessing_table(summaries, labels),
            _training_table(summaries, labels),
            _stages_table(summaries, labels),
            _nested_cv_table(summaries, labels),
            _energy_table(summaries, labels),
        )
    }
    return tables


def _sites_table(summaries: list[dict], labels: list[str]) -> Table:
    t = Table(
        "sites",
        "Sites",
        [
            "site",
            "name",
            "cluster",
            "hosts",
            "cpu",
            "cpu_count",
            "gpus",
            "gpu_count",
            "jobs",
            "jobs_ok",
            "torch",
            "horovod",
            "mpi",
            "medflow",
            "git",
            "site_dir",
        ],
    )
    for label, s in zip(labels, summaries):
        site, sw = s["site"], s.get("software", {})
        t.rows.append(
            [
                label,
                site["name"],
                site.get("cluster"),
                " ".join(site.get("hosts") or []),
                site.get("cpu"),
                site.get("cpu_count"),
                "; ".join(site.get("gpus") or []),
                site.get("gpu_count"),
                s["jobs"]["total"],
                s["jobs"]["ok"],
                _one(sw.get("torch")),
                _one(sw.get("horovod")),
                _one(sw.get("mpi")),
                _one(sw.get("medflow")),
                _one(sw.get("git")),
                s.get("site_dir"),
            ]
        )
    return t


def _verified(summary: dict) -> str:
    """'yes' with the number of checks, or the problems (first three), or 'not run'."""
    v = summary.get("verification") or {}
    checks = sum((v.get("checked") or {}).values())
    if v.get("status") == "verified":
        return f"yes ({checks} checks{'' if v.get('rehashed') else ', shards not re-hashed'})"
    if v.get("status") == "problems":
        problems = v.get("problems") or []
        shown = "; ".join(f"{p['file']}: {p['problem']}" for p in problems[:3])
        return f"NO — {len(problems)} problem(s): {shown}" + (" …" if len(problems) > 3 else "")
    return "not run"


def _short_commits(value: Any) -> Any:
    """Commits as 12-hex prefixes (keeping "-dirty"): full hashes of several commits overflow the table."""
    commits = value if isinstance(value, list) else [value]
    return _one(
        [
            c[:12] + ("-dirty" if str(c).endswith("-dirty") else "") if isinstance(c, str) and len(c) >= 40 else c
            for c in commits
        ]
    )


def _one(value: Any) -> Any:
    return " | ".join(map(str, value)) if isinstance(value, list) else value


def _preprocessing_table(summaries: list[dict], labels: list[str]) -> Table:
    t = Table(
        "preprocessing",
        "Data pre-processing",
        [
            "site",
            "cohort",
            "kind",
            "images",
            "failed",
            "patches",
            "wall_s",
            "s_per_patch",
            "s_per_patch_image_std",
            "patches_per_s",
            "load_ms_per_patch",
            "load_ms_per_patch_std",
            "bytes_written",
        ],
    )
    for label, s in zip(labels, summaries):
        for cohort, p in s["preprocessing"].items():
            load = p.get("load_ms_per_patch") or {}
            t.rows.append(
                [
                    label,
                    cohort,
                    p["kind"],
                    p["images"],
                    p["failed"],
                    p["patches"],
                    p["wall_s"],
                    p["s_per_patch"],
                    (p.get("s_per_patch_images") or {}).get("std"),
                    p["patches_per_s"],
                    load.get("mean"),
                    load.get("std"),
                    p.get("bytes_written"),
                ]
            )
    return t


_STAT_COLUMNS = (
    "train_oacc",
    "val_oacc",
    "test_oacc",
    "refit_test_oacc",
    "s_per_epoch",
    "train_img_per_s",
    "load_ms_per_patch",
    "train_patches",
)


def _training_table(summaries: list[dict], labels: list[str]) -> Table:
    columns = ["site", "study", "model", "kind", "backend", "ranks", "devices", "n_outer", "n_train_jobs"]
    for key in _STAT_COLUMNS:
        columns += [f"{key}_mean", f"{key}_std", f"{key}_n"]
    columns += [
        "epochs_for_time",
        "time_n_epochs_s",
        "nested_cv_wall_s",
        "nested_cv_elapsed_s",
        "gpu_hours",
        "cpu_core_hours",
    ]
    t = Table("training", "Training", columns)
    for study in _union(summaries, lambda s: s["studies"]):
        for label, s in zip(labels, summaries):
            st = s["studies"].get(study)
            if st is None:
                continue
            row = [
                label,
                study,
                st["model"],
                st["kind"],
                st["backend"],
                st["ranks"],
                st["devices"],
                st["n_outer"],
                st["n_train_jobs"],
            ]
            for key in _STAT_COLUMNS:
                stat = st.get(key) or {}
                row += [stat.get("mean"), stat.get("std"), stat.get("n")]
            row += [
                st["epochs_for_time"],
                st["time_n_epochs_s"],
                st["nested_cv_wall_s"],
                st["nested_cv_elapsed_s"],
                st["gpu_hours"],
                st["cpu_core_hours"],
            ]
            t.rows.append(row)
    return t


def _stages_table(summaries: list[dict], labels: list[str]) -> Table:
    t = Table("stages", "Stage timings per job type", ["site", "job", "stage", "n", "mean_s", "std_s", "sum_s"])
    for label, s in zip(labels, summaries):
        for job, st in s["stages"].items():
            w = st["wall_s"]
            t.rows.append([label, job, "wall", w["n"], w["mean"], w["std"], w["sum"]])
            for stage, v in st["timings_s"].items():
                t.rows.append([label, job, stage, v["n"], v["mean"], v["std"], v["sum"]])
    return t


_FOLD_METRICS = ("oacc", "sensitivity", "specificity", "auc", "macro_f1")


def _nested_cv_table(summaries: list[dict], labels: list[str]) -> Table:
    t = Table(
        "nested_cv",
        "Nested cross-validation per outer fold (test set of each outer fold)",
        [
            "site",
            "study",
            "outer",
            "model",
            "selected_inner",
            "selection_metric",
            "test_patients",
            "n_test_patients",
            "n",
            *_FOLD_METRICS,
            "positive_class",
        ],
        note="model: 'selected' = the best inner model; 'refit' = the selected configuration retrained on the "
        "whole outer training set (select.refit).",
    )
    for study in _union(summaries, lambda s: s["studies"]):
        for label, s in zip(labels, summaries):
            for fold in (s["studies"].get(study) or {}).get("outer", []):
                for model, test in _fold_tests(fold):
                    t.rows.append(
                        [
                            label,
                            study,
                            fold.get("outer"),
                            model,
                            fold.get("selected_inner"),
                            fold.get("selection_metric"),
                            fold.get("test_patients"),
                            len(fold["test_patients"]) if isinstance(fold.get("test_patients"), list) else None,
                            test.get("n"),
                            *[test.get(m) for m in _FOLD_METRICS],
                            test.get("positive_class"),
                        ]
                    )
    return t


def _fold_tests(fold: dict) -> list[tuple[str, dict]]:
    """(model, test metrics) of an outer fold: the selected inner model, then the refit one if tested."""
    tests = [("selected", fold.get("test") or {})]
    if fold.get("refit_test"):
        tests.append(("refit", fold["refit_test"]))
    return tests


def _energy_table(summaries: list[dict], labels: list[str]) -> Table:
    t = Table(
        "energy",
        "Energy and CO₂ estimate",
        [
            "site",
            "job",
            "gpu_hours",
            "cpu_core_hours",
            "kwh",
            "co2_g",
            "power_w_gpu",
            "power_w_cpu_core",
            "pue",
            "carbon_g_per_kwh",
        ],
    )
    for label, s in zip(labels, summaries):
        e = s["energy"]
        params = [
            e["params"]["power_w"]["gpu"],
            e["params"]["power_w"]["cpu_core"],
            e["params"]["pue"],
            e["params"]["carbon_g_per_kwh"],
        ]
        for job, v in [*e["by_job"].items(), ("total", e["total"])]:
            t.rows.append([label, job, v["gpu_hours"], v["cpu_core_hours"], v["kwh"], v["co2_g"], *params])
    return t


# ---- side-by-side display tables (Markdown / HTML) -----------------------------------------------
def display_tables(summaries: list[dict], labels: list[str]) -> list[Table]:
    return [
        _display_sites(summaries, labels),
        _display_cohorts(summaries, labels),
        _display_preprocessing(summaries, labels),
        _display_training(summaries, labels),
        _display_nested_cv(summaries, labels),
        *([_display_per_class(summaries, labels)] if _any_per_class(summaries) else []),
        _display_stages(summaries, labels),
        _display_energy(summaries, labels),
        *([_display_bench(summaries, labels)] if any(s.get("bench") for s in summaries) else []),
    ]


def _display_sites(summaries: list[dict], labels: list[str]) -> Table:
    t = Table("sites", "Sites", ["", *labels])
    rows = [
        ("cluster", lambda s: s["site"].get("cluster") or "–"),
        ("hosts", lambda s: ", ".join(s["site"].get("hosts") or []) or "–"),
        ("CPU", lambda s: s["site"].get("cpu") or "–"),
        ("CPU cores per training job (node)", _cores_cell),
        (
            "GPUs (per job)",
            lambda s: (
                f"{s['site'].get('gpu_count')} × {', '.join(s['site']['gpus'])}" if s["site"].get("gpus") else "none"
            ),
        ),
        ("job records (ok)", lambda s: f"{s['jobs']['total']} ({s['jobs']['ok']})"),
        ("results verified (medflow verify)", _verified),
        (
            "torch / horovod",
            lambda s: f"{fmt(_one(s['software'].get('torch')))} / {fmt(_one(s['software'].get('horovod')))}",
        ),
        ("MPI", lambda s: fmt(_one(s["software"].get("mpi")))),
        (
            "medflow (git)",
            lambda s: f"{fmt(_one(s['software'].get('medflow')))} ({fmt(_short_commits(s['software'].get('git')))})",
        ),
    ]
    for name, get in rows:
        t.rows.append([name, *[get(s) for s in summaries]])
    return t


def _cores_cell(s: dict) -> str:
    """The cores a training job held (ranks × threads per rank) and, in brackets, what its node offered."""
    site = s["site"]
    node = f" (node {fmt(site.get('cpu_count'))})" if site.get("cpu_count") else ""
    return f"{fmt(site.get('job_cores'))}{node}"


def _display_cohorts(summaries: list[dict], labels: list[str]) -> Table:
    t = Table(
        "cohorts",
        "Cohorts and fold plans",
        ["", *labels],
        note="from the cohort indexes and fold plans; deviation = largest |fold share − 1/k| over the "
        "outer folds (patches, patients); class warnings: a single-class cohort, or a class missing from a "
        "training, validation or test split (metrics on such splits mislead).",
    )
    for cohort in _union(summaries, lambda s: s.get("cohorts", {})):

        def cell(s: dict) -> str:
            c = s.get("cohorts", {}).get(cohort)
            return f"{c['patients']} / {c['images']} ({c['failed']})" if c else "–"

        def totals(s: dict) -> str:
            c = s.get("cohorts", {}).get(cohort)
            return ", ".join(f"{k} {v}" for k, v in c["totals"].items()) if c else "–"

        t.rows.append([f"{cohort}: patients / images (failed)", *[cell(s) for s in summaries]])
        t.rows.append([f"{cohort}: patches per class", *[totals(s) for s in summaries]])
    for study in _union(summaries, lambda s: s.get("folds", {})):

        def plan(s: dict) -> str:
            f = s.get("folds", {}).get(study)
            return f"{f['strategy']} {f['k_outer']}×{f['k_inner']}, {f['balance']}" if f else "–"

        def deviation(s: dict) -> str:
            dev = (s.get("folds", {}).get(study) or {}).get("max_abs_deviation_outer") or {}
            return f"{fmt(dev.get('patches'), 2)}, {fmt(dev.get('patients'), 2)}" if dev else "–"

        def warnings(s: dict) -> str:
            found = (s.get("folds", {}).get(study) or {}).get("warnings") or []
            return ("⚠ " + "; ".join(found)) if found else "none"

        t.rows.append([f"{study}: folds (outer×inner)", *[plan(s) for s in summaries]])
        t.rows.append([f"{study}: max share deviation", *[deviation(s) for s in summaries]])
        t.rows.append([f"{study}: class warnings", *[warnings(s) for s in summaries]])
    return t


def _display_preprocessing(summaries: list[dict], labels: list[str]) -> Table:
    t = Table(
        "preprocessing",
        "Data pre-processing",
        ["", *labels],
        note="extraction ms/patch = the cohort's extraction job wall time ÷ patches extracted (WSI: patch "
        "sampling incl. tissue detection, reading and the QC image; HSI: the whole chain and patch extraction); "
        "per image: mean ± std over images of each job's ms/patch (the figure); data loading ms/patch as "
        "measured by the training jobs (mean ± std over jobs).",
    )
    for cohort in _union(summaries, lambda s: s["preprocessing"]):
        kinds = {s["preprocessing"][cohort]["kind"] for s in summaries if cohort in s["preprocessing"]}
        what = "WSI patch sampling" if kinds == {"wsi"} else "HSI extraction"

        def cell(s: dict, get: Callable[[dict], str]) -> str:
            p = s["preprocessing"].get(cohort)
            return get(p) if p else "–"

        t.rows.append(
            [f"{what} (ms/patch) — {cohort}", *[cell(s, lambda p: fmt(_ms(p["s_per_patch"]))) for s in summaries]]
        )
        t.rows.append(
            [
                f"{what} per image (ms/patch, mean ± std) — {cohort}",
                *[cell(s, lambda p: fmt_ms(_ms_stat(p.get("s_per_patch_images")))) for s in summaries],
            ]
        )
        t.rows.append(
            [
                f"data loading (ms/patch) — {cohort}",
                *[cell(s, lambda p: fmt_ms(p.get("load_ms_per_patch"))) for s in summaries],
            ]
        )
        t.rows.append(
            [
                f"patches (images, failed) — {cohort}",
                *[cell(s, lambda p: f"{p['patches']} ({p['images']}, {p['failed']})") for s in summaries],
            ]
        )
    return t


def _display_training(summaries: list[dict], labels: list[str]) -> Table:
    n_epochs = next((st["epochs_for_time"] for s in summaries for st in s["studies"].values()), 10)
    t = Table(
        "training",
        "Training (accuracy mean ± std over folds)",
        [
            "study",
            "site",
            "model",
            "train patches/job",
            "train acc",
            "val acc",
            "test acc",
            "test acc (refit)",
            "s/epoch",
            f"time of {n_epochs} epochs (s)",
            "nested-CV wall (h)",
            "nested-CV elapsed (h)",
            "GPU-h",
            "CPU core-h",
        ],
        note="train/val accuracy over all inner runs, test accuracy over the outer folds' selected models, "
        "refit: over the models retrained on each whole outer training set (select.refit); nested-CV wall = sum "
        "of the wall times of its train, select, refit, test and predict jobs; elapsed = first start to last finish.",
    )
    for study in _union(summaries, lambda s: s["studies"]):
        for label, s in zip(labels, summaries):
            st = s["studies"].get(study)
            if st is None:
                continue
            t.rows.append(
                [
                    study,
                    label,
                    st["model"],
                    fmt(_mean(st.get("train_patches"))),
                    fmt_metric_ms(st["train_oacc"]),
                    fmt_metric_ms(st["val_oacc"]),
                    fmt_metric_ms(st["test_oacc"]),
                    fmt_metric_ms(st.get("refit_test_oacc")),
                    fmt_ms(st["s_per_epoch"]),
                    fmt(st["time_n_epochs_s"]),
                    fmt(_hours(st["nested_cv_wall_s"])),
                    fmt(_hours(st["nested_cv_elapsed_s"])),
                    fmt(st["gpu_hours"]),
                    fmt(st["cpu_core_hours"]),
                ]
            )
    return t


def _display_nested_cv(summaries: list[dict], labels: list[str]) -> Table:
    positives = {
        (f.get("test") or {}).get("positive_class")
        for s in summaries
        for st in s["studies"].values()
        for f in st["outer"]
    } - {None}
    positive = positives.pop() if len(positives) == 1 else "positive-class"
    t = Table(
        "nested_cv",
        "Nested cross-validation: test results per outer fold",
        [
            "study",
            "outer fold",
            "site",
            "selected inner",
            "test patients",
            "test patches",
            "OACC",
            f"{positive} sensitivity",
            "specificity",
            "AUC",
        ],
        note="sensitivity/specificity of the study's positive class vs the rest; AUC: of the positive class for "
        "two classes, macro one-vs-rest for more; selected inner = the best inner model on validation, refit = "
        "the selected configuration retrained on the whole outer training set (select.refit); last rows per "
        "site: mean ± std over outer folds of each.",
    )
    for study in _union(summaries, lambda s: s["studies"]):
        outers = sorted(
            {f.get("outer") for s in summaries for f in (s["studies"].get(study) or {}).get("outer", [])},
            key=lambda o: (o is None, o),
        )
        for outer in outers:
            for label, s in zip(labels, summaries):
                for fold in (s["studies"].get(study) or {}).get("outer", []):
                    if fold.get("outer") != outer:
                        continue
                    for model, test in _fold_tests(fold):
                        t.rows.append(
                            [
                                study,
                                fmt(outer),
                                label,
                                fmt(fold.get("selected_inner")) if model == "selected" else "refit",
                                patient_list(fold.get("test_patients")),
                                fmt(test.get("n")),
                                *[fmt_metric(test.get(m)) for m in ("oacc", "sensitivity", "specificity", "auc")],
                            ]
                        )
        for label, s in zip(labels, summaries):
            st = s["studies"].get(study)
            if st and st["outer"]:
                for name, prefix in (("mean ± std", "test_"), ("refit: mean ± std", "refit_test_")):
                    if name.startswith("refit") and not (st.get("refit_test_oacc") or {}).get("n"):
                        continue
                    t.rows.append(
                        [
                            study,
                            name,
                            label,
                            "",
                            "",
                            "",
                            *[
                                fmt_metric_ms(st.get(f"{prefix}{m}"))
                                for m in ("oacc", "sensitivity", "specificity", "auc")
                            ],
                        ]
                    )
    return t


def _any_per_class(summaries: list[dict]) -> bool:
    return any(
        (f.get("test") or {}).get("per_class_recall")
        for s in summaries
        for st in s["studies"].values()
        for f in st["outer"]
    )


def _display_per_class(summaries: list[dict], labels: list[str]) -> Table:
    """Recall of every class (any number of classes) and macro F1, mean ± std over the outer folds."""
    t = Table(
        "per_class",
        "Per-class test recall (mean ± std over outer folds)",
        ["study", "class", *labels],
        note="recall = share of a class's test patches predicted as that class; patches = test patches of the "
        "class summed over the outer folds; macro F1 = unweighted mean of the per-class F1.",
    )
    for study in _union(summaries, lambda s: s["studies"]):
        folds = [(s["studies"].get(study) or {}).get("outer", []) for s in summaries]
        names = _union(
            [{"f": fs} for fs in folds],
            lambda d: {n: 1 for f in d["f"] for n in (f.get("test") or {}).get("class_names") or []},
        )
        for name in names:
            cells = []
            for fs in folds:
                recalls = [((f.get("test") or {}).get("per_class_recall") or {}).get(name) for f in fs]
                patches = [((f.get("test") or {}).get("support") or {}).get(name) for f in fs]
                n = sum(int(p) for p in patches if p is not None)
                cells.append(f"{fmt_metric_ms(metrics_mean_std(recalls))} ({n} patches)" if fs else "–")
            t.rows.append([study, name, *cells])
        t.rows.append(
            [
                study,
                "macro F1",
                *[fmt_metric_ms(metrics_mean_std((f.get("test") or {}).get("macro_f1") for f in fs)) for fs in folds],
            ]
        )
    return t


def patient_list(patients: Any, limit: int = 12) -> str:
    """Test patient ids (the first ``limit``, then how many more); report.json and the CSV list all."""
    if patients is None:
        return "–"
    if not isinstance(patients, list):  # a summary written before the ids were kept: a count
        return fmt(patients)
    shown = ", ".join(map(str, patients[:limit]))
    return shown + (f", … (+{len(patients) - limit})" if len(patients) > limit else "")


def _display_stages(summaries: list[dict], labels: list[str]) -> Table:
    t = Table(
        "stages",
        "Stage timings per job type (s, mean ± std over jobs)",
        ["job", "stage", *labels],
        note="stages of a job do not overlap and 'other' is its wall time not in a stage, so the stage means add "
        "up to the mean job wall time (a stage a job did not run counts 0 s).",
    )
    for job in _union(summaries, lambda s: s["stages"]):
        stage_names = ["wall", *_union(summaries, lambda s: (s["stages"].get(job) or {}).get("timings_s", {}))]
        for stage in stage_names:
            cells = []
            for s in summaries:
                st = s["stages"].get(job)
                if st is None:
                    cells.append("–")
                    continue
                stat = st["wall_s"] if stage == "wall" else st["timings_s"].get(stage)
                cells.append(fmt_ms(stat))
            t.rows.append(
                [
                    job if stage == "wall" else "",
                    stage if stage != "wall" else f"job wall ({_jobs(summaries, job)})",
                    *cells,
                ]
            )
    return t


def _jobs(summaries: list[dict], job: str) -> str:
    return " / ".join(str((s["stages"].get(job) or {}).get("n", 0)) for s in summaries) + " jobs"


def _display_energy(summaries: list[dict], labels: list[str]) -> Table:
    t = Table(
        "energy",
        "Energy and CO₂ estimate (all jobs)",
        ["", *labels],
        note="kWh = (GPU-h × W per GPU + CPU core-h × W per core) × PUE ÷ 1000; CO₂ = kWh × carbon intensity. "
        "Jobs that used GPUs count GPU-hours only.",
    )
    rows = [
        ("GPU-hours", lambda e: fmt(e["total"]["gpu_hours"])),
        ("CPU core-hours", lambda e: fmt(e["total"]["cpu_core_hours"])),
        ("energy (kWh)", lambda e: fmt(e["total"]["kwh"])),
        ("CO₂ (g)", lambda e: fmt(e["total"]["co2_g"])),
        (
            "power W/GPU, W/core",
            lambda e: f"{fmt(e['params']['power_w']['gpu'])}, {fmt(e['params']['power_w']['cpu_core'])}",
        ),
        ("PUE", lambda e: fmt(e["params"]["pue"])),
        ("carbon intensity (g/kWh)", lambda e: fmt(e["params"]["carbon_g_per_kwh"])),
    ]
    for name, get in rows:
        t.rows.append([name, *[get(s["energy"]) for s in summaries]])
    return t


def _display_bench(summaries: list[dict], labels: list[str]) -> Table:
    t = Table("bench", "Node benchmark (`medflow bench`, per host)", ["metric", *labels])
    metrics = _union(summaries, lambda s: {m: 1 for host in s.get("bench", {}).values() for m in host["metrics"]})
    for metric in metrics:
        cells = []
        for s in summaries:
            vals = [fmt(h["metrics"][metric]) for h in s.get("bench", {}).values() if metric in h["metrics"]]
            cells.append(", ".join(vals) or "–")
        t.rows.append([metric, *cells])
    return t


# ---- writers -----------------------------------------------------------------------------------
def csv_text(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow([_csv_cell(v) for v in row])
    return buf.getvalue()


def _csv_cell(value: Any) -> Any:
    """Full precision floats, lists (patient ids) space-separated, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return " ".join(map(str, value))
    return value


def markdown_table(table: Table) -> str:
    def esc(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(esc(c) for c in table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)

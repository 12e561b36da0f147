"""Whole-slide results in the summary and the report: slide-level metrics and FROC per outer fold
(from `slide-metrics` records), mean ± std over folds and pooled over all test slides, the
heatmaps of `predict-wsi` and the Grad-CAM grids of `grad-cam`.

Summary key ``wsi_results``: ``{study: {folds: [{outer, slide{n, positives, auc, sensitivity,
specificity, threshold}, froc{score, fp_rates, sensitivity, slides, lesions} | null, slides[]}],
aggregate{auc, sensitivity, specificity, froc: mean_std}, pooled{slide{...}, froc{...}},
tiles_per_s{mean_std}, heatmaps[{outer, image_id, png, score, label}], gradcam[{outer, png}]}}``
(paths relative to the site directory).
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..core import fsio
from ..core.metrics import mean_std
from ..predict import froc
from ..predict.slide_metrics import slide_metrics
from .tables import Table, fmt, fmt_ms

JOBS = ("predict-wsi", "slide-metrics", "grad-cam")


def _rel(path: Path, site_dir: Path) -> str:
    return str(path.resolve().relative_to(site_dir))


def summarize(records: dict[str, list[dict]], site_dir: Path) -> dict[str, dict[str, Any]]:
    site_dir = Path(site_dir).resolve()
    by_study: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for job in JOBS:
        for rec in records.get(job, []):
            if rec.get("status") == "ok" and rec.get("study"):
                by_study[str(rec["study"])][job].append(rec)
    out = {}
    for study, jobs in sorted(by_study.items()):
        folds = sorted(jobs["slide-metrics"], key=lambda r: (r.get("outer") is None, r.get("outer")))
        slides = [s for f in folds for s in f.get("slides") or []]
        threshold = folds[0]["slide"]["threshold"] if folds else None
        pooled_froc = froc.froc([m for f in folds for m in f.get("lesion_matches") or []])
        out[study] = {
            "folds": [
                {k: f.get(k) for k in ("outer", "slide", "froc", "slides", "aggregation", "top_k")} for f in folds
            ],
            "aggregate": {
                **{k: mean_std(f["slide"].get(k) for f in folds) for k in ("auc", "sensitivity", "specificity")},
                "froc": mean_std((f.get("froc") or {}).get("score") for f in folds),
            },
            "pooled": {
                "slide": slide_metrics([s["score"] for s in slides], [s["label"] for s in slides], threshold)
                if slides and threshold is not None
                else None,
                "froc": pooled_froc,
            },
            "tiles_per_s": mean_std((r.get("throughput") or {}).get("tiles_per_s") for r in jobs["predict-wsi"]),
            "heatmaps": [
                {
                    "outer": r.get("outer"),
                    "image_id": r.get("image_id"),
                    "png": _rel(Path(r["_path"]).parent / r["outputs"]["png"], site_dir),
                    "score": (r.get("slide") or {}).get("score"),
                    "label": (r.get("slide") or {}).get("label"),
                }
                for r in sorted(jobs["predict-wsi"], key=lambda r: (r.get("outer") or 0, str(r.get("image_id"))))
                if (r.get("outputs") or {}).get("png")
            ],
            "gradcam": [
                {"outer": r.get("outer"), "png": _rel(Path(r["_path"]).parent / r["figure"], site_dir)}
                for r in sorted(jobs["grad-cam"], key=lambda r: r.get("outer") or 0)
                if r.get("figure")
            ],
        }
    return out


# ---- tables ------------------------------------------------------------------------------------------
def _patch_auc(summary: dict, study: str, outer: Any) -> Any:
    for fold in (summary.get("studies", {}).get(study) or {}).get("outer", []):
        if fold.get("outer") == outer:
            return (fold.get("test") or {}).get("auc")
    return None


def data_tables(summaries: list[dict], labels: list[str]) -> dict[str, Table]:
    folds = Table(
        "slides",
        "Slide-level results per outer fold",
        [
            "site",
            "study",
            "outer",
            "slides",
            "positive_slides",
            "slide_auc",
            "slide_sensitivity",
            "slide_specificity",
            "slide_threshold",
            "froc",
            *[f"froc_sens_at_{r:g}_fp" for r in froc.FP_RATES],
            "lesions",
            "patch_auc",
        ],
    )
    per_slide = Table(
        "slide_scores",
        "Slide scores",
        ["site", "study", "outer", "image_id", "patient_id", "score", "label", "label_source", "tiles", "lesions"],
    )
    for label, s in zip(labels, summaries):
        for study, res in (s.get("wsi_results") or {}).items():
            for f in res["folds"]:
                sm, fr = f.get("slide") or {}, f.get("froc") or {}
                sens = fr.get("sensitivity") or [None] * len(froc.FP_RATES)
                folds.rows.append(
                    [
                        label,
                        study,
                        f.get("outer"),
                        sm.get("n"),
                        sm.get("positives"),
                        sm.get("auc"),
                        sm.get("sensitivity"),
                        sm.get("specificity"),
                        sm.get("threshold"),
                        fr.get("score"),
                        *sens,
                        fr.get("lesions"),
                        _patch_auc(s, study, f.get("outer")),
                    ]
                )
                for sl in f.get("slides") or []:
                    per_slide.rows.append(
                        [label, study, f.get("outer")]
                        + [sl.get(k) for k in ("image_id", "patient_id", "score", "label", "label_source", "tiles")]
                        + [sl.get("lesions")]
                    )
    return {"slides": folds, "slide_scores": per_slide}


def display_table(summaries: list[dict], labels: list[str]) -> Table | None:
    if not any(s.get("wsi_results") for s in summaries):
        return None
    t = Table(
        "slides",
        "Whole-slide results: slide-level metrics per outer fold (beside the patch AUC)",
        [
            "study",
            "outer fold",
            "site",
            "test slides (positive)",
            "slide AUC",
            "slide sensitivity",
            "slide specificity",
            "FROC",
            "lesions",
            "patch AUC",
        ],
        note="slide score = aggregation of the tiles' positive-class probabilities (predict_wsi.aggregation); "
        "sensitivity/specificity at score ≥ predict_wsi.slide_threshold; FROC = CAMELYON16 (mean lesion "
        "sensitivity at 1/4–8 false positives per slide; – without lesion annotations); AUC – when a fold's "
        "test slides are all of one class. 'pooled' = every outer fold's test slides together.",
    )
    for label, s in zip(labels, summaries):
        for study, res in (s.get("wsi_results") or {}).items():
            for f in res["folds"]:
                sm, fr = f.get("slide") or {}, f.get("froc") or {}
                t.rows.append(
                    [
                        study,
                        fmt(f.get("outer")),
                        label,
                        f"{fmt(sm.get('n'))} ({fmt(sm.get('positives'))})",
                        fmt(sm.get("auc")),
                        fmt(sm.get("sensitivity")),
                        fmt(sm.get("specificity")),
                        fmt(fr.get("score")),
                        fmt(fr.get("lesions")),
                        fmt(_patch_auc(s, study, f.get("outer"))),
                    ]
                )
            agg = res["aggregate"]
            t.rows.append(
                [study, "mean ± std", label, "", *[fmt_ms(agg[k]) for k in ("auc", "sensitivity", "specificity")]]
                + [fmt_ms(agg["froc"]), "", fmt_ms((s.get("studies", {}).get(study) or {}).get("test_auc"))]
            )
            pooled, pfroc = res["pooled"].get("slide") or {}, res["pooled"].get("froc") or {}
            t.rows.append(
                [
                    study,
                    "pooled",
                    label,
                    f"{fmt(pooled.get('n'))} ({fmt(pooled.get('positives'))})",
                    *[fmt(pooled.get(k)) for k in ("auc", "sensitivity", "specificity")],
                    fmt(pfroc.get("score")),
                    fmt(pfroc.get("lesions")),
                    "",
                ]
            )
    return t


# ---- figures -----------------------------------------------------------------------------------------
def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def _copy(src: Path, dest: Path) -> bool:
    if not src.is_file():
        return False
    with fsio.atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return True


def copy_figures(summaries: list[dict], labels: list[str], out_dir: Path) -> list[dict[str, Any]]:
    """Heatmaps (kind "heatmap") and Grad-CAM grids (kind "gradcam") copied next to the report's figures."""
    figures = []
    for label, s in zip(labels, summaries):
        for study, res in (s.get("wsi_results") or {}).items():
            for h in res.get("heatmaps", []):
                name = _safe(f"heatmap_{label}_{study}_outer{h.get('outer')}_{h['image_id']}")
                if _copy(Path(s["site_dir"]) / h["png"], out_dir / f"{name}.png"):
                    score = h.get("score")
                    figures.append(
                        {
                            "name": name,
                            "title": f"{h['image_id']} — {label}, {study}, outer fold {h.get('outer')}",
                            "path": f"figures/{name}.png",
                            "abs_path": str(out_dir / f"{name}.png"),
                            "kind": "heatmap",
                            "caption": f"slide score {score:.3f}, label {'positive' if h.get('label') else 'negative'}"
                            if score is not None
                            else "",
                        }
                    )
            for g in res.get("gradcam", []):
                name = _safe(f"gradcam_{label}_{study}_outer{g.get('outer')}")
                if _copy(Path(s["site_dir"]) / g["png"], out_dir / f"{name}.png"):
                    figures.append(
                        {
                            "name": name,
                            "title": f"Grad-CAM — {label}, {study}, outer fold {g.get('outer')}",
                            "path": f"figures/{name}.png",
                            "abs_path": str(out_dir / f"{name}.png"),
                            "kind": "gradcam",
                            "caption": "rows: true class, correctly / wrongly classified; map of the predicted class",
                        }
                    )
    return figures

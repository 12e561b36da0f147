"""Slide QC in the report: one row per WSI extraction record, flags, and the QC image gallery.

Each ``extract-wsi`` record names its QC image (``qc.png``, written next to the shard) and carries the
tissue fraction and area and the patches read and rejected. The report flags slides with little
tissue or many quality-rejected patches (thresholds ``report.qc``), lists the flagged ones in a
table, and shows every slide's QC image as a small embedded thumbnail (flagged first, up to
``report.qc.max_slides``) linking to the full-size copy in ``figures/qc/`` next to the report.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from ..core import fsio
from .stats import finite
from .tables import Table, fmt

QC_DIR = "qc"  # below the report's figures/ directory
THUMB_QUALITY = 80  # JPEG quality of the embedded thumbnails (~10–20 kB each)


# ---- summary.json: one row per slide ------------------------------------------------------------
def slide_rows(records: dict[str, list[dict]], site_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Per WSI cohort, per slide: QC image (relative to ``site_dir``), tissue, patches read / rejected."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in sorted(records.get("extract-wsi", []), key=lambda r: str(r.get("image_id"))):
        out.setdefault(str(rec.get("cohort")), []).append(_row(rec, Path(site_dir)))
    return out


def _row(rec: dict, site_dir: Path) -> dict[str, Any]:
    wsi, qc = rec.get("wsi") or {}, rec.get("qc") or {}
    png = None
    if qc.get("png") and rec.get("_path"):
        path = (Path(rec["_path"]).parent / qc["png"]).resolve()
        png = str(path.relative_to(site_dir.resolve())) if path.is_relative_to(site_dir.resolve()) else str(path)
    read, rejected = rec.get("patches_read"), rec.get("quality_rejected")
    return {
        "image_id": rec.get("image_id"),
        "patient_id": rec.get("patient_id"),
        "status": rec.get("status"),
        "error": rec.get("error"),
        "png": png,
        "tissue_fraction": wsi.get("tissue_fraction"),
        "tissue_mm2": wsi.get("tissue_mm2"),
        "n_patches": rec.get("n_patches"),
        "counts": rec.get("counts") or {},
        "patches_read": read,
        "quality_rejected": rejected,
        "rejected_fraction": rejected / read if read and rejected is not None else None,
    }


# ---- flags --------------------------------------------------------------------------------------
def thresholds(cfg: dict) -> dict[str, float]:
    qc = cfg.get("report", {}).get("qc", {})
    return {
        "min_tissue_fraction": float(qc.get("min_tissue_fraction", 0.05)),
        "min_tissue_mm2": float(qc.get("min_tissue_mm2", 0.0)),
        "max_rejected_fraction": float(qc.get("max_rejected_fraction", 0.25)),
    }


def flags(row: dict[str, Any], th: dict[str, float]) -> list[str]:
    """Why a slide needs a look: failed, little tissue (fraction or area), many rejected patches."""
    if row.get("status") != "ok":
        return ["failed"]
    out = []
    fraction, area = finite([row.get("tissue_fraction")]), finite([row.get("tissue_mm2")])
    if (fraction and fraction[0] < th["min_tissue_fraction"]) or (area and area[0] < th["min_tissue_mm2"]):
        out.append("little tissue")
    rejected = finite([row.get("rejected_fraction")])
    if rejected and rejected[0] > th["max_rejected_fraction"]:
        out.append("many rejected")
    return out


def _slides(summaries: list[dict], labels: list[str]) -> list[tuple[str, str, dict]]:
    return [
        (label, cohort, row)
        for label, s in zip(labels, summaries)
        for cohort, rows in (s.get("slide_qc") or {}).items()
        for row in rows
    ]


# ---- tables -------------------------------------------------------------------------------------
def data_table(summaries: list[dict], labels: list[str], cfg: dict) -> Table:
    """Tidy: one row per slide and site, full precision, with its flags."""
    th = thresholds(cfg)
    columns = ["site", "cohort", "image_id", "patient_id", "status", "tissue_fraction", "tissue_mm2"]
    columns += ["patches_read", "quality_rejected", "rejected_fraction", "n_patches", "flags", "png"]
    t = Table("slide_qc", "Slide QC", columns)
    for label, cohort, row in _slides(summaries, labels):
        t.rows.append([label, cohort, *[row.get(c) for c in columns[2:-2]], "; ".join(flags(row, th)), row.get("png")])
    return t


def display_table(summaries: list[dict], labels: list[str], cfg: dict) -> Table:
    """The flagged slides (all sites), with the thresholds in the note."""
    th = thresholds(cfg)
    slides = _slides(summaries, labels)
    flagged = [(label, cohort, row, flags(row, th)) for label, cohort, row in slides]
    flagged = [item for item in flagged if item[3]]
    area = f" or < {fmt(th['min_tissue_mm2'])} mm²" if th["min_tissue_mm2"] > 0 else ""
    t = Table(
        "slide_qc",
        "Slide QC: flagged slides",
        ["site", "cohort", "slide", "tissue (% of slide, mm²)", "patches read", "rejected", "stored", "flags"],
        note=f"{len(flagged)} of {len(slides)} slides flagged: little tissue = tissue mask "
        f"< {100 * th['min_tissue_fraction']:g} % of the slide{area}; many rejected = more than "
        f"{100 * th['max_rejected_fraction']:g} % of the patches read rejected by wsi.quality "
        "(thresholds: report.qc). Every slide's QC image is under 'Slide QC images'.",
    )
    for label, cohort, row, why in flagged:
        t.rows.append(
            [
                label,
                cohort,
                row.get("image_id"),
                _tissue_cell(row),
                fmt(row.get("patches_read")),
                _percent(row.get("rejected_fraction")),
                fmt(row.get("n_patches")),
                ", ".join(why) + (f": {row['error']}" if row.get("error") else ""),
            ]
        )
    if not flagged:
        t.rows.append(["–", "–", "no slide flagged", "", "", "", "", ""])
    return t


def _percent(value: Any) -> str:
    v = finite([value])
    return f"{100 * v[0]:.1f} %" if v else "–"


def _tissue_cell(row: dict) -> str:
    area = finite([row.get("tissue_mm2")])
    return _percent(row.get("tissue_fraction")) + (f" ({area[0]:.2f} mm²)" if area else "")


# ---- gallery ------------------------------------------------------------------------------------
def gallery(summaries: list[dict], labels: list[str], figures_dir: Path, cfg: dict) -> list[dict[str, Any]]:
    """Copy each QC image to ``figures_dir/qc/``; a figure entry (kind "qc") per slide, flagged first,
    the first ``report.qc.max_slides`` with an embedded JPEG thumbnail (``thumb_uri``)."""
    qc_cfg = cfg.get("report", {}).get("qc", {})
    max_slides, thumb_px = int(qc_cfg.get("max_slides", 60)), int(qc_cfg.get("thumb_px", 240))
    th = thresholds(cfg)
    entries: list[dict[str, Any]] = []
    for label, cohort, row in _slides(summaries, labels):
        site_dir = Path(next(s["site_dir"] for lab, s in zip(labels, summaries) if lab == label))
        src = site_dir / row["png"] if row.get("png") else None
        if src is None or not src.is_file():
            continue
        name = _safe(f"{label}_{cohort}_{row['image_id']}")
        dest = Path(figures_dir) / QC_DIR / f"{name}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fsio.atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        why = flags(row, th)
        entries.append(
            {
                "name": f"qc_{name}",
                "title": f"{row['image_id']} ({label}, {cohort})",
                "path": f"figures/{QC_DIR}/{name}.png",
                "abs_path": str(dest),
                "kind": "qc",
                "flags": why,
                "caption": f"tissue {_tissue_cell(row)}, {fmt(row.get('n_patches'))} patches, "
                f"{_percent(row.get('rejected_fraction'))} rejected",
            }
        )
    entries.sort(key=lambda e: not e["flags"])  # stable: flagged first, then manifest order
    for entry in entries[:max_slides]:
        entry["thumb_uri"] = thumbnail_uri(Path(entry["abs_path"]), thumb_px)
    return entries


def thumbnail_uri(path: Path, width: int) -> str:
    """A small JPEG of the QC image as a data: URI (the HTML stays one file of modest size)."""
    with Image.open(path) as img:
        small = img.convert("RGB")
        small.thumbnail((width, 4 * width), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def markdown(figures: list[dict[str, Any]]) -> list[str]:
    """The Markdown lines linking every QC image (flags first)."""
    qc = [f for f in figures if f.get("kind") == "qc"]
    if not qc:
        return []
    lines = ["## Slide QC images", ""]
    for f in qc:
        flag = f" — **{', '.join(f['flags'])}**" if f["flags"] else ""
        lines.append(f"- [{f['title']}]({f['path']}): {f['caption']}{flag}")
    return [*lines, ""]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))

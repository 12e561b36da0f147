"""`medflow report`: per-site timing and accuracy report from one or more site summaries.

Writes, into ``--out-dir``: ``report.md``, ``report.html`` (self-contained), ``report.json`` and the
tables as CSV (``preprocessing.csv``, ``training.csv``, ``stages.csv``, ``nested_cv.csv``,
``energy.csv``, ``sites.csv``) plus ``figures/*.png``. Tables: `medflow.report.tables`; plots:
`medflow.report.plots`; HTML: `medflow.report.html`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core import config as config_mod
from ..core import fsio
from ..core.errors import InputError
from ..core.records import now_iso
from . import html_page, slide_qc, wsi_results
from . import plots as report_plots
from . import summary as summary_mod
from .tables import CSV_TABLES, Table, csv_text, data_tables, display_tables, markdown_table, site_labels

REPORT_FORMAT = "medflow-report/1"


def markdown(title: str, generated: str, display: list[Table], figures: list[dict]) -> str:
    parts = [
        f"# {title}",
        "",
        f"Generated {generated} by medflow from the job records of "
        f"{len(display[0].columns) - 1} site(s). Machine-readable: `report.json` and the CSV files.",
        "",
    ]
    for table in display:
        parts += [f"## {table.title}", "", markdown_table(table), ""]
        if table.note:
            parts += [f"_{table.note}_", ""]
    parts += slide_qc.markdown(figures)
    figures = [f for f in figures if f.get("kind") != "qc"]
    if figures:
        parts += ["## Figures", ""]
        for fig in figures:
            parts += [f"### {fig['title']}", "", f"![{fig['title']}]({fig['path']})", ""]
            if fig.get("caption"):
                parts += [f"_{fig['caption']}_", ""]
    return "\n".join(parts)


def build_report(summaries: list[dict], cfg: dict, out_dir: str | Path) -> dict[str, Any]:
    """Write every report output into ``out_dir`` (each file atomically); return report.json's content."""
    out_dir = Path(out_dir)
    labels = site_labels(summaries)
    title = cfg.get("report", {}).get("title", "medflow study report")
    generated = now_iso()
    tables = {**data_tables(summaries, labels), **wsi_results.data_tables(summaries, labels)}
    display = display_tables(summaries, labels)
    if (slides := wsi_results.display_table(summaries, labels)) is not None:  # beside the patch metrics
        display.insert(next((i + 1 for i, t in enumerate(display) if t.name == "nested_cv"), len(display)), slides)
    figures = report_plots.make_figures(summaries, labels, out_dir / "figures", cfg)
    if any(s.get("slide_qc") for s in summaries):
        tables["slide_qc"] = slide_qc.data_table(summaries, labels, cfg)
        after = next((i + 1 for i, t in enumerate(display) if t.name == "preprocessing"), len(display))
        display.insert(after, slide_qc.display_table(summaries, labels, cfg))
        figures += slide_qc.gallery(summaries, labels, out_dir / "figures", cfg)
    figures += wsi_results.copy_figures(summaries, labels, out_dir / "figures")
    for name in [*CSV_TABLES, "slides", "slide_scores", *(["slide_qc"] if "slide_qc" in tables else [])]:
        fsio.write_text(out_dir / f"{name}.csv", csv_text(tables[name]))
    doc = {
        "format": REPORT_FORMAT,
        "title": title,
        "generated": generated,
        "sites": labels,
        "tables": {name: t.as_json() for name, t in tables.items()},
        "figures": [{k: v for k, v in f.items() if k not in ("abs_path", "thumb_uri")} for f in figures],
        "summaries": dict(zip(labels, summaries)),
    }
    fsio.write_json(out_dir / "report.json", doc)
    fsio.write_text(out_dir / "report.md", markdown(title, generated, display, figures))
    fsio.write_text(out_dir / "report.html", html_page.render(title, generated, labels, summaries, display, figures))
    return doc


# ---- CLI: medflow report -----------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--out-dir", required=True, help="directory for report.{md,html,json}, *.csv, figures/")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="summarise each site's records now even where a summary.json exists (not written back)",
    )
    p.add_argument("site_dirs", nargs="+", help="results/<site> directories (their summary.json is used if present)")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    dirs: list[Path] = []
    for d in [*args.site_dirs, *cfg.get("report", {}).get("sites", [])]:
        path = Path(d)
        if not any(path.resolve() == seen.resolve() for seen in dirs):
            dirs.append(path)
    for d in dirs:
        if not d.is_dir():
            raise InputError(d, "site results directory not found")
    summaries = [summary_mod.summarize(d, cfg) if args.recompute else summary_mod.load_or_build(d, cfg) for d in dirs]
    doc = build_report(summaries, cfg, args.out_dir)
    print(
        f"report {Path(args.out_dir) / 'report.html'}: {len(doc['sites'])} site(s) {', '.join(doc['sites'])}; "
        f"{len(doc['figures'])} figures"
    )
    return 0

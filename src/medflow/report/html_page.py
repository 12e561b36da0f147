"""Self-contained HTML report: inline CSS, figures embedded as base64 PNG, no script, no network asset."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2rem auto;max-width:1500px;
     color:#1d2329;line-height:1.45;padding:0 1rem}
h1{font-size:1.7rem;border-bottom:3px solid #2b6cb0;padding-bottom:.3rem}
h2{font-size:1.25rem;margin-top:2.2rem;color:#2b4c7e}
h3{font-size:1.02rem;margin-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.84rem;font-variant-numeric:tabular-nums;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #cfd6de;padding:.26rem .5rem;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#edf2f7;text-align:center;white-space:normal;min-width:3.5rem}
td:first-child,th:first-child{text-align:left}
tbody tr:nth-child(even){background:#f8fafc}
.note{color:#4a5568;font-size:.83rem;margin-top:0}
.meta{color:#4a5568;font-size:.88rem}
figure{margin:1rem 0 1.8rem 0}
figure img{max-width:100%;border:1px solid #e2e8f0}
figcaption{color:#4a5568;font-size:.85rem}
nav a{margin-right:1rem}
.maps{display:flex;flex-wrap:wrap;gap:1rem}
.maps figure{flex:0 1 520px}
.maps figure img{width:100%}
.qc{display:flex;flex-wrap:wrap;gap:.8rem}
.qc figure{flex:0 0 250px;margin:0}
.qc figure img{width:100%;border:2px solid #e2e8f0}
.qc figure.flagged img{border-color:#c53030}
.qc .flags{color:#c53030;font-weight:600}
"""


# Figure kinds shown as galleries of small multiples after the figures: kind → (anchor, heading).
GALLERIES = {
    "heatmap": ("heatmaps", "Whole-slide heatmaps (outer test slides)"),
    "gradcam": ("gradcam", "Grad-CAM of test patches (interpretability)"),
}


def _cell(value: Any) -> str:
    return html.escape(str(value))


def table_html(table: Any) -> str:
    head = "".join(f"<th>{_cell(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{_cell(table.note)}</p>' if table.note else ""
    return (
        f'<h2 id="{_cell(table.name)}">{_cell(table.title)}</h2>\n'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n{note}"
    )


def embedded_png(path: str | Path) -> str:
    """A data: URI, so the report is one file that opens without network or sibling files."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def figure_html(fig: dict[str, Any]) -> str:
    caption = f"{fig['title']}" + (f" — {fig['caption']}" if fig.get("caption") else "")
    return (
        f'<figure id="fig-{_cell(fig["name"])}"><img alt="{_cell(fig["title"])}" src="{embedded_png(fig["abs_path"])}">'
        f"<figcaption>{_cell(caption)}</figcaption></figure>"
    )


def qc_gallery_html(entries: list[dict[str, Any]]) -> list[str]:
    """Slide QC small multiples: embedded thumbnails linking to the full-size images next to the report;
    slides beyond the embedded ones are listed as links."""
    if not entries:
        return []
    shown = [e for e in entries if e.get("thumb_uri")]
    rest = [e for e in entries if not e.get("thumb_uri")]
    parts = [
        '<h2 id="slide-qc-images">Slide QC images</h2>',
        '<p class="note">Tissue-mask contour, annotations and the stored patches by class (grey: rejected by '
        "wsi.quality). Click a thumbnail for the full-size image (<code>figures/qc/</code> next to this report); "
        "flagged slides first, outlined red.</p>",
        '<div class="qc">',
    ]
    for e in shown:
        flags = f'<br><span class="flags">{_cell(", ".join(e["flags"]))}</span>' if e["flags"] else ""
        parts.append(
            f'<figure class="{"flagged" if e["flags"] else ""}"><a href="{_cell(e["path"])}">'
            f'<img alt="QC {_cell(e["title"])}" src="{e["thumb_uri"]}"></a>'
            f"<figcaption>{_cell(e['title'])}: {_cell(e['caption'])}{flags}</figcaption></figure>"
        )
    parts.append("</div>")
    if rest:
        links = ", ".join(f'<a href="{_cell(e["path"])}">{_cell(e["title"])}</a>' for e in rest)
        parts.append(f'<p class="note">{len(rest)} more (report.qc.max_slides): {links}</p>')
    return parts


def render(
    title: str,
    generated: str,
    labels: list[str],
    summaries: list[dict],
    tables: list[Any],
    figures: list[dict[str, Any]],
) -> str:
    nav = "".join(f'<a href="#{_cell(t.name)}">{_cell(t.title)}</a>' for t in tables)
    plots = [f for f in figures if f.get("kind") not in ("map", "qc", *GALLERIES)]
    maps = [f for f in figures if f.get("kind") == "map"]
    qc = [f for f in figures if f.get("kind") == "qc"]
    qc_link = '<a href="#slide-qc-images">Slide QC images</a>' if qc else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_cell(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_cell(title)}</h1>",
        f'<p class="meta">Generated {_cell(generated)} by medflow from the job records of {len(labels)} site(s): '
        f"{_cell(', '.join(labels))}. The same numbers are in <code>report.json</code> and the CSV files.</p>",
        f'<nav>{nav}{qc_link}<a href="#figures">Figures</a></nav>',
        *[table_html(t) for t in tables],
        *qc_gallery_html(qc),
        '<h2 id="figures">Figures</h2>',
        *[figure_html(f) for f in plots],
    ]
    if maps:
        parts += [
            '<h2 id="maps">HSI classification maps</h2>',
            '<div class="maps">',
            *[figure_html(f) for f in maps],
            "</div>",
        ]
    for kind, (anchor, heading) in GALLERIES.items():
        if gallery := [f for f in figures if f.get("kind") == kind]:
            parts += [
                f'<h2 id="{anchor}">{heading}</h2>',
                '<div class="maps">',
                *[figure_html(f) for f in gallery],
                "</div>",
            ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

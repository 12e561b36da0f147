#!/usr/bin/env python
"""Cost of the per-slide QC image (`wsi.qc`) next to the extraction it belongs to, side by side in one run.

For each slide: `medflow.extract.wsi.job.extract_slide` end to end with the QC image (`wsi.qc.max_px`
1024) and without it (0), alternating, ``--repeats`` times each; prints the median job wall time of
both, the median ``timings_s.qc`` (thumbnail read + drawing + PNG write), QC ms per slide as a share of
the extraction, and the PNG's size. Slides: a demo slide (`medflow.demo.content.make_slide`, 3072×2048 at
0.5 µm/px, the demo's extraction settings) and, when ../shared/data is present, CMU-1-Small-Region and
the TCGA frozen section (0.5 µm/px patches). Usage:

    .venv/bin/python benchmarks/bench_qc.py [--repeats 5] [--per-class N] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medflow.core import config as config_mod  # noqa: E402
from medflow.core.manifest import ImageEntry  # noqa: E402
from medflow.demo.content import make_slide  # noqa: E402
from medflow.extract.wsi import job as wsi  # noqa: E402
from medflow.extract.wsi.annotations import write_asap_xml  # noqa: E402
from medflow.extract.wsi.pyramid import write_pyramid_tiff  # noqa: E402

SHARED = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))


def slides(work: Path) -> list[tuple[str, ImageEntry, dict]]:
    """(name, manifest entry, wsi overrides)."""
    rgb, polygons = make_slide(np.random.default_rng(0), 3072, 2048, 0.5)
    write_pyramid_tiff(work / "demo.tiff", rgb, mpp=0.5)
    write_asap_xml(work / "demo.xml", {"_0": polygons})
    out = [("demo slide 3072×2048", ImageEntry("demo", "p0", str(work / "demo.tiff"), str(work / "demo.xml")), {})]
    cmu = SHARED / "cmu1_small_region" / "CMU-1-Small-Region.svs"
    tcga = SHARED / "tcga_cr7395_svs" / "tcga-cr-7395-01a-01-ts1.svs"
    if cmu.is_file():
        out.append(("CMU-1-Small-Region 2220×2967", ImageEntry("cmu", "p1", str(cmu)), {"mpp": 0.5}))
    if tcga.is_file():
        out.append(("TCGA 4443×3567", ImageEntry("tcga", "p2", str(tcga), mpp="0.25"), {"mpp": 0.5}))
    return out


PER_CLASS: dict[str, int] = {}  # --per-class overrides the demo's 24 patches per class


def config(overrides: dict, max_px: int) -> dict:
    with open(ROOT / "config.yaml") as fh:
        cfg = yaml.safe_load(fh)  # the demo's settings: mpp 1.0, 24 patches per class
    cfg["cohorts"] = {"bench": {"kind": "wsi", "manifest": "unused.csv"}}
    cfg["wsi"].update({**overrides, "qc": {"max_px": max_px}})
    if PER_CLASS:
        cfg["wsi"]["sampling"]["per_class"] = PER_CLASS["n"]
    return config_mod.validate(cfg)


def measure(entry: ImageEntry, overrides: dict, work: Path, repeats: int) -> dict:
    walls: dict[int, list[float]] = {1024: [], 0: []}
    qc_s, png_bytes, n = [], 0, 0
    for _ in range(repeats):
        for max_px in (1024, 0):
            out = work / f"{entry.image_id}_{max_px}"
            with contextlib.redirect_stdout(io.StringIO()):
                rec = wsi.extract_slide(
                    entry, config(overrides, max_px), "bench", out / "s.h5", out / "s.record.json", force=True
                )
            walls[max_px].append(rec["wall_s"])
            n = rec["n_patches"]
            if max_px:
                qc_s.append(rec["timings_s"]["qc"])
                png_bytes = (out / "s.qc.png").stat().st_size
    with_qc, without = statistics.median(walls[1024]), statistics.median(walls[0])
    qc = statistics.median(qc_s)
    return {
        "patches": n,
        "wall_s_with_qc": with_qc,
        "wall_s_without_qc": without,
        "qc_s": qc,
        "qc_share_of_job": qc / with_qc,
        "png_bytes": png_bytes,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=0, help="patches per class (default: the demo's 24)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.per_class:
        PER_CLASS["n"] = args.per_class
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(
            f"{'slide':<30} {'patches':>7} {'job s (QC)':>11} {'job s (no QC)':>13} {'QC ms':>7} {'QC share':>9} {'PNG kB':>7}"
        )
        for name, entry, overrides in slides(work):
            r = measure(entry, overrides, work, args.repeats)
            results[name] = r
            print(
                f"{name:<30} {r['patches']:>7} {r['wall_s_with_qc']:>11.3f} {r['wall_s_without_qc']:>13.3f} "
                f"{1000 * r['qc_s']:>7.1f} {100 * r['qc_share_of_job']:>8.1f}% {r['png_bytes'] / 1000:>7.0f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

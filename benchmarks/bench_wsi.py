#!/usr/bin/env python
"""WSI extraction speed: the same patch coordinates read three ways, side by side in one run.

(a) medflow end to end (`medflow.wsi.extract_slide`: hash, open, tissue mask, sampling, read,
    quality check, HDF5 shard, fsync, record) — and its read+write phase alone;
(b) a bare loop of `OpenSlide.read_region` → RGB numpy over the shard's coordinates (the decode limit);
(c) histolab 0.7 (own virtualenv: it pins openslide-python 1.3.1 and numpy ≤ 1.24) extracting the
    same coordinates with its tissue check per tile, as its tilers do; plus its RandomTiler for orientation.
Also: 1 vs 2 worker processes (medflow) against a 2-process bare loop, and OpenSlide's tile cache off
(a gigapixel slide does not fit the cache; these small test slides do).

Slides: ../shared/data CMU-1-Small-Region (mpp from metadata) and the TCGA frozen section (no mpp:
an explicit 0.25 µm/px is given) when present, else a synthetic pyramid. Usage:

    .venv/bin/python benchmarks/bench_wsi.py [--patches 1000] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import openslide
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medflow.core import config as config_mod  # noqa: E402
from medflow.core.manifest import ImageEntry  # noqa: E402
from medflow.demo.content import make_slide  # noqa: E402
from medflow.extract.wsi import job as wsi  # noqa: E402
from medflow.extract.wsi.annotations import write_asap_xml  # noqa: E402
from medflow.extract.wsi.pyramid import write_pyramid_tiff  # noqa: E402
from medflow.extract.wsi.slide import slide_mpp  # noqa: E402

SHARED = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
HISTOLAB_PYTHON = Path(os.environ.get("HISTOLAB_PYTHON", "/tmp/histolab-venv/bin/python"))

HISTOLAB_SCRIPT = r"""
import json, sys, tempfile, time
import numpy as np
from histolab.slide import Slide
from histolab.types import CoordinatePair
from histolab.tiler import RandomTiler
from histolab.masks import BiggestTissueBoxMask
path, size, level, coords_file, n_random = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
coords = np.load(coords_file)
out = tempfile.mkdtemp()
slide = Slide(path, processed_path=out)
t0 = time.perf_counter()
kept = 0
for x, y in coords.tolist():
    tile = slide.extract_tile(CoordinatePair(x, y, x + size, y + size), tile_size=(size, size), level=level)
    if tile.has_enough_tissue(tissue_percent=80.0):
        kept += 1
    np.asarray(tile.image)[..., :3]
same = time.perf_counter() - t0
tiler = RandomTiler(tile_size=(size, size), n_tiles=n_random, level=level, seed=7, check_tissue=True,
                    tissue_percent=80.0, prefix="t_", suffix=".png")
t0 = time.perf_counter()
tiler.extract(slide, extraction_mask=BiggestTissueBoxMask())
tiler_s = time.perf_counter() - t0
print(json.dumps({"same_coords_per_s": len(coords) / same, "kept": kept,
                  "random_tiler_per_s": n_random / tiler_s, "n_random": n_random}))
"""


# ---- the three ways --------------------------------------------------------------------------------
def bench_medflow(entry: ImageEntry, cfg: dict, work: Path, cache_bytes: int | None) -> dict:
    out = work / f"{entry.image_id}.h5"
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):  # the job's one-line summary
        rec = wsi.extract_slide(
            entry, cfg, "bench", out, work / f"{entry.image_id}.record.json", cache_bytes=cache_bytes, force=True
        )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = rec["n_patches"]
    return {
        "n": n,
        "end_to_end_per_s": n / wall,
        "cpu_ms_per_patch": 1e3 * cpu / n,
        "phase_per_s": rec["throughput"]["patches_per_s"],
        "timings_s": rec["timings_s"],
        "shard": out,
        "reads": rec["patches_read"],
    }


def _bare_read(path: str, level: int, size: int, coords: np.ndarray, cache_bytes: int | None) -> tuple[float, float]:
    """(wall s, CPU s) of the loop."""
    slide = openslide.OpenSlide(path)
    if cache_bytes is not None:
        slide.set_cache(openslide.OpenSlideCache(cache_bytes))
    out = np.empty((len(coords), size, size, 3), np.uint8)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, (x, y) in enumerate(coords.tolist()):
        out[i] = np.asarray(slide.read_region((x, y), level, (size, size)))[..., :3]
    return time.perf_counter() - t0, time.process_time() - c0


def bench_bare(
    path: str, level: int, size: int, coords: np.ndarray, cache_bytes: int | None, processes: int = 1
) -> tuple[float, float | None]:
    """(patches/s, CPU ms/patch) of plain read_region loops (``processes`` on disjoint parts; wall time)."""
    if processes == 1:
        wall, cpu = _bare_read(path, level, size, coords, cache_bytes)
        return len(coords) / wall, 1e3 * cpu / len(coords)
    ctx = multiprocessing.get_context("fork")
    parts = np.array_split(coords, processes)
    t0 = time.perf_counter()
    with ctx.Pool(processes) as pool:
        pool.starmap(_bare_read, [(path, level, size, p, cache_bytes) for p in parts])
    return len(coords) / (time.perf_counter() - t0), None


def bench_histolab(path: str, level: int, size: int, coords: np.ndarray, work: Path, n_random: int) -> dict | str:
    if not HISTOLAB_PYTHON.exists():
        return f"histolab not installed ({HISTOLAB_PYTHON} missing; see docs/wsi.md)"
    probe = subprocess.run([str(HISTOLAB_PYTHON), "-c", "import histolab"], capture_output=True, text=True)
    if probe.returncode:
        return f"histolab not importable: {probe.stderr.strip().splitlines()[-1:]}"
    np.save(work / "coords.npy", coords)
    run = subprocess.run(
        [
            str(HISTOLAB_PYTHON),
            "-c",
            HISTOLAB_SCRIPT,
            path,
            str(size),
            str(level),
            str(work / "coords.npy"),
            str(n_random),
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode:
        return f"histolab failed: {run.stderr.strip()[-300:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---- set-up ----------------------------------------------------------------------------------------
def slides(work: Path) -> list[tuple[ImageEntry, float | None]]:
    """(manifest entry, explicit level-0 mpp or None) per benchmark slide."""
    cmu = SHARED / "cmu1_small_region" / "CMU-1-Small-Region.svs"
    tcga = SHARED / "tcga_cr7395_svs" / "tcga-cr-7395-01a-01-ts1.svs"
    if cmu.is_file() and tcga.is_file():
        return [
            (ImageEntry("cmu1_small_region", "p0", str(cmu)), None),
            (ImageEntry("tcga_cr7395", "p1", str(tcga), mpp=0.25), 0.25),
        ]
    rgb, polygons = make_slide(np.random.default_rng(0), 4096, 3072, 0.5)
    path = work / "synthetic.tiff"
    write_pyramid_tiff(path, rgb, mpp=0.5)
    write_asap_xml(work / "synthetic.xml", {"_0": polygons})
    return [(ImageEntry("synthetic", "p0", str(path), annotation=str(work / "synthetic.xml")), None)]


def bench_config(per_class: int, level0_mpp: float, workers: int) -> dict:
    with open(ROOT / "config.yaml") as fh:
        cfg = yaml.safe_load(fh)
    cfg["cohorts"] = {"bench": {"kind": "wsi", "manifest": "unused.csv"}}
    cfg["wsi"].update(
        {
            "mpp": level0_mpp,
            "patch_size": 224,
            "workers": workers,
            "sampling": {"mode": "random", "per_class": per_class},
        }
    )
    return config_mod.validate(cfg)


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_slide(entry: ImageEntry, mpp: float | None, args: argparse.Namespace, work: Path) -> dict:
    slide = openslide.OpenSlide(entry.image)
    level0_mpp = mpp or slide_mpp(slide)
    slide.close()
    res: dict = {"slide": entry.image_id, "level0_mpp": level0_mpp}
    caches = [("cache default", None)] + ([("cache off", 0)] if args.cache_off else [])
    for cache_label, cache_bytes in caches:
        a1, a1_phase, b1, a2, b2, a_cpu, b_cpu = [], [], [], [], [], [], []
        coords = None
        for _ in range(args.repeats):
            r = bench_medflow(entry, bench_config(args.patches, level0_mpp, 1), work, cache_bytes)
            a1.append(r["end_to_end_per_s"])
            a1_phase.append(r["phase_per_s"])
            a_cpu.append(r["cpu_ms_per_patch"])
            with h5py.File(r["shard"], "r") as h5:
                coords = h5["coords"][:]
                level, size = int(h5.attrs["level"]), int(h5.attrs["patch_size"])
            rate, cpu = bench_bare(entry.image, level, size, coords, cache_bytes)
            b1.append(rate)
            b_cpu.append(cpu)
            r2 = bench_medflow(entry, bench_config(args.patches, level0_mpp, 2), work, cache_bytes)
            a2.append(r2["end_to_end_per_s"])
            b2.append(bench_bare(entry.image, level, size, coords, cache_bytes, processes=2)[0])
        res[cache_label] = {
            "n": int(len(coords)),
            "a_medflow_per_s": median(a1),
            "a_phase_per_s": median(a1_phase),
            "b_bare_per_s": median(b1),
            "a_2workers_per_s": median(a2),
            "b_2proc_per_s": median(b2),
            "last_timings_s": r["timings_s"],
            "reads": r["reads"],
            # ratios of back-to-back runs cancel slow drifts of a shared machine's load
            "paired_a_b": median([a / b for a, b in zip(a1, b1)]),
            "paired_a2_b2": median([a / b for a, b in zip(a2, b2)]),
            "paired_a2_a1": median([x / y for x, y in zip(a2, a1)]),
            "a_cpu_ms_per_patch": median(a_cpu),
            "b_cpu_ms_per_patch": median(b_cpu),
            "raw": {"a": a1, "b": b1, "a2": a2, "b2": b2, "a_cpu_ms": a_cpu, "b_cpu_ms": b_cpu},
        }
    if args.histolab:
        res["histolab"] = bench_histolab(
            entry.image, level, size, coords[: args.histolab_patches], work, args.histolab_random
        )
    return res


def report(res: dict) -> None:
    print(f"\n== {res['slide']} (level-0 {res['level0_mpp']:.3f} µm/px, 224² RGB patches) ==")
    for label in ("cache default", "cache off"):
        if label not in res:
            continue
        r = res[label]
        print(
            f"  [{label}] n={r['n']} stored; medflow read {r['reads']} (the rest rejected as white/black)"
            f"; medians of the repeats"
        )
        print(
            f"    (a) medflow end to end, 1 worker : {r['a_medflow_per_s']:8.1f} patches/s"
            f"   (read+write phase {r['a_phase_per_s']:.1f}/s)"
        )
        print(f"    (b) bare read_region loop        : {r['b_bare_per_s']:8.1f} patches/s")
        print(
            f"        ratio a/b = {r['a_medflow_per_s'] / r['b_bare_per_s']:.2f}   "
            f"(phase/b = {r['a_phase_per_s'] / r['b_bare_per_s']:.2f}; median of paired runs a/b = {r['paired_a_b']:.2f})"
        )
        print(
            f"        CPU ms/patch (all threads; load-independent): a {r['a_cpu_ms_per_patch']:.2f}, "
            f"b {r['b_cpu_ms_per_patch']:.2f} → b/a = {r['b_cpu_ms_per_patch'] / r['a_cpu_ms_per_patch']:.2f}"
        )
        print(
            f"    (a) medflow, 2 workers           : {r['a_2workers_per_s']:8.1f} patches/s "
            f"(×{r['a_2workers_per_s'] / r['a_medflow_per_s']:.2f} vs 1 worker)"
        )
        print(
            f"    (b) bare loop, 2 processes       : {r['b_2proc_per_s']:8.1f} patches/s "
            f"→ ratio a/b (2 procs) = {r['a_2workers_per_s'] / r['b_2proc_per_s']:.2f} (paired {r['paired_a2_b2']:.2f})"
        )
        print(
            "        stage timings of the last (a) run: "
            + ", ".join(f"{k} {v:.3f}s" for k, v in r["last_timings_s"].items())
        )
    h = res.get("histolab")
    if isinstance(h, dict):
        a = res["cache default"]["a_medflow_per_s"]
        print(
            f"  (c) histolab extract_tile + tissue check, same coords: {h['same_coords_per_s']:.1f} tiles/s"
            f" → ratio a/c = {a / h['same_coords_per_s']:.1f}"
        )
        print(
            f"      histolab RandomTiler ({h['n_random']} tiles, own coords, PNG files): "
            f"{h['random_tiler_per_s']:.1f} tiles/s → ratio a/c = {a / h['random_tiler_per_s']:.1f}"
        )
    elif h is not None:
        print(f"  (c) skipped: {h}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patches", type=int, default=1000, help="patches per slide (random sampling, one class)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-histolab", dest="histolab", action="store_false")
    p.add_argument("--histolab-patches", type=int, default=300, help="coordinates histolab reads (it is slow)")
    p.add_argument("--histolab-random", type=int, default=60, help="tiles for histolab's RandomTiler")
    p.add_argument("--only", default="", help="comma-separated slide names to run (default: all)")
    p.add_argument("--no-cache-off", dest="cache_off", action="store_false", help="skip the cache-off runs")
    p.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="medflow-bench-wsi-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_wsi: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, scratch {work}")
    results = []
    try:
        for entry, mpp in slides(work):
            if args.only and entry.image_id not in args.only.split(","):
                continue
            res = run_slide(entry, mpp, args, work)
            report(res)
            results.append(res)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

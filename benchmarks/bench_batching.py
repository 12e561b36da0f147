#!/usr/bin/env python
"""Extraction batching (issue 12, item 6): `snakemake -n` of a large WSI cohort, one job per slide vs
``wsi.images_per_job`` slides per job, side by side in one run.

A synthetic manifest of N empty placeholder slides (a dry run never reads them, but Snakemake needs
its inputs to exist) and a study on it (5 × 5 nested CV). Prints the extraction jobs each plan
lists and the dry-run wall times (best of ``--repeats``, the two taking turns). Targets (issue 12):
30,000 slides with ``images_per_job: 50`` → ≤ 700 extraction jobs, ≤ 1/5 of the unbatched time.

    .venv/bin/python benchmarks/bench_batching.py [--slides 30000] [--per-job 50] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medflow.bench.inputs import write_placeholder_cohort  # noqa: E402

BIN = Path(sys.executable).parent


def dry_run(work: Path, config: Path) -> tuple[float, dict[str, int]]:
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "--configfile", str(config), "-n", "--cores", "1"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "-d", str(work)], capture_output=True, text=True, env=env, timeout=3600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"dry run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, re.M)}
    return elapsed, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=30_000)
    ap.add_argument("--per-job", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="medflow-batching-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_placeholder_cohort(root / "cohort", args.slides)
        print(f"{args.slides} placeholder slides + manifest in {time.perf_counter() - t0:.1f} s")
        configs = {}
        for per in (1, args.per_job):
            cfg = {
                "results": str(root / "results"),
                "site": {"name": "dry"},
                "cohorts": {"big": {"kind": "wsi", "manifest": str(manifest)}},
                "studies": {"big": {"cohort": "big"}},
                "wsi": {"images_per_job": per},
            }
            configs[per] = root / f"config-{per}.yaml"
            configs[per].write_text(yaml.safe_dump(cfg))
        best: dict[int, float] = {}
        counts: dict[int, dict[str, int]] = {}
        for r in range(args.repeats):
            for per, config in configs.items():
                elapsed, counts[per] = dry_run(root / f"work-{per}", config)
                best[per] = min(best.get(per, float("inf")), elapsed)
                print(f"  round {r + 1}: images_per_job {per:>4}: {elapsed:6.1f} s, {counts[per].get('total')} jobs")
    one, many = best[1], best[args.per_job]
    print(f"\nsnakemake -n, {args.slides} slides (best of {args.repeats}):")
    print(f"{'images_per_job':>15} {'extraction jobs':>16} {'all jobs':>9} {'dry run s':>10} {'ms/slide':>9}")
    for per in configs:
        c = counts[per]
        print(
            f"{per:>15} {c['extract_wsi']:>16} {c['total']:>9} {best[per]:>10.1f} {1000 * best[per] / args.slides:>9.2f}"
        )
    ratio = many / one
    jobs = counts[args.per_job]["extract_wsi"]
    print(f"\nbatched / unbatched dry-run time: {ratio:.3f} (target <= 0.2: {'met' if ratio <= 0.2 else 'NOT met'})")
    print(
        f"extraction jobs with images_per_job {args.per_job}: {jobs} (target <= 700: {'met' if jobs <= 700 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Nested CV on the real SalinasA cube, selected inner model vs refit (select.refit), through the workflow.

SalinasA (../shared/data/salinasA: AVIRIS, 83×86 px, 204 bands, 6 labelled classes) is one scene, so it
is cut into a grid of spatial blocks that stand in for patients (each block its own .npy cube and ground
truth; patients never cross split boundaries, but neighbouring blocks of one field are of course more
alike than two patients — read the numbers as a check of the machinery on real spectra, not as a
generalisation estimate). The DAG (extract-hsi → index → plan-folds → train → select → refit → test →
report) runs with the local profile; the script prints test OACC per outer fold for the selected inner
model and for the refit model, and mean ± std.

    .venv/bin/python benchmarks/salinas_refit.py [--blocks 3x3] [--epochs 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import scipy.io
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / "salinasA"
VALUES = (1, 10, 11, 12, 13, 14)


def write_blocks(out: Path, rows: int, cols: int) -> Path:
    cube = scipy.io.loadmat(DATA / "SalinasA_corrected.mat")["salinasA_corrected"].astype(np.float32)
    gt = scipy.io.loadmat(DATA / "SalinasA_gt.mat")["salinasA_gt"].astype(np.int64)
    lines = ["image_id,patient_id,image,annotation,white,dark,mpp,mask"]
    r_edges = np.linspace(0, cube.shape[0], rows + 1).astype(int)
    c_edges = np.linspace(0, cube.shape[1], cols + 1).astype(int)
    for i in range(rows):
        for j in range(cols):
            name = f"b{i}{j}"
            sl = (slice(r_edges[i], r_edges[i + 1]), slice(c_edges[j], c_edges[j + 1]))
            np.save(out / f"{name}.npy", cube[sl])
            np.save(out / f"{name}_gt.npy", gt[sl])
            lines.append(f"{name},patient_{name},{name}.npy,{name}_gt.npy,,,,")
    (out / "manifest.csv").write_text("\n".join(lines) + "\n")
    return out / "manifest.csv"


def config(manifest: Path, epochs: int) -> dict:
    return {
        "study_name": "salinas",
        "seed": 7,
        "results": "results",
        "site": {"name": "salinas"},
        "cohorts": {"salinas": {"kind": "hsi", "manifest": str(manifest)}},
        "hsi": {
            "chain": {"calibrate": False, "demosaic": False, "correct": True, "normalise": True},
            "patch": 5,
            "per_class": 60,
            "dtype": "float32",
            "border": "reflect",
            "class_names": [f"c{v}" for v in VALUES],
            "class_map": {str(v): i for i, v in enumerate(VALUES)},
        },
        "folds": {"strategy": "kfold", "outer": 3, "inner": 2, "balance": "stratified"},
        "select": {"refit": True},
        "studies": {
            "salinas": {
                "cohort": "salinas",
                "positive_class": "c10",
                "model": {"name": "conv2dnet"},
                "train": {"epochs": epochs, "batch_size": 32, "lr": 0.002, "optimizer": "adam"},
            }
        },
        "launch": {"backend": "horovod", "ranks": 2, "threads_per_rank": 1},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="3x3", help="rows x cols of spatial blocks (pseudo-patients)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--keep", help="run in this directory and keep it (default: a temporary one)")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"salinas_refit: {DATA} not found; nothing to measure", file=sys.stderr)
        return 0
    rows, cols = (int(x) for x in args.blocks.split("x"))
    work = Path(args.keep or tempfile.mkdtemp(prefix="medflow-salinas-"))
    (work / "data").mkdir(parents=True, exist_ok=True)
    manifest = write_blocks(work / "data", rows, cols)
    (work / "config.yaml").write_text(yaml.safe_dump(config(manifest, args.epochs)))
    bin_dir = Path(sys.executable).parent
    cmd = [
        str(bin_dir / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(work),
        "--configfile",
        str(work / "config.yaml"),
        "--profile",
        str(ROOT / "workflow" / "profiles" / "local"),
        "--cores",
        "2",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    )
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    res = work / "results" / "salinas" / "runs" / "salinas"
    selected, refit = [], []
    print(
        f"SalinasA, {rows}×{cols} spatial blocks as patients, conv2dnet 5×5×204, 3 outer × 2 inner folds, "
        f"{args.epochs} epochs"
    )
    print("outer  selected inner  test OACC (selected)  refit epochs  test OACC (refit)")
    for outer_dir in sorted(res.glob("outer*")):
        sel = json.loads((outer_dir / "record.json").read_text())
        ref = json.loads((outer_dir / "refit" / "test" / "record.json").read_text())
        epochs = json.loads((outer_dir / "refit" / "record.json").read_text())["refit"]["epochs"]
        selected.append(sel["metrics"]["test"]["oacc"])
        refit.append(ref["metrics"]["test"]["oacc"])
        print(
            f"{outer_dir.name:<6} {sel['selected_inner']:>14}  {selected[-1]:>20.3f}  {epochs:>12}  {refit[-1]:>17.3f}"
        )
    for name, values in (("selected", selected), ("refit", refit)):
        print(
            f"test OACC {name:<8}: {np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} (mean ± std over outer folds)"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

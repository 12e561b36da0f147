#!/usr/bin/env python
"""Overhead of tracking on a training epoch, measured side by side in one run (issue 14).

The real training job (`medflow.train.fold.train_fold`, one process, the real loader on HDF5 shards)
runs the same fold with four settings, taking turns in every round so load from other processes on a
shared node hits them alike:

- ``off``: no TensorBoard, no MLflow, progress off;
- ``progress``: progress lines only (``progress.mode: lines``, default 30 s interval);
- ``tensorboard``: TensorBoard event files (default ``step_every`` 10) + progress lines;
- ``tb+mlflow``: the above + MLflow runs in a local file store.

Per setting: seconds per epoch = the job's ``timings_s.train`` ÷ epochs (everything in the epoch loop:
steps, BatchNorm recalibration, validation, checkpoint, tracking calls), best and median over rounds,
and the ratio to ``off``; and CPU seconds per epoch of the whole job (all threads of the process,
the TensorBoard writer and MLflow threads included), which other processes on a shared node disturb
far less than wall time. Also the cost of one `Tracker.step` call (the per-step hook) on its own.

    .venv/bin/python benchmarks/bench_tracking.py [--models conv2dnet resnet18] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medflow.bench.inputs import write_synthetic_cohort  # noqa: E402
from medflow.core import fsio  # noqa: E402
from medflow.core.config import validate  # noqa: E402
from medflow.core.index import load_index  # noqa: E402
from medflow.core.records import JobRecord  # noqa: E402
from medflow.train import dist, tracking  # noqa: E402
from medflow.train.checkpoint import Progress  # noqa: E402
from medflow.train.fold import train_fold  # noqa: E402
from medflow.train.inputs import load_fold_job, record_sections  # noqa: E402
from medflow.train.loader import EpochLoader  # noqa: E402
from medflow.train.patchset import PatchSet  # noqa: E402
from medflow.train.splits import make_plan  # noqa: E402

# model → (model config, patch shape, dtype, patches per image, epochs) — demo-like geometry
SETUPS = {
    "conv2dnet": ({"name": "conv2dnet"}, (7, 7, 25), "float16", 1200, 3),
    "resnet18": ({"name": "resnet18", "input_size": 64}, (64, 64, 3), "uint8", 96, 3),
}
VARIANTS = ("off", "progress", "tensorboard", "tb+mlflow")


def make_study(root: Path, model: str) -> dict:
    model_cfg, shape, dtype, per_image, epochs = SETUPS[model]
    images = {f"{model}{i}": (f"P{i}", [0] * (per_image // 2) + [1] * (per_image - per_image // 2)) for i in range(6)}
    index = write_synthetic_cohort(
        root / model / "data",
        images,
        ["normal", "tumour"],
        patch_shape=shape,
        dtype=dtype,
        chunk_patches=32,
        cohort=model,
        kind="wsi" if dtype == "uint8" else "hsi",
    )
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg.update(results=str(root / "results"), study_name="bench")
    cfg["cohorts"] = {model: {"kind": "wsi" if dtype == "uint8" else "hsi", "manifest": "unused.csv"}}
    cfg["studies"] = {model: {"cohort": model, "model": model_cfg, "train": {"epochs": epochs, "batch_size": 16}}}
    cfg["folds"] = {"strategy": "kfold", "outer": 3, "inner": 2, "balance": "stratified"}
    cfg["launch"] = {"backend": "ddp", "ranks": 1, "threads_per_rank": 1}
    cfg = validate(cfg)
    fsio.write_json(root / model / "folds.json", make_plan(load_index(index), cfg, model))
    configs = {}
    for variant in VARIANTS:
        c = copy.deepcopy(cfg)
        c["progress"] = {"mode": "off" if variant == "off" else "lines", "interval_s": 30.0}
        c["tracking"]["tensorboard"]["enabled"] = variant in ("tensorboard", "tb+mlflow")
        c["tracking"]["mlflow"]["uri"] = (root / "mlruns").as_uri() if variant == "tb+mlflow" else ""
        configs[variant] = root / model / f"{variant}.yaml"
        configs[variant].write_text(yaml.safe_dump(c, sort_keys=False))
    return {"index": index, "folds": str(root / model / "folds.json"), "configs": configs, "epochs": epochs}


def run_job(study: dict, model: str, variant: str, out: Path) -> tuple[float, float]:
    """One training job in this process: (wall seconds per epoch of its epoch loop, CPU seconds per epoch)."""
    job = load_fold_job(str(study["configs"][variant]), model, study["index"], study["folds"], 0, 0, str(out))
    out.mkdir(parents=True)
    d = dist.init("ddp", 1)
    record = JobRecord("train", job.cfg, record_sections(model), study=model, outer=0, inner=0)
    cpu0 = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch lines
        train_fold(job, d, record)
    cpu = time.process_time() - cpu0
    return record["timings_s"]["train"] / record["epochs_run"], cpu / record["epochs_run"]


def step_cost(study: dict, model: str, out: Path, calls: int = 20000) -> dict[str, float]:
    """µs per `Tracker.step` call, TensorBoard on (a point every step_every calls) and everything off."""
    costs = {}
    for variant in ("off", "tensorboard"):
        job = load_fold_job(
            str(study["configs"][variant]), model, study["index"], study["folds"], 0, 0, str(out / variant)
        )
        job.out_dir.mkdir(parents=True)
        d = dist.init("ddp", 1)
        pset = PatchSet(job.index, job.patients["train"], 0, 1)
        loader = EpochLoader(pset, batch_size=16, rank=0, world_size=1, shuffle=True, seed=1)
        tracker = tracking.start(job, d, Progress(), loader)
        t0 = time.perf_counter()
        for _ in range(calls):
            tracker.step(16, 0.5, 8.0, 1e-3)
        costs[variant] = 1e6 * (time.perf_counter() - t0) / calls
        if isinstance(tracker, tracking.Guarded) and tracker.inner is not None:
            tracker.inner._abort()  # closes the event files
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    results: dict = {"load_average": os.getloadavg(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        root = Path(tmp)
        for model in args.models:
            study = make_study(root, model)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            cpus: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(args.rounds + 1):  # round 0 warms up (imports, page cache, MLflow's first import)
                for variant in VARIANTS:
                    wall, cpu = run_job(study, model, variant, root / model / "runs" / f"{variant}{r}")
                    if r:
                        times[variant].append(wall)
                        cpus[variant].append(cpu)
            base, cpu_base = statistics.median(times["off"]), statistics.median(cpus["off"])
            rows = {
                v: {
                    "s_per_epoch_best": min(t),
                    "s_per_epoch_median": statistics.median(t),
                    "ratio_median_vs_off": statistics.median(t) / base,
                    "ratio_best_vs_off": min(t) / min(times["off"]),
                    "cpu_s_per_epoch_median": statistics.median(cpus[v]),
                    "cpu_ratio_median_vs_off": statistics.median(cpus[v]) / cpu_base,
                    "all": t,
                    "cpu_all": cpus[v],
                }
                for v, t in times.items()
            }
            costs = step_cost(study, model, root / model / "steps")
            results["models"][model] = {"epochs": study["epochs"], "variants": rows, "step_call_us": costs}
            print(f"\n{model}: seconds per epoch (train loop ÷ epochs), {args.rounds} interleaved rounds")
            print(
                f"  {'variant':<12} {'best':>8} {'median':>8} {'median/off':>11} {'best/off':>9} {'CPU s':>8} {'CPU/off':>8}"
            )
            for v, row in rows.items():
                print(
                    f"  {v:<12} {row['s_per_epoch_best']:8.3f} {row['s_per_epoch_median']:8.3f} "
                    f"{row['ratio_median_vs_off']:11.3f} {row['ratio_best_vs_off']:9.3f} "
                    f"{row['cpu_s_per_epoch_median']:8.3f} {row['cpu_ratio_median_vs_off']:8.3f}"
                )
            print(
                f"  Tracker.step: {costs['off']:.2f} µs/call (TensorBoard off), {costs['tensorboard']:.2f} µs/call (on)"
            )
    results["load_average_after"] = os.getloadavg()
    print(f"\nload average before / after: {results['load_average']} / {results['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

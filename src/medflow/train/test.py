"""`medflow test`: test a model file on the held-out patients of an outer fold (the refit model of
``select.refit``, or any model of the study's cohort). Writes ``predictions.npz`` and ``record.json``
(job "test", last) in ``--out-dir``; the record names the model's digest and its training record."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..core.records import JobRecord
from .outer_test import finish, load_model_for, load_outer_fold, test_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--index", required=True, help="cohort index JSON")
    p.add_argument("--folds", required=True, help="fold plan JSON")
    p.add_argument("--outer", type=int, required=True)
    p.add_argument("--model", required=True, help="model.pt to test (e.g. runs/<study>/outer<i>/refit/model.pt)")
    p.add_argument("--out-dir", required=True)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model_path = Path(args.model)
    fold = load_outer_fold(
        args.config, args.study, args.index, args.folds, args.outer, args.out_dir, {"model": model_path}
    )
    model, meta, transform = load_model_for(fold, model_path)
    record = JobRecord(
        "test",
        fold.cfg,
        (f"studies.{args.study}", "folds"),
        clock_start=t0,
        study=args.study,
        cohort=fold.index["cohort"],
        kind=fold.index["kind"],
        model=fold.study_cfg["model"]["name"],
        outer=args.outer,
        refit=meta.get("inner") is None,
        trained_epochs=meta.get("epochs_run"),
    )
    record["timings_s"]["load_args"] = time.perf_counter() - t0
    record["metrics"] = {"test": test_model(model, fold, record, transform)}
    finish(record, fold, ["predictions.npz"])
    print(f"test {fold.out_dir}: {args.model} test oacc {record['metrics']['test']['oacc']}")
    return 0

"""`medflow select`: per outer fold, pick the best inner model and test it on the outer test patients.

As in the brain-tumour reference's double cross-validation: among the inner models of outer fold
i, the one with the best ``train.selection_metric`` on its own validation patients (default OACC;
ties go to the lowest inner index) is evaluated once on the held-out test patients of fold i
(`medflow.train.outer_test`). Writes ``predictions.npz`` (y_true, y_prob, coords, image_ids),
``model.pt`` (weights-only export of the selected model) and ``record.json`` (last) in
``--out-dir``. One process. With ``select.refit`` the workflow then retrains the selected
configuration on the whole outer training set (`medflow train --selection`) and tests that model
(`medflow test`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from ..core import fsio
from ..core.errors import InputError
from ..core.records import JobRecord
from . import models
from .outer_test import finish, load_model_for, load_outer_fold, relative, test_model


def read_candidates(inner_dirs: list[str], study: str, outer: int, metric: str) -> list[dict[str, Any]]:
    """One {inner, value, dir, record} per finished inner training job, in inner order."""
    out: list[dict[str, Any]] = []
    for directory in inner_dirs:
        path = Path(directory) / "record.json"
        rec = fsio.read_json_document(path, "training record")
        if rec.get("job") != "train" or rec.get("status") != "ok":
            raise InputError(
                path, f"not a finished training job (job {rec.get('job')!r}, status {rec.get('status')!r})"
            )
        if rec.get("study") != study or rec.get("outer") != outer:
            raise InputError(
                path, f"record is study {rec.get('study')!r} outer {rec.get('outer')}, expected {study!r} outer {outer}"
            )
        if rec.get("inner") is None:
            raise InputError(path, "a refit job (no inner fold) has no validation metrics to select by")
        value = ((rec.get("metrics") or {}).get("val") or {}).get(metric)
        out.append({"inner": int(rec["inner"]), "value": value, "dir": str(directory), "record": rec})
    if not out:
        raise InputError(None, "no inner runs given")
    seen: list[int] = [c["inner"] for c in out]
    if len(set(seen)) != len(seen):
        raise InputError(inner_dirs[0], f"inner folds given twice: {sorted(seen)}")
    return sorted(out, key=lambda c: c["inner"])


def choose(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest value wins; undefined values (None/NaN) lose; ties go to the lowest inner index."""

    def key(c: dict[str, Any]) -> tuple[float, int]:
        v = c["value"]
        defined = v is not None and math.isfinite(float(v))
        return (float(v) if defined else -math.inf, -c["inner"])

    return max(candidates, key=key)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--index", required=True, help="cohort index JSON")
    p.add_argument("--folds", required=True, help="fold plan JSON")
    p.add_argument("--outer", type=int, required=True)
    p.add_argument("--inner-dirs", nargs="+", required=True, help="output directories of the inner training jobs")
    p.add_argument("--out-dir", required=True)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    inner_records = {f"inner{i}": Path(d) / "record.json" for i, d in enumerate(args.inner_dirs)}
    fold = load_outer_fold(args.config, args.study, args.index, args.folds, args.outer, args.out_dir, inner_records)
    metric = fold.study_cfg["train"]["selection_metric"]
    candidates = read_candidates(args.inner_dirs, args.study, args.outer, metric)
    best = choose(candidates)
    model, meta, transform = load_model_for(fold, Path(best["dir"]) / "model.pt")
    record = JobRecord(
        "select",
        fold.cfg,
        (f"studies.{args.study}", "folds"),
        clock_start=t0,
        study=args.study,
        cohort=fold.index["cohort"],
        kind=fold.index["kind"],
        model=fold.study_cfg["model"]["name"],
        outer=args.outer,
        selected_inner=best["inner"],
        selection_metric=metric,
        candidates=[{"inner": c["inner"], "value": c["value"]} for c in candidates],
        selected_dir=relative(best["dir"], fold.out_dir),
        selected_epochs=_epochs_of(best["record"]),
    )
    record["timings_s"]["load_args"] = time.perf_counter() - t0
    test = test_model(model, fold, record, transform)
    record["metrics"] = {"val": best["record"]["metrics"].get("val"), "test": test}
    selection = {"selected_inner": best["inner"], "selection_metric": metric, "selection_value": best["value"]}
    models.save_model(fold.out_dir / "model.pt", model, {**meta, **selection, "test_oacc": test["oacc"]})
    finish(record, fold, ["model.pt", "predictions.npz"])
    print(f"select {fold.out_dir}: inner {best['inner']} ({metric} {best['value']}), test oacc {test['oacc']}")
    return 0


def _epochs_of(train_record: dict[str, Any]) -> int:
    """Epochs that produced the selected weights (best validation epoch + 1): what a refit trains for."""
    best_epoch = train_record.get("best_epoch")
    return int(best_epoch) + 1 if best_epoch is not None else int(train_record.get("epochs_run") or 1)

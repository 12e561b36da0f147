"""`medflow select`: per outer fold, pick the best inner model and test it on the outer test patients.

As in the brain-tumour reference's double cross-validation: among the inner models of outer fold
i, the one with the best ``train.selection_metric`` on its own validation patients (default OACC;
ties go to the lowest inner index) is evaluated once on the held-out test patients of fold i.
Writes ``record.json`` (last), ``model.pt`` (weights-only export of the selected model) and
``predictions.npz`` (y_true, y_prob, coords, image_ids) in ``--out-dir``. One process.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import config as config_mod
from ..core import fsio
from ..core.errors import InputError
from ..core.index import load_index
from ..core.metrics import classification_metrics
from ..core.records import JobRecord
from ..core.seeds import stream_seed
from . import dist as dist_mod
from . import models
from .evaluate import predict_set
from .patchset import PatchSet
from .splits import check_index, fold_patients, load_plan
from .stain_setup import check_model_shards, for_shard_patches


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


def write_predictions(
    path: Path, y_true: np.ndarray, y_prob: np.ndarray, coords: np.ndarray, image_ids: np.ndarray
) -> None:
    fsio.write_npz(path, y_true=y_true, y_prob=y_prob, coords=coords, image_ids=image_ids.astype(str))


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
    cfg = config_mod.load(args.config)
    study_cfg = config_mod.study(cfg, args.study, args.config)
    metric = study_cfg["train"]["selection_metric"]
    index = load_index(args.index)
    plan = load_plan(args.folds)
    check_index(plan, index, args.folds)
    try:
        test_patients = fold_patients(plan, args.outer, None)["test"]
    except InputError as exc:
        raise InputError(args.folds, exc.problem) from None
    candidates = read_candidates(args.inner_dirs, args.study, args.outer, metric)
    best = choose(candidates)
    model, meta = models.load_model(Path(best["dir"]) / "model.pt")
    if meta.get("class_names") != index["class_names"]:
        raise InputError(
            Path(best["dir"]) / "model.pt",
            f"classes {meta.get('class_names')} differ from the index's {index['class_names']}",
        )
    if index["kind"] == "wsi":  # test patches prepared as the model's training patches were
        check_model_shards(meta, [s["path"] for s in index["shards"]])
    normaliser = for_shard_patches(meta, Path(best["dir"]) / "model.pt")
    out_dir = Path(args.out_dir)
    record = JobRecord(
        "select",
        cfg,
        (f"studies.{args.study}", "folds"),
        study=args.study,
        cohort=index["cohort"],
        kind=index["kind"],
        model=study_cfg["model"]["name"],
        outer=args.outer,
        selected_inner=best["inner"],
        selection_metric=metric,
        candidates=[{"inner": c["inner"], "value": c["value"]} for c in candidates],
        test_patients=test_patients,
    )
    record["timings_s"]["load_args"] = time.perf_counter() - t0

    d = dist_mod.Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(d.device)
    with record.timed("prepare_test"):
        test_set = PatchSet(
            index,
            test_patients,
            study_cfg["train"]["max_patches"],
            stream_seed(cfg["seed"], args.study, args.outer, "test-set"),
        )
    with record.timed("predict"):
        batch = max(2 * int(study_cfg["train"]["batch_size"]), 64)
        y_true, y_prob, load_s = predict_set(
            model, test_set, d, batch, gather=False, transform=normaliser.apply if normaliser is not None else None
        )
    n = len(test_set)
    record["throughput"]["load_ms_per_patch"] = 1000.0 * load_s / n if n else None
    record["throughput"]["predict_img_per_s"] = n / record["timings_s"]["predict"] if n else None
    test = classification_metrics(y_true, y_prob, index["class_names"], study_cfg["positive_class"])
    record["metrics"] = {"val": best["record"]["metrics"].get("val"), "test": test}
    record["n_patches"] = {"test": n}
    record["selected_dir"] = best["dir"]

    image_ids = np.array([s["image_id"] for s in test_set.shards] or [""], dtype=object)[test_set.shard_of]
    write_predictions(out_dir / "predictions.npz", y_true, y_prob, test_set.coords, image_ids)
    models.save_model(
        out_dir / "model.pt",
        model,
        {
            **meta,
            "selected_inner": best["inner"],
            "selection_metric": metric,
            "selection_value": best["value"],
            "test_oacc": test["oacc"],
        },
    )
    record.finish("ok").save(out_dir / "record.json")
    print(f"select {out_dir}: inner {best['inner']} ({metric} {best['value']}), test oacc {test['oacc']}")
    return 0

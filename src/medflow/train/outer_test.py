"""Testing a model on the held-out patients of an outer fold — shared by `medflow select` (the selected
inner model) and `medflow test` (the refit model).

The test set is the outer fold's test patients, read from the shards the cohort index lists (each
checked against its entry); the model must have the index's classes. Predictions go to
``predictions.npz`` (y_true, y_prob, coords, image_ids); the record gets the metrics, the test
patients, the digests of what was read and of what was written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
from .inputs import input_digests
from .patchset import PatchSet
from .splits import check_index, fold_patients, load_plan
from .stain_setup import check_model_shards, for_shard_patches

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass
class OuterFold:
    """One outer fold's test side: the config, the study, the index and the test patients."""

    cfg: dict
    study: str
    study_cfg: dict
    index: dict
    outer: int
    test_patients: list[str]
    out_dir: Path
    inputs: dict[str, Any]


def load_outer_fold(
    config_path: str,
    study: str,
    index_path: str,
    folds_path: str,
    outer: int,
    out_dir: str,
    extra_inputs: Mapping[str, str | Path] | None = None,
) -> OuterFold:
    cfg = config_mod.load(config_path)
    study_cfg = config_mod.study(cfg, study, config_path)
    index = load_index(index_path)
    plan = load_plan(folds_path)
    check_index(plan, index, folds_path)
    try:
        test_patients = fold_patients(plan, outer, None)["test"]
    except InputError as exc:
        raise InputError(folds_path, exc.problem) from None
    files = {"index": index_path, "folds": folds_path, **(extra_inputs or {})}
    inputs = input_digests(files, index, test_patients, Path(out_dir))
    return OuterFold(cfg, study, study_cfg, index, outer, test_patients, Path(out_dir), inputs)


def load_model_for(fold: OuterFold, path: str | Path) -> tuple[nn.Module, dict[str, Any], Transform | None]:
    """The model file, checked to have the classes of the fold's cohort and to fit its shards' stain
    handling; with the batch transform that prepares test patches as its training patches were (the
    load-time stain normaliser the model records, or None)."""
    model, meta = models.load_model(path)
    if meta.get("class_names") != fold.index["class_names"]:
        raise InputError(path, f"classes {meta.get('class_names')} differ from the index's {fold.index['class_names']}")
    if fold.index["kind"] == "wsi":
        check_model_shards(meta, [s["path"] for s in fold.index["shards"]])
    normaliser = for_shard_patches(meta, path)
    return model, meta, (normaliser.apply if normaliser is not None else None)


def test_model(
    model: nn.Module, fold: OuterFold, record: JobRecord, transform: Transform | None = None
) -> dict[str, Any]:
    """Predict the fold's test set, write ``predictions.npz``, fill the record; returns the test metrics."""
    d = dist_mod.Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(d.device)
    train_cfg = fold.study_cfg["train"]
    with record.timed("prepare_test"):
        seed = stream_seed(fold.cfg["seed"], fold.study, fold.outer, "test-set")
        test_set = PatchSet(fold.index, fold.test_patients, train_cfg["max_patches"], seed)
    with record.timed("predict"):
        batch = max(2 * int(train_cfg["batch_size"]), 64)
        y_true, y_prob, load_s = predict_set(model, test_set, d, batch, gather=False, transform=transform)
    n = len(test_set)
    record["throughput"]["load_ms_per_patch"] = 1000.0 * load_s / n if n else None
    record["throughput"]["predict_img_per_s"] = n / record["timings_s"]["predict"] if n else None
    test = classification_metrics(y_true, y_prob, fold.index["class_names"], fold.study_cfg["positive_class"])
    record["n_patches"] = {"test": n}
    record["test_patients"] = fold.test_patients
    record["inputs"] = fold.inputs
    image_ids = np.array([s["image_id"] for s in test_set.shards] or [""], dtype=object)[test_set.shard_of]
    fsio.write_npz(
        fold.out_dir / "predictions.npz",
        y_true=y_true,
        y_prob=y_prob,
        coords=test_set.coords,
        image_ids=image_ids.astype(str),
    )
    return test


def finish(record: JobRecord, fold: OuterFold, outputs: list[str]) -> None:
    """Digests of the outputs, then the record, written last."""
    record["outputs"] = {name: {"path": name, "sha256": fsio.sha256_file(fold.out_dir / name)} for name in outputs}
    record.finish("ok").save(fold.out_dir / "record.json")


def relative(path: str | Path, out_dir: Path) -> str:
    """A path as the record stores it: relative to the record's directory (results stay relocatable)."""
    return os.path.relpath(path, out_dir)

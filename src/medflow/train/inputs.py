"""What one training job reads: the config, its study, the cohort index and fold plan, its patients.

Resolved and checked before anything is written (`load_fold_job`): the plan must belong to the study
and to this state of the index, the fold must exist. ``FoldJob.inputs`` is the job's provenance —
digests of the index, the plan (and, for a refit, the selection record) and of every shard of its
patients — recorded in its record, its model file and its checkpoint identity.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import config as config_mod
from ..core import fsio
from ..core.errors import InputError
from ..core.index import data_digest, load_index
from ..core.seeds import stream_seed
from .splits import check_index, fold_patients, load_plan


@dataclass
class FoldJob:
    """Everything one training job reads, resolved and checked before anything is written."""

    cfg: dict
    study: str
    study_cfg: dict
    index: dict
    plan: dict
    outer: int
    inner: int | None
    patients: dict[str, list[str]]
    out_dir: Path
    inputs: dict[str, Any]  # provenance: digests of everything read (see input_digests)

    @property
    def train_cfg(self) -> dict:
        return self.study_cfg["train"]

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    def derive(self, *ids: Any) -> int:
        """Seed of this job's stream ``<study>/<outer>/<inner|refit>/<ids...>`` (`medflow.core.seeds`)."""
        return stream_seed(self.seed, self.study, self.outer, "refit" if self.inner is None else self.inner, *ids)

    @property
    def config_hash(self) -> str:
        return config_mod.section_hash(self.cfg, *record_sections(self.study))

    @property
    def data_digest(self) -> str:
        return str(self.inputs["data_digest"])


def record_sections(study: str) -> tuple[str, ...]:
    return (f"studies.{study}", "launch", "folds")


def load_fold_job(
    config_path: str,
    study: str,
    index_path: str,
    folds_path: str,
    outer: int,
    inner: int | None,
    out_dir: str,
    extra_inputs: Mapping[str, str | Path] | None = None,
) -> FoldJob:
    cfg = config_mod.load(config_path)
    study_cfg = config_mod.study(cfg, study, config_path)
    index = load_index(index_path)
    plan = load_plan(folds_path)
    if index["cohort"] != study_cfg["cohort"]:
        raise InputError(
            index_path, f"index is cohort {index['cohort']!r}, study {study!r} uses {study_cfg['cohort']!r}"
        )
    if plan.get("cohort") != index["cohort"] or plan.get("study") not in (None, study):
        raise InputError(folds_path, f"fold plan is for study {plan.get('study')!r} / cohort {plan.get('cohort')!r}")
    check_index(plan, index, folds_path)
    try:
        patients = fold_patients(plan, outer, inner)
    except InputError as exc:
        raise InputError(folds_path, exc.problem) from None
    if not patients["train"]:
        raise InputError(folds_path, f"outer {outer} inner {inner}: no training patients")
    files = {"index": index_path, "folds": folds_path, **(extra_inputs or {})}
    inputs = input_digests(files, index, [*patients["train"], *patients["val"]], Path(out_dir))
    return FoldJob(cfg, study, study_cfg, index, plan, outer, inner, patients, Path(out_dir), inputs)


def input_digests(files: Mapping[str, str | Path], index: dict, patients: list[str], out_dir: Path) -> dict[str, Any]:
    """Digests of the documents a job reads (paths relative to its output directory, so a results
    directory stays relocatable) and of the shards of ``patients``, as the index lists them."""
    wanted = set(patients)
    shards = {e["image_id"]: e["sha256"] for e in index["shards"] if e["patient_id"] in wanted}
    entries = [e for e in index["shards"] if e["patient_id"] in wanted]
    return {
        "files": {
            role: {"path": os.path.relpath(path, out_dir), "sha256": fsio.sha256_file(path)}
            for role, path in files.items()
        },
        "shards": dict(sorted(shards.items())),
        "data_digest": data_digest(entries),
    }

"""Stain handling of training, selection and prediction: which normaliser a job's batches need, the
HED jitter of training, and what a model file records so prediction applies the same normaliser.

A model file's ``stain`` (None without normalisation) is the normaliser's record
(`medflow.extract.wsi.stain`: method, params, target, digest) plus ``applied`` — ``extraction`` (the
shards hold normalised patches) or ``load`` (the loader normalised raw ones) — and ``reference`` (the
stain reference file). Every job checks that the shards it reads carry what it expects (normalised
with that digest, or raw), so a model is never trained or tested on patches of another reference.

For prediction from a model file::

    model, meta = medflow.train.models.load_model(path)
    norm = for_slide_pixels(meta, path)    # raw tiles read from a slide (predict-wsi): whenever recorded
    norm = for_shard_patches(meta, path)   # patches read from shards (select): only when applied at load
    x = norm.apply(x) if norm is not None else x     # (N, H, W, 3) uint8 → uint8
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.shards import open_shard, read_attrs
from ..extract.wsi import stain_reference
from ..extract.wsi.stain import StainNormaliser, from_record
from .inputs import FoldJob


@dataclass(frozen=True)
class TrainingStain:
    """A training job's stain handling."""

    normaliser: StainNormaliser | None  # applied to every batch the model sees (apply: load)
    jitter: tuple[float, float] | None  # HED jitter (scale, bias) of training batches
    record: dict[str, Any] | None  # the model file's and job record's ``stain``

    @property
    def transform(self) -> Callable[[np.ndarray], np.ndarray] | None:
        return self.normaliser.apply if self.normaliser is not None else None

    @property
    def identity(self) -> str | None:
        """What a checkpoint must have been trained with: the reference digest and where it was applied."""
        return f"{self.record['applied']}:{self.record['digest']}" if self.record else None


def jitter_setting(train_cfg: dict) -> tuple[float, float] | None:
    jit = train_cfg.get("hed_jitter")
    if not jit or not (jit["scale"] or jit["bias"]):
        return None
    return float(jit["scale"]), float(jit["bias"])


def shard_stain(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The ``stain`` attribute of a shard (what it was normalised with at extraction), or None."""
    value = attrs.get("stain")
    if isinstance(value, str):
        value = json.loads(value) if value else None
    return value or None


def check_shards(paths: Iterable[str], digest: str | None) -> None:
    """Every shard must hold patches normalised at extraction with ``digest`` (None: raw patches)."""
    for path in paths:
        with open_shard(path) as h5:
            found = shard_stain(read_attrs(h5))
        found_digest = found.get("digest") if found else None
        if found_digest != digest:
            have = f"normalised with stain reference {found_digest}" if found_digest else "raw (not normalised)"
            want = f"normalised with stain reference {digest}" if digest else "raw patches"
            raise InputError(path, f"patches are {have}, this job expects {want}; re-extract (wsi.stain)")


def for_training(job: FoldJob, stain_path: str | Path | None) -> TrainingStain:
    """Resolve and check a training job's stain handling before anything is written."""
    cfg, kind = job.cfg, job.index["kind"]
    jitter = jitter_setting(job.train_cfg)
    if kind != "wsi":
        if jitter is not None:
            raise InputError(
                job.out_dir, f"studies.{job.study}.train.hed_jitter needs RGB (WSI) patches; the cohort is {kind}"
            )
        if stain_path:
            raise InputError(stain_path, f"a stain reference was given for a {kind} study")
        return TrainingStain(None, None, None)
    shards = [s["path"] for s in job.index["shards"]]
    if not stain_reference.enabled(cfg):
        if stain_path:
            raise InputError(stain_path, "a stain reference was given but wsi.stain.method is none")
        check_shards(shards, None)
        return TrainingStain(None, jitter, None)
    if not stain_path:
        raise InputError(
            job.out_dir,
            f"wsi.stain.method is {cfg['wsi']['stain']['method']}: give the cohort's stain reference (--stain)",
        )
    norm = stain_reference.load_reference(stain_path, job.index["cohort"])
    stain_reference.check_matches_config(norm, cfg, stain_path)
    applied = cfg["wsi"]["stain"]["apply"]
    check_shards(shards, norm.digest if applied == "extraction" else None)
    record = norm.record(applied=applied, reference=str(stain_path))
    return TrainingStain(norm if applied == "load" else None, jitter, record)


def _model_record(meta: dict[str, Any]) -> dict[str, Any] | None:
    return meta.get("stain") or None


def for_shard_patches(meta: dict[str, Any], source: str | Path) -> StainNormaliser | None:
    """The normaliser to apply to shard patches fed to this model (only when it was applied at load)."""
    rec = _model_record(meta)
    if rec is None or rec.get("applied") != "load":
        return None
    return from_record(rec, source)


def for_slide_pixels(meta: dict[str, Any], source: str | Path) -> StainNormaliser | None:
    """The normaliser to apply to raw slide pixels fed to this model (whenever the model records one)."""
    rec = _model_record(meta)
    return None if rec is None else from_record(rec, source)


def check_model_shards(meta: dict[str, Any], paths: Iterable[str]) -> None:
    """The shards a model is evaluated on must be prepared as its training shards were."""
    rec = _model_record(meta)
    check_shards(paths, rec["digest"] if rec is not None and rec.get("applied") == "extraction" else None)

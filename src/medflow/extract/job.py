"""The extraction-job contract shared by WSI and HSI: one image → one shard + one extraction record.

1. **Inputs fingerprint**: every input file (role → path, bytes, sha256) plus the manifest values
   that shape the shard (``params``, e.g. a slide's manifest mpp).
2. **Up to date**: a finished shard whose ``config_hash`` (the config sections of ``config_sections``)
   and fingerprint equal the current ones is reused, unless ``force``; its record is kept when it
   belongs to the same inputs, else rebuilt from the shard.
3. **Atomic outputs**: the kind's ``extract`` function writes the shard through ``ShardWriter``
   (temporary name, renamed on success); the record is written last, so a shard without a record,
   or a record of a different fingerprint, is never taken as finished.
4. **on_error** (``<kind>.on_error``): ``fail`` re-raises the InputError (the CLI prints one line,
   exit 2, nothing written); ``skip`` removes any stale shard of an earlier run and writes a
   ``failed`` record, so the index lists the image as failed and nothing else survives.
5. **Cancellation**: SIGTERM exits through Python (``medflow.cli``), so a killed job removes its
   temporary shard; SIGKILL leaves only a hidden ``.<name>.tmp-*`` file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core import config as config_mod
from ..core import fsio
from ..core.errors import InputError
from ..core.index import file_identity, label_counts
from ..core.manifest import ImageEntry
from ..core.records import JobRecord
from ..core.shards import open_shard, read_attrs


@dataclass(frozen=True)
class Target:
    """What one extraction job makes: the shard and record of one manifest row of a cohort."""

    kind: str  # "wsi" | "hsi"
    cohort: str
    entry: ImageEntry
    shard: Path
    record: Path

    @property
    def job(self) -> str:
        return f"extract-{self.kind}"


#: The kind's extraction: writes ``target.shard`` atomically (and may add fields to the record).
Extract = Callable[[Target, dict, JobRecord, dict], None]


def config_sections(kind: str, cohort: str) -> tuple[str, ...]:
    """Config sections whose change invalidates a shard of ``kind`` in ``cohort`` (of `hashed_config`)."""
    return (kind, "shards", f"cohorts.{cohort}")


#: Keys of the ``<kind>`` section that say how jobs are scheduled, not what a shard holds: changing them
#: never invalidates a shard (the config hash is taken without them).
SCHEDULING_KEYS = ("images_per_job",)


def hashed_config(cfg: dict, kind: str) -> dict:
    """``cfg`` as a shard's config hash sees it: its ``kind`` section without the scheduling keys, nor
    ``wsi.stain``. A shard depends on stain normalisation only through the reference's digest
    (``params.stain`` of its inputs), so a normaliser applied at load time, or a refit giving the same
    reference, never re-extracts."""
    dropped = (*SCHEDULING_KEYS, "stain") if kind == "wsi" else SCHEDULING_KEYS
    return {**cfg, kind: {k: v for k, v in (cfg.get(kind) or {}).items() if k not in dropped}}


def config_hash(cfg: dict, kind: str, cohort: str) -> str:
    """The config hash of a shard of ``kind`` in ``cohort`` (what the Snakefile passes as a param, too)."""
    return config_mod.section_hash(hashed_config(cfg, kind), *config_sections(kind, cohort))


def fingerprint(files: dict[str, str], params: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"files": {role: {path, bytes, sha256}}, "params": {...}}``; InputError for a missing file."""
    out: dict[str, dict[str, Any]] = {}
    for role, path in files.items():
        if not path:
            continue
        if not os.path.isfile(path):
            raise InputError(path, f"{role} file not found")
        out[role] = {"path": str(path), "bytes": os.path.getsize(path), "sha256": fsio.sha256_file(path)}
    return {"files": out, "params": dict(params or {})}


def identity(inputs: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for a shard to be reused: content digests and params, not paths
    (a data directory moved elsewhere still matches)."""
    files = inputs.get("files") or {}
    return {
        "files": {role: (info.get("sha256"), info.get("bytes")) for role, info in files.items()},
        "params": inputs.get("params") or {},
    }


def base_attrs(target: Target, cfg: dict, inputs: dict[str, Any], config_hash: str) -> dict[str, Any]:
    """Shard attributes every kind writes (the kind adds its geometry)."""
    image = inputs["files"]["image"]
    return {
        "kind": target.kind,
        "image_id": target.entry.image_id,
        "patient_id": target.entry.patient_id,
        "cohort": target.cohort,
        "class_names": config_mod.class_names(cfg, target.kind),
        "source_path": str(Path(target.entry.image).resolve()),
        "source_bytes": image["bytes"],
        "source_sha256": image["sha256"],
        "inputs": inputs,
        "seed": cfg["seed"],
        "config_hash": config_hash,
    }


def matching_shard(shard: Path, config_hash: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The shard's attributes (and ``_labels``) if it is a finished shard of this config and these inputs."""
    if not shard.is_file():
        return None
    try:
        with open_shard(shard) as h5:
            attrs = read_attrs(h5)
            attrs["_labels"] = h5["labels"][:]
    except (InputError, OSError, KeyError):
        return None
    if attrs.get("config_hash") != config_hash or identity(attrs.get("inputs") or {}) != identity(inputs):
        return None
    return attrs


def run(
    target: Target,
    cfg: dict,
    files: Callable[[], dict[str, str]],
    extract: Extract,
    *,
    params: dict[str, Any] | None = None,
    force: bool = False,
    verbose: bool = True,
) -> dict:
    """Run one extraction job under the contract above; returns its record. ``files()`` lists the
    input files by role (called inside the job, so a missing file is handled by ``on_error``)."""
    say = print if verbose else (lambda *a, **k: None)
    names = config_mod.class_names(cfg, target.kind)
    record = JobRecord(
        target.job,
        hashed_config(cfg, target.kind),
        config_sections(target.kind, target.cohort),
        image_id=target.entry.image_id,
        patient_id=target.entry.patient_id,
        cohort=target.cohort,
        shard=None,
        error=None,
        n_patches=0,
        counts={n: 0 for n in names},
    )
    try:
        with record.timed("hash"):
            inputs = fingerprint(files(), params)
        record["inputs"] = inputs
        existing = None if force else matching_shard(target.shard, record["config_hash"], inputs)
        if existing is not None:
            say(
                f"{target.job} {target.entry.image_id}: {target.shard} is up to date "
                f"(config hash {record['config_hash']}, same inputs); skipped"
            )
            return _reuse(record, existing, target, names)
        extract(target, cfg, record, inputs)
    except InputError as exc:
        if cfg[target.kind]["on_error"] != "skip":
            raise
        say(f"{target.job} {target.entry.image_id}: skipped bad input (on_error: skip): {exc}")
        return _failed(record, target, exc)
    with open_shard(target.shard) as h5:  # counts of what the shard holds, whatever the kind
        labels = h5["labels"][:]
    _finish(record, target, labels, names)
    say(
        f"{target.job} {target.entry.image_id}: {record['n_patches']} patches {record['counts']} "
        f"in {record['wall_s']:.2f} s → {target.shard}"
    )
    return dict(record)


def _finish(record: JobRecord, target: Target, labels: np.ndarray, names: list[str]) -> None:
    n = int(len(labels))
    with record.timed("digest"):  # the shard's identity, recorded while the file is hot
        identity = file_identity(target.shard)
    record.update(
        shard=os.path.relpath(target.shard.resolve(), target.record.resolve().parent),
        shard_identity=identity,
        n_patches=n,
        counts=label_counts(labels, names),
    )
    record.finish("ok")
    wall = float(record["wall_s"])
    record["throughput"] = {
        "s_per_patch": wall / n if n else None,
        "patches_per_s": n / wall if wall else None,
        "s_per_image": wall,
        "bytes_written": identity["bytes"],
    }
    record.save(target.record)


def _reuse(record: JobRecord, attrs: dict[str, Any], target: Target, names: list[str]) -> dict:
    """An up-to-date shard: keep its record when it belongs to the same inputs, else rebuild it."""
    if target.record.is_file():
        with contextlib.suppress(OSError, ValueError):
            old = fsio.read_json(target.record)
            if (
                old.get("status") == "ok"
                and old.get("config_hash") == record["config_hash"]
                and identity(old.get("inputs") or {}) == identity(record["inputs"])
            ):
                return dict(old)
    record["timings_s"].update(attrs.get("timings_s") or {})
    record["resumed"] = True
    _finish(record, target, attrs.pop("_labels"), names)
    return dict(record)


def _failed(record: JobRecord, target: Target, exc: InputError) -> dict:
    """on_error: skip — a `failed` record and no shard (a stale one of an earlier run is removed)."""
    with contextlib.suppress(FileNotFoundError):
        target.shard.unlink()
    record.update(shard=None, error=str(exc))
    record.finish("failed").save(target.record)
    return dict(record)

"""The cohort index: one JSON file listing every shard of a cohort (and every image that failed).

The fold plan, training, selection and prediction read only the index and the shards it lists.
Shard paths are stored relative to the index file. Format in docs/architecture.md.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import fsio, provenance
from .errors import InputError
from .shards import shard_summary

INDEX_FORMAT = "medflow-index/1"


def build_index(
    records: Iterable[str | Path], out: str | Path, cohort: str, kind: str, cfg: dict | None = None
) -> dict[str, Any]:
    """Gather extraction records into the cohort index (one JSON file), written atomically."""
    out = Path(out)
    shards: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    class_names: list[str] = []
    for rec_path in sorted(Path(p) for p in records):
        rec = fsio.read_json(rec_path)
        if rec.get("status") != "ok" or not rec.get("shard"):
            failed.append(
                {"image_id": rec.get("image_id"), "patient_id": rec.get("patient_id"), "error": rec.get("error")}
            )
            continue
        shard_path = (rec_path.parent / rec["shard"]).resolve()
        entry = shard_summary(shard_path)
        if not class_names:
            class_names = entry["class_names"]
        elif entry["class_names"] != class_names:
            raise InputError(shard_path, f"class names {entry['class_names']} differ from the cohort's {class_names}")
        entry["path"] = os.path.relpath(shard_path, out.parent.resolve())
        entry.pop("class_names")
        shards.append(entry)
    if not shards:
        raise InputError(out, f"cohort {cohort!r} has no usable shard ({len(failed)} failed)")
    totals: Counter[str] = Counter()
    for entry in shards:
        totals.update(entry["counts"])
    index = {
        "format": INDEX_FORMAT,
        "cohort": cohort,
        "kind": kind,
        "class_names": class_names,
        "shards": shards,
        "failed": failed,
        "totals": {k: int(totals[k]) for k in class_names},
        "patients": sorted({s["patient_id"] for s in shards}),
        "config_hash": config_mod.section_hash(cfg, "cohorts", kind, "shards") if cfg else None,
        "seed": (cfg or {}).get("seed"),
        "software": provenance.software(),
    }
    fsio.write_json(out, index)
    return index


def load_index(path: str | Path) -> dict[str, Any]:
    """Read a cohort index; shard paths are returned absolute."""
    path = Path(path)
    index = fsio.read_json_document(path, "cohort index", INDEX_FORMAT)
    for entry in index["shards"]:
        entry["path"] = str((path.parent / entry["path"]).resolve())
    return index

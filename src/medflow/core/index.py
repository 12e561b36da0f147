"""The cohort index: one JSON file listing every shard of a cohort (and every image that failed).

The fold plan, training, selection and prediction read only the index and the shards it lists, and
check every shard they open against its entry (`open_checked`): file identity, image and patient,
patch and label counts. Shard paths are stored relative to the index file. Format in
docs/architecture.md.

File identity is the shard's SHA-256, recorded by its extraction job while the file is hot. Checking
it must be cheap for a job that opens hundreds of shards, so the entry also records size and mtime:
when both are unchanged the recorded digest stands; when either changed (a copy, a touch, an edit)
the file is re-hashed and must still match. `medflow verify` always re-hashes.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import config as config_mod
from . import fsio, provenance
from .errors import InputError
from .shards import open_shard, read_attrs

INDEX_FORMAT = "medflow-index/2"


# ---- file identity ------------------------------------------------------------------------------
def file_identity(path: str | Path) -> dict[str, Any]:
    """{sha256, bytes, mtime_ns} of a file (reads it whole)."""
    st = os.stat(path)
    return {"sha256": fsio.sha256_file(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def current_digest(path: str | Path, known: dict[str, Any]) -> str:
    """The file's SHA-256: ``known["sha256"]`` when size and mtime equal the known ones, else re-hashed."""
    st = os.stat(path)
    if known.get("sha256") and st.st_size == known.get("bytes") and st.st_mtime_ns == known.get("mtime_ns"):
        return str(known["sha256"])
    return fsio.sha256_file(path)


def data_digest(entries: Iterable[dict[str, Any]]) -> str:
    """One digest of a set of shards (image ids and content digests): what a training job was made from."""
    rows = sorted(f"{e['image_id']}:{e['sha256']}" for e in entries)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


# ---- building ------------------------------------------------------------------------------------
def build_index(
    records: Iterable[str | Path], out: str | Path, cohort: str, kind: str, cfg: dict | None = None
) -> dict[str, Any]:
    """Gather extraction records into the cohort index (one JSON file), written atomically.

    Refuses a shard that is not the one its record describes, class names that differ between
    shards, and the same source image under two image ids (under two patients it would put one
    slide on both sides of a split)."""
    out = Path(out)
    shards: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    class_names: list[str] = []
    for rec_path in sorted(Path(p) for p in records):
        rec = fsio.read_json_document(rec_path, "extraction record")
        if rec.get("status") != "ok" or not rec.get("shard"):
            failed.append(
                {"image_id": rec.get("image_id"), "patient_id": rec.get("patient_id"), "error": rec.get("error")}
            )
            continue
        entry, names = _entry(rec_path, rec)
        if not class_names:
            class_names = names
        elif names != class_names:
            raise InputError(
                rec_path.parent / rec["shard"], f"class names {names} differ from the cohort's {class_names}"
            )
        entry["path"] = os.path.relpath(rec_path.parent / rec["shard"], out.parent)
        shards.append(entry)
    if not shards:
        raise InputError(out, f"cohort {cohort!r} has no usable shard ({len(failed)} failed)")
    _refuse_duplicate_sources(shards, out)
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


def _entry(rec_path: Path, rec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The index entry of one extraction record's shard (digest from the record when still valid)."""
    shard = rec_path.parent / rec["shard"]
    if not shard.is_file():
        raise InputError(shard, f"shard named by {rec_path} is missing")
    known = rec.get("shard_identity") or {}
    sha = current_digest(shard, known)
    if known.get("sha256") and sha != known["sha256"]:
        raise InputError(
            shard,
            f"content differs from what its extraction record {rec_path.name} recorded "
            f"(sha256 {known['sha256'][:12]}… → {sha[:12]}…); re-extract it",
        )
    with open_shard(shard) as h5:
        attrs = read_attrs(h5)
        labels = h5["labels"][:]
    for key in ("image_id", "patient_id"):
        if attrs.get(key) != rec.get(key):
            raise InputError(shard, f"shard {key} {attrs.get(key)!r} differs from its record's {rec.get(key)!r}")
    names = list(attrs["class_names"])
    st = shard.stat()
    entry = {
        "image_id": attrs["image_id"],
        "patient_id": attrs["patient_id"],
        "kind": attrs["kind"],
        "n": int(len(labels)),
        "counts": label_counts(labels, names),
        "sha256": sha,
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "source_sha256": attrs.get("source_sha256"),
    }
    return entry, names


def label_counts(labels: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    return {name: int(counts[i]) for i, name in enumerate(names)}


def _refuse_duplicate_sources(shards: list[dict[str, Any]], out: Path) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for entry in shards:
        source = entry.get("source_sha256")
        if not source:
            continue
        first = seen.setdefault(source, entry)
        if first is entry:
            continue
        if first["patient_id"] != entry["patient_id"]:
            raise InputError(
                out,
                f"the same source image (sha256 {source[:12]}…) is listed as {first['image_id']!r} "
                f"of patient {first['patient_id']!r} and as {entry['image_id']!r} of patient "
                f"{entry['patient_id']!r}: it would leak across patient splits; fix the manifest",
            )
        raise InputError(
            out,
            f"the same source image (sha256 {source[:12]}…) is listed twice, as "
            f"{first['image_id']!r} and {entry['image_id']!r}; fix the manifest",
        )


# ---- reading and checking ------------------------------------------------------------------------
def load_index(path: str | Path) -> dict[str, Any]:
    """Read a cohort index; shard paths are returned absolute (``path`` of each entry)."""
    path = Path(path)
    index = fsio.read_json_document(path, "cohort index", INDEX_FORMAT)
    if not isinstance(index.get("shards"), list) or not isinstance(index.get("class_names"), list):
        raise InputError(path, "cohort index lacks its shard list or class names")
    for entry in index["shards"]:
        if not isinstance(entry, dict) or not {"path", "image_id", "patient_id", "sha256", "counts"} <= set(entry):
            raise InputError(path, f"malformed shard entry {str(entry)[:80]}")
        entry["path"] = str((path.parent / entry["path"]).resolve())
    index["path"] = str(path)
    return index


def open_checked(entry: dict[str, Any], class_names: list[str]) -> h5py.File:
    """Open the shard of an index entry after checking it is the one the index lists: same content
    (size/mtime, else re-hashed), same image and patient, same patch and label counts. InputError
    naming the shard and what differs otherwise; the caller closes the file."""
    path = Path(entry["path"])
    if not path.is_file():
        raise InputError(path, "shard listed in the cohort index is missing")
    sha = current_digest(path, entry)
    if sha != entry["sha256"]:
        raise InputError(
            path,
            f"content changed since it was indexed (sha256 {entry['sha256'][:12]}… → "
            f"{sha[:12]}…); rerun extraction and index",
        )
    h5 = open_shard(path)
    try:
        attrs = read_attrs(h5)
        for key in ("image_id", "patient_id"):
            if attrs.get(key) != entry[key]:
                raise InputError(path, f"holds {key} {attrs.get(key)!r}, the cohort index lists {entry[key]!r}")
        labels = h5["labels"][:]
        counts = label_counts(labels, class_names)
        if len(labels) != entry.get("n", len(labels)) or counts != entry["counts"]:
            raise InputError(
                path, f"holds {len(labels)} patches {counts}, the cohort index lists {entry.get('n')} {entry['counts']}"
            )
    except BaseException:
        h5.close()
        raise
    return h5

"""`medflow index`: the cohort index from the extraction records of a cohort (`medflow.core.index`).

The records are given one by one (``<image_id>.record.json``), or through the batch records of
``medflow extract-batch`` (``<kind>.images_per_job`` > 1), which list them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core import config as config_mod
from ..core import fsio
from ..core.errors import InputError
from ..core.index import build_index
from .batches import BATCH_FORMAT


def expand_batches(paths: list[str]) -> list[Path]:
    """Per-image record paths: each batch record replaced by the records it lists (which must exist)."""
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.name.endswith(".record.json"):
            doc = fsio.read_json_document(path, "extraction batch record", BATCH_FORMAT)
            for image in doc.get("images", []):
                record = Path(os.path.normpath(path.parent / image["record"]))
                if not record.is_file():
                    raise InputError(
                        record, f"listed by {path} but missing; rerun that batch (snakemake --forcerun {path})"
                    )
                out.append(record)
            continue
        out.append(path)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--cohort", required=True)
    p.add_argument("--out", required=True, help="cohort index JSON to write")
    p.add_argument(
        "records", nargs="+", help="extraction records (<image_id>.record.json) or batch records (batches/<b>.json)"
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    kind = cfg["cohorts"][args.cohort]["kind"]
    index = build_index(expand_batches(args.records), args.out, args.cohort, kind, cfg)
    print(f"index {args.out}: {len(index['shards'])} shards, {len(index['failed'])} failed, totals {index['totals']}")
    return 0

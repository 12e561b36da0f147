"""`medflow index`: the cohort index from the extraction records of a cohort (`medflow.core.index`)."""

from __future__ import annotations

import argparse

from ..core import config as config_mod
from ..core.index import build_index


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--cohort", required=True)
    p.add_argument("--out", required=True, help="cohort index JSON to write")
    p.add_argument("records", nargs="+", help="extraction records (<image_id>.record.json)")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    kind = cfg["cohorts"][args.cohort]["kind"]
    index = build_index(args.records, args.out, args.cohort, kind, cfg)
    print(f"index {args.out}: {len(index['shards'])} shards, {len(index['failed'])} failed, totals {index['totals']}")
    return 0

"""`medflow extract-batch`: one job extracts a batch of a cohort's images (``<kind>.images_per_job`` > 1).

Each image goes through its kind's own extraction (`medflow.extract.wsi.job.extract_slide`,
`medflow.extract.hsi.job.extract_image`) under the per-image contract of `medflow.extract.job`: one
shard and one record per image in ``--out-dir``, each written atomically, up-to-date shards reused,
``on_error`` per image. The batch record (``--record``, format ``medflow-extract-batch/1``) is written
last and lists the images' records; `medflow index` reads it in their place. With ``on_error: fail`` the
first bad image stops the job (exit 2): the images before it keep their finished shards and records,
and the rerun reuses them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core import config as config_mod
from ..core import manifest
from ..core import progress as progress_mod
from ..core.errors import InputError
from ..core.records import JobRecord
from .batches import BATCH_FORMAT
from .hsi.job import extract_image
from .job import config_sections, hashed_config
from .wsi.job import extract_slide

EXTRACTORS: dict[str, Callable[..., dict]] = {"wsi": extract_slide, "hsi": extract_image}


def extract_batch(
    cfg: dict,
    cohort: str,
    image_ids: list[str],
    out_dir: str | Path,
    record_path: str | Path,
    *,
    force: bool = False,
    stain: str | Path | None = None,
) -> dict:
    """Extract ``image_ids`` of ``cohort`` one after the other into ``out_dir``; write the batch record.
    ``stain``: the cohort's stain reference, for WSI cohorts normalised at extraction (as `extract-wsi`)."""
    kind = cfg["cohorts"][cohort]["kind"]
    if stain and kind != "wsi":
        raise InputError(stain, f"a stain reference was given for a {kind} cohort")
    options: dict[str, Any] = {"force": force, **({"stain": stain} if kind == "wsi" else {})}
    rows = {e.image_id: e for e in manifest.entries(cfg, cohort)}
    unknown = [i for i in image_ids if i not in rows]
    if unknown:
        raise InputError(cfg["cohorts"][cohort]["manifest"], f"no image(s) {unknown[:5]} in cohort {cohort!r}")
    if len(set(image_ids)) != len(image_ids):
        raise InputError(
            None, f"--images lists an image twice: {sorted(i for i in image_ids if image_ids.count(i) > 1)}"
        )
    out_dir, record_path = Path(out_dir), Path(record_path)
    record = JobRecord(
        "extract-batch",
        hashed_config(cfg, kind),
        config_sections(kind, cohort),
        format=BATCH_FORMAT,
        cohort=cohort,
        kind=kind,
    )
    images = []
    for image_id in image_ids:
        shard, rec_path = out_dir / f"{image_id}.h5", out_dir / f"{image_id}.record.json"
        with record.timed("extract"):
            rec = EXTRACTORS[kind](rows[image_id], cfg, cohort, shard, rec_path, **options)
        images.append(
            {
                "image_id": image_id,
                "record": os.path.relpath(rec_path.resolve(), record_path.resolve().parent),
                "status": rec["status"],
                "n_patches": rec.get("n_patches"),
            }
        )
    record.update(
        images=images,
        n_images=len(images),
        n_failed=sum(i["status"] != "ok" for i in images),
        n_patches=sum(i["n_patches"] or 0 for i in images),
    )
    record.finish("ok").save(record_path)
    print(
        f"extract-batch {record_path}: {len(images)} images of {cohort} ({record['n_failed']} failed) in {record['wall_s']:.1f} s"
    )
    return dict(record)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="effective config YAML")
    p.add_argument("--cohort", required=True, help="cohort name (cohorts.<name> in the config)")
    p.add_argument("--images", required=True, help="comma-separated image_ids of the manifest, extracted in this order")
    p.add_argument("--out-dir", required=True, help="directory of the shards and records (<image_id>.h5, .record.json)")
    p.add_argument("--record", required=True, help="the batch record to write (lists the images' records)")
    p.add_argument("--force", action="store_true", help="re-extract even the images whose shards are up to date")
    p.add_argument(
        "--stain", default=None, help="stain reference JSON (medflow fit-stain), when wsi.stain.apply is extraction"
    )
    progress_mod.add_quiet_argument(p)


def run(args: argparse.Namespace) -> int:
    cfg = progress_mod.apply_quiet(config_mod.load(args.config), args.quiet)
    if args.cohort not in cfg["cohorts"]:
        raise InputError(args.config, f"unknown cohort {args.cohort!r}; defined: {sorted(cfg['cohorts'])}")
    image_ids = [i.strip() for i in args.images.split(",") if i.strip()]
    if not image_ids:
        raise InputError(None, "--images lists no image")
    extract_batch(cfg, args.cohort, image_ids, args.out_dir, args.record, force=args.force, stain=args.stain)
    return 0

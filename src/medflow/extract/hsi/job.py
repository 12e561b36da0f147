"""HSI patch extraction: one image → one shard of k×k×B patches + its record (`medflow extract-hsi`).

The chain (`medflow.extract.hsi.chain`) turns the raw mosaic (or cube) into a calibrated, normalised
cube; patches centred on labelled pixels (all, or a seeded stratified subsample) are gathered from a
zero-copy window view (`medflow.extract.hsi.patches`) and streamed into the shard block by block.
Skip-if-up-to-date, ``--force``, ``on_error`` and atomic outputs: `medflow.extract.job`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...core import config as config_mod
from ...core import progress as progress_mod
from ...core.errors import InputError
from ...core.manifest import ImageEntry
from ...core.manifest import entry as manifest_entry
from ...core.records import JobRecord
from ...core.seeds import rng_for
from ...core.shards import ShardWriter
from .. import job as job_mod
from . import io as hsi_io
from .chain import ChainResult, check_config, run_chain
from .patches import extract_patches, select_pixels

TIMING_KEYS = ("hash", "load", "calibrate", "demosaic", "correct", "normalise", "patches", "write", "digest")
WRITE_BLOCK = 4096  # patches gathered and written per block


def input_files(entry: ImageEntry, cfg: dict) -> dict[str, str]:
    """Role → path of every file the shard depends on (an ENVI header's data file included)."""
    files = {
        "image": entry.image,
        "annotation": entry.annotation,
        "white": entry.white,
        "dark": entry.dark,
        "correction_matrix": cfg["hsi"]["correction_matrix"],
    }
    if entry.image.lower().endswith(".hdr"):
        # The ENVI header is tiny; the pixels live in the data file next to it.
        files["image_data"] = str(hsi_io.envi_data_file(Path(entry.image), hsi_io.parse_envi_header(entry.image)))
    return files


def extract_image(
    entry: ImageEntry,
    cfg: dict,
    cohort: str,
    out: str | Path,
    record_path: str | Path,
    *,
    force: bool = False,
    verbose: bool = True,
) -> dict:
    """Run the chain on one manifest entry, write its shard and record; returns the record.

    Skips the work (returning the existing record) when the shard matches this config and these
    inputs, unless ``force``. Bad input raises InputError, or with ``hsi.on_error: skip`` writes a
    `failed` record and no shard."""
    check_config(cfg["hsi"])  # a config error fails the job whatever on_error says
    target = job_mod.Target("hsi", cohort, entry, Path(out), Path(record_path))

    def extract(target: job_mod.Target, cfg: dict, record: JobRecord, inputs: dict) -> None:
        _extract(target, cfg, record, inputs, verbose)

    return job_mod.run(target, cfg, lambda: input_files(entry, cfg), extract, force=force, verbose=verbose)


def _extract(target: job_mod.Target, cfg: dict, record: JobRecord, inputs: dict, verbose: bool = True) -> None:
    result = run_chain(target.entry, cfg)
    rows, cols = patch_centres(target.entry, cfg, result)
    attrs = {**job_mod.base_attrs(target, cfg, inputs, record["config_hash"]), **_geometry_attrs(cfg, result)}
    label = f"extract-hsi {target.entry.image_id}"
    with progress_mod.reporter(cfg, label, len(rows), "patches", enabled=verbose) as report:
        result.timings.update(_write_shard(target.shard, result, rows, cols, cfg, attrs, report))
    record.update(chain=result.chain, shape=list(result.cube.shape))
    record["timings_s"].update({key: float(result.timings.get(key, 0.0)) for key in TIMING_KEYS[1:-1]})


def _timer(timings: dict[str, float], key: str, t0: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - t0
    return now


def _write_shard(
    out: Path,
    result: ChainResult,
    rows: np.ndarray,
    cols: np.ndarray,
    cfg: dict,
    attrs: dict[str, Any],
    report: progress_mod.Reporter | None = None,
) -> dict[str, float]:
    """Gather patches block by block and stream them into the shard; returns patches/write timings."""
    hcfg, k = cfg["hsi"], cfg["hsi"]["patch"]
    timings = {"patches": 0.0, "write": 0.0}
    bands = result.cube.shape[2]
    chunk = cfg["shards"]["chunk_patches"]
    block = max(chunk, WRITE_BLOCK // chunk * chunk)
    t = time.perf_counter()
    cube = result.cube
    if np.dtype(hcfg["dtype"]) != cube.dtype and len(rows) * k * k > cube.shape[0] * cube.shape[1]:
        cube = cube.astype(hcfg["dtype"])  # cast each pixel once rather than once per patch holding it
    t = _timer(timings, "patches", t)
    with ShardWriter(
        out, (k, k, bands), hcfg["dtype"], attrs, chunk_patches=chunk, compression=cfg["shards"]["compression"]
    ) as writer:
        t = _timer(timings, "write", t)
        for lo in range(0, len(rows), block):
            r, c = rows[lo : lo + block], cols[lo : lo + block]
            patches = extract_patches(cube, r, c, k)
            t = _timer(timings, "patches", t)
            writer.append(patches, np.stack([r, c], axis=1), result.labels[r, c])
            t = _timer(timings, "write", t)
            if report is not None:
                report.advance(len(r))
        writer.attrs["timings_s"] = {**result.timings, **timings}
    _timer(timings, "write", t)
    return timings


def patch_centres(entry: ImageEntry, cfg: dict, result: ChainResult) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, cols) to extract, after checking there is something to extract."""
    hcfg, k = cfg["hsi"], cfg["hsi"]["patch"]
    if not result.has_gt:
        raise InputError(entry.image, "no ground-truth map (manifest column 'annotation') to take labels from")
    if not (result.labels >= 0).any():
        raise InputError(entry.annotation, "ground-truth map has no labelled pixel")
    if k // 2 >= min(result.cube.shape[:2]):
        raise InputError(entry.image, f"cube {result.cube.shape[:2]} is too small for {k}×{k} patches")
    rng = rng_for(cfg["seed"], "hsi-patches", entry.image_id)
    rows, cols = select_pixels(result.labels, k, hcfg["border"], hcfg["per_class"], rng)
    if len(rows) == 0:
        raise InputError(entry.annotation, f"no labelled pixel is at least {k // 2} px from the border (border: skip)")
    return rows, cols


def _geometry_attrs(cfg: dict, result: ChainResult) -> dict[str, Any]:
    hcfg = cfg["hsi"]
    bands = int(result.cube.shape[2])
    return {
        "patch_size": int(hcfg["patch"]),
        "channels": bands,
        "bands": bands,
        "wavelengths": result.wavelengths,
        "chain": result.chain,
        "border": hcfg["border"],
        "cube_shape": list(result.cube.shape),
    }


# ---- CLI ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--cohort", required=True)
    p.add_argument("--image-id", required=True)
    p.add_argument("--out", required=True, help="shard to write (<image_id>.h5)")
    p.add_argument("--record", required=True, help="extraction record to write (<image_id>.record.json)")
    p.add_argument("--force", action="store_true", help="re-extract even if the shard is up to date")
    progress_mod.add_quiet_argument(p)


def run(args: argparse.Namespace) -> int:
    cfg = progress_mod.apply_quiet(config_mod.load(args.config), args.quiet)
    item = manifest_entry(cfg, args.cohort, args.image_id)
    extract_image(item, cfg, args.cohort, args.out, args.record, force=args.force)
    return 0

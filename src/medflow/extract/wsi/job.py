"""WSI patch extraction: one slide → one labelled HDF5 shard + its extraction record (`medflow extract-wsi`).

Pipeline per slide: open with OpenSlide → level-0 mpp (metadata, else manifest, else cohort) → read
plan (pyramid level + optional resampling for the target µm/px) → tissue mask (Otsu or a user mask)
→ annotation polygons rasterised onto a coverage grid (cells of 1/8 patch) → per-patch tumour and
tissue coverage from integral images → label and sample (seeded random per class, or a grid) →
read the patches at OpenSlide's decode rate (raw ARGB buffer → RGB numpy, no PIL image per patch;
optional worker processes) → reject white/black/blurred patches → stream into a shard
(`medflow.core.shards.ShardWriter`) from a writer thread while the next batch decodes.
Skip-if-up-to-date, ``--force``, ``on_error`` and atomic outputs: `medflow.extract.job`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import openslide

from ...core import config as config_mod
from ...core import progress as progress_mod
from ...core.errors import InputError
from ...core.manifest import ImageEntry
from ...core.manifest import entry as manifest_entry
from ...core.records import JobRecord
from ...core.shards import ShardWriter, open_shard
from .. import job as job_mod
from . import classes, qc, stain_reference, tissue
from .reading import BackgroundWriter, PatchSource, read_into
from .sampling import Candidates, SlideAnnotations, coverage, label_map, sample, slide_annotations, slide_rng
from .slide import ReadPlan, choose_level, level0_mpp, open_slide
from .stain import StainNormaliser


def input_files(entry: ImageEntry) -> dict[str, str]:
    return {"image": entry.image, "annotation": entry.annotation, "mask": entry.mask}


def extract_slide(
    entry: ImageEntry,
    cfg: dict,
    cohort: str,
    out: str | Path,
    record_path: str | Path,
    *,
    cache_bytes: int | None = None,
    force: bool = False,
    verbose: bool = True,
    stain: str | Path | None = None,
) -> dict:
    """Extract one slide into ``out`` and write its record; returns the record.

    ``cache_bytes`` sets OpenSlide's tile cache (0 disables it; None keeps the default), for
    benchmarks. ``force`` ignores an up-to-date shard. With ``wsi.on_error: skip`` a bad input
    gives a ``failed`` record and no shard; with ``fail`` the InputError propagates and nothing is written.
    ``stain``: the cohort's stain reference (`medflow fit-stain`), required when ``wsi.stain.apply`` is
    extraction; the shard then depends on its digest (inputs ``params.stain``).
    """
    classes.check_quota(cfg["wsi"]["sampling"], classes.class_map(cfg["wsi"]["labels"]).classes)
    target = job_mod.Target("wsi", cohort, entry, Path(out), Path(record_path))
    normaliser = stain_reference.for_extraction(cfg, cohort, stain)
    params: dict[str, Any] = {"manifest_mpp": entry.mpp}
    if normaliser is not None:
        params["stain"] = normaliser.digest

    def extract(target: job_mod.Target, cfg: dict, rec: JobRecord, inputs: dict) -> None:
        _extract(target, cfg, rec, inputs, cache_bytes, normaliser, stain, verbose)

    record = job_mod.run(
        target,
        cfg,
        lambda: input_files(entry),
        extract,
        params=params,
        force=force,
        verbose=verbose,
    )
    if record["status"] != "ok":  # on_error: skip removed the stale shard; its QC image goes with it
        qc.qc_path(target.shard).unlink(missing_ok=True)
    return record


def _tissue_mask(slide: Any, entry: ImageEntry, mpp0: float, wsi_cfg: dict) -> tissue.TissueMask:
    return tissue.slide_tissue(slide, entry, mpp0, wsi_cfg["tissue"])


def _extract(
    target: job_mod.Target,
    cfg: dict,
    rec: JobRecord,
    inputs: dict,
    cache_bytes: int | None,
    normaliser: StainNormaliser | None = None,
    stain_path: str | Path | None = None,
    verbose: bool = True,
) -> None:
    entry, wsi_cfg = target.entry, cfg["wsi"]
    cmap = classes.class_map(wsi_cfg["labels"])
    n_classes = len(cmap.classes)
    with rec.timed("open"):
        slide = open_slide(entry.image)
        if cache_bytes is not None:
            slide.set_cache(openslide.OpenSlideCache(cache_bytes))
        mpp0, mpp_source = level0_mpp(slide, entry, cfg, target.cohort)
        plan = choose_level(
            slide.level_downsamples, mpp0, wsi_cfg["mpp"], wsi_cfg["patch_size"], wsi_cfg["mpp_tolerance"], entry.image
        )
    dims: tuple[int, int] = slide.dimensions
    with rec.timed("mask"):
        tm = _tissue_mask(slide, entry, mpp0, wsi_cfg)
    thumb = None
    if wsi_cfg["qc"]["max_px"]:
        with rec.timed("qc"):  # read before anything is written: a decode error leaves no output
            try:
                thumb = qc.read_thumbnail(slide, wsi_cfg["qc"]["max_px"])
            except openslide.OpenSlideError as exc:
                raise InputError(entry.image, f"decode error while reading the QC thumbnail ({exc})") from None
    with rec.timed("annotations"):
        ann = slide_annotations(entry, dims, cmap)
        try:
            cov = coverage(dims, plan, tm, ann, wsi_cfg["labels"]["tumour_on_tissue"], cmap.annotated)
        except InputError as exc:
            raise InputError(entry.image, exc.problem) from None
    with rec.timed("sampling"):
        labels = label_map(cov, wsi_cfg["labels"], cmap.background)
        cand = sample(labels, cov, dims, plan, wsi_cfg, slide_rng(cfg, entry.image_id), n_classes)
    if cand.total == 0:
        raise InputError(entry.image, "no patch meets the tissue/label thresholds (wsi.labels, wsi.tissue)")
    attrs = {**job_mod.base_attrs(target, cfg, inputs, rec["config_hash"]), **_geometry_attrs(plan, mpp_source, tm)}
    rejected: list[np.ndarray] = []
    if normaliser is not None:
        attrs["stain"] = normaliser.record(applied="extraction", reference=str(stain_path))
    _read_and_write(target, cfg, slide, plan, cand, attrs, rec, cache_bytes, rejected, normaliser, verbose)
    slide.close()
    rec["wsi"] = {**_wsi_summary(plan, mpp_source, tm, cand), "unsampled_groups": ann.other_groups}
    if thumb is not None:
        with rec.timed("qc"):
            rec["qc"] = _write_qc(target, thumb, tm, ann, list(cmap.classes), rejected, plan.footprint, rec)
    print(
        f"extract-wsi {entry.image_id}: {plan.mpp:.3f} µm/px (level {plan.level}"
        f"{', resampled' if plan.resample else ''})"
    )


def _geometry_attrs(plan: ReadPlan, mpp_source: str, tm: tissue.TissueMask) -> dict[str, Any]:
    return {
        "patch_size": plan.patch_size,
        "channels": 3,
        "mpp": plan.mpp,
        "level": plan.level,
        "downsample": plan.level_downsample,
        "read_size": plan.read_size,
        "level0_mpp": plan.level0_mpp,
        "mpp_source": mpp_source,
        "resampling": "lanczos" if plan.resample else "none",
        "tissue_threshold": tm.threshold,
    }


def _read_and_write(
    target: job_mod.Target,
    cfg: dict,
    slide: Any,
    plan: ReadPlan,
    cand: Candidates,
    attrs: dict,
    rec: JobRecord,
    cache_bytes: int | None,
    rejected: list[np.ndarray] | None = None,
    normaliser: StainNormaliser | None = None,
    verbose: bool = True,
) -> None:
    """Read the candidates into the shard (atomically), recording read/write timings and rejects; quality
    is judged on the raw patches, the stain normaliser (if any) runs in the writer thread.

    Stages do not overlap: ``read`` runs to the end of the read loop (the writer thread appends and
    normalises meanwhile; its busy times are ``concurrent_s``), ``write`` from there to the renamed shard.
    """
    t0 = time.perf_counter()
    # The pool is forked before the writer thread and the HDF5 file exist.
    source = PatchSource(target.entry.image, slide, plan, cfg["wsi"]["workers"], cache_bytes)
    wanted = sum(min(cand.quota[c], len(cand.coords[c])) for c in cand.coords)
    report = progress_mod.reporter(cfg, f"extract-wsi {target.entry.image_id}", wanted, "patches", enabled=verbose)
    try:
        with ShardWriter(
            target.shard,
            (plan.patch_size, plan.patch_size, 3),
            "uint8",
            attrs,
            chunk_patches=cfg["shards"]["chunk_patches"],
            compression=cfg["shards"]["compression"],
        ) as writer:
            # Normalisation runs in the writer thread, beside the decode, on as many threads as the job has CPUs.
            threads = cfg["wsi"]["workers"]
            transform = (lambda p: normaliser.apply(p, threads=threads)) if normaliser is not None else None
            sink = BackgroundWriter(writer, transform)
            try:
                kept, n_read = read_into(source, cand, cfg["wsi"]["quality"], sink, rejected, report.advance)
            finally:
                t_read = time.perf_counter()
                sink.close()
            if writer.n == 0:
                raise InputError(
                    target.entry.image, "every candidate patch was rejected as white/black/blurred (wsi.quality)"
                )
            writer.attrs["timings_s"] = {**rec["timings_s"], "read": t_read - t0}
    finally:
        source.close()
        report.close()
    rec["timings_s"]["read"] = t_read - t0
    rec["timings_s"]["write"] = time.perf_counter() - t_read
    rec["concurrent_s"] = {"write_thread": sink.seconds}
    if normaliser is not None:
        rec["concurrent_s"]["stain"] = sink.transform_seconds  # in the writer thread, overlapping `read`
        rec["stain"] = {
            "method": normaliser.method,
            "digest": normaliser.digest,
            "applied": "extraction",
            "passed_through": normaliser.passed_through,
        }
    rec["patches_read"] = n_read
    rec["quality_rejected"] = n_read - sum(kept.values())


def _write_qc(
    target: job_mod.Target,
    thumb: qc.Thumb,
    tm: tissue.TissueMask,
    ann: SlideAnnotations,
    class_names: list[str],
    rejected: list[np.ndarray],
    footprint: float,
    rec: JobRecord,
) -> dict[str, Any]:
    """Draw what the shard holds (its coords and labels) on the thumbnail; the record's ``qc`` entry."""
    with open_shard(target.shard) as h5:
        coords, labels = h5["coords"][:], h5["labels"][:]
    rejects = np.concatenate(rejected) if rejected else np.zeros((0, 2), dtype=np.int64)
    n_read = int(rec["patches_read"])
    title = (
        f"{target.entry.image_id}: tissue {100 * tm.fraction:.1f} % of the slide, {len(labels)} patches kept "
        f"of {n_read} read ({100 * len(rejects) / max(n_read, 1):.0f} % rejected)"
    )
    image = qc.draw(thumb, tm, ann, class_names, coords, labels, rejects, footprint, title)
    path = qc.qc_path(target.shard)
    qc.write(path, image)
    return {
        "png": os.path.relpath(path.resolve(), target.record.resolve().parent),
        "size": list(image.size),
        "level0_px_per_px": round(thumb.scale_x, 4),
        "rejected_fraction": len(rejects) / n_read if n_read else None,
    }


def _wsi_summary(plan: ReadPlan, mpp_source: str, tm: tissue.TissueMask, cand: Candidates) -> dict[str, Any]:
    return {
        **plan.summary(mpp_source),
        "tissue_fraction": tm.fraction,
        "tissue_mm2": float(tm.mask.sum()) * (tm.cell * plan.level0_mpp) ** 2 / 1e6,
        "tissue_threshold": tm.threshold,
        "candidates": cand.total,
    }


# ---- CLI -----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="effective config YAML")
    p.add_argument("--cohort", required=True, help="cohort name (cohorts.<name> in the config)")
    p.add_argument("--image-id", required=True, help="image_id of the manifest row")
    p.add_argument("--out", required=True, help="shard to write (<image_id>.h5)")
    p.add_argument("--record", required=True, help="extraction record to write (<image_id>.record.json)")
    p.add_argument("--force", action="store_true", help="re-extract even if the shard is up to date")
    p.add_argument(
        "--stain", default=None, help="stain reference JSON (medflow fit-stain), when wsi.stain.apply is extraction"
    )
    progress_mod.add_quiet_argument(p)


def run(args: argparse.Namespace) -> int:
    cfg = progress_mod.apply_quiet(config_mod.load(args.config), args.quiet)
    classes.check_quota(
        cfg["wsi"]["sampling"], classes.class_map(cfg["wsi"]["labels"], args.config).classes, args.config
    )
    entry = manifest_entry(cfg, args.cohort, args.image_id)
    extract_slide(entry, cfg, args.cohort, args.out, args.record, force=args.force, stain=args.stain)
    return 0

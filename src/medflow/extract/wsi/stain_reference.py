"""`medflow fit-stain`: a cohort's stain reference — the Reinhard or Macenko target every patch is
normalised to — fitted once and written with its provenance (``results/<site>/stain/<cohort>.json``).

Sources (``wsi.stain.reference.source``):

- ``region``: a rectangle of one slide, level-0 ``x, y, width, height``, read at the extraction µm/px
  (the read plan of `medflow.extract.wsi.slide.choose_level`, Lanczos when it resamples); transparent
  (unscanned) pixels are left out.
- ``cohort``: one pass over the cohort's slides: per slide, ``patches_per_slide`` patch positions drawn
  (seed stream ``stain/<image_id>``) from the tissue mask (`medflow.extract.wsi.tissue`), read at the
  extraction µm/px, white/black/blurred ones dropped as extraction drops them (`wsi.quality`); the
  slide's target is fitted on their pixels and the cohort's target is the element-wise median over
  slides (Macenko's stain vectors re-normalised). With ``wsi.on_error: skip`` a slide that fails is
  listed under ``skipped`` and left out.

In both, the target is computed from the reference pixels exactly as a patch's own statistics are
(`medflow.extract.wsi.stain.fit`), so a patch equal to the reference is mapped onto itself.

The document is a job record plus ``format`` (``medflow-stain/1``), ``method``, ``params``, ``target``,
``digest`` (what shards and models record), ``reference`` (source details, per-slide targets) and
``inputs`` (file digests). `load_reference` rebuilds the normaliser; `for_extraction` is what
`medflow extract-wsi` applies.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from PIL import Image

from ...core import config as config_mod
from ...core import fsio
from ...core.errors import InputError
from ...core.manifest import ImageEntry
from ...core.manifest import entries as manifest_entries
from ...core.records import JobRecord
from ...core.seeds import rng_for
from .. import job as job_mod
from . import stain, tissue
from .quality import quality_ok
from .slide import ReadPlan, RegionReader, choose_level, level0_mpp, open_slide, slide_mpp

STAIN_FORMAT = "medflow-stain/1"
KEY = "wsi.stain.reference"
MAX_REGION_PIXELS = 4096 * 4096  # pixels read for a region reference (at the read level)


def stain_config(cfg: dict) -> dict:
    return cfg["wsi"]["stain"]


def enabled(cfg: dict) -> bool:
    """Whether ``wsi.stain`` normalises (a config without the section, not validated, does not)."""
    return cfg["wsi"].get("stain", {}).get("method", "none") != "none"


def configured_params(cfg: dict) -> dict[str, float]:
    scfg = stain_config(cfg)
    return stain.method_params(scfg["method"], scfg[scfg["method"]])


def config_sections(cohort: str) -> tuple[str, ...]:
    """Config sections a stain reference depends on (and the seed)."""
    return (
        "wsi.stain",
        "wsi.mpp",
        "wsi.mpp_tolerance",
        "wsi.patch_size",
        "wsi.tissue",
        "wsi.quality",
        f"cohorts.{cohort}",
    )


# ---- reading reference pixels ------------------------------------------------------------------------
def _region_pixels(cfg: dict, config_path: str | Path) -> tuple[np.ndarray, dict[str, Any], dict[str, str]]:
    """(P, 3) uint8 opaque pixels of the configured region, its description, its input files."""
    wsi_cfg = cfg["wsi"]
    region = stain_config(cfg)["reference"]["region"]
    if not region["slide"]:
        raise InputError(config_path, f"{KEY}.region.slide is not set (source: region)")
    x, y, width, height = (int(region[k]) for k in ("x", "y", "width", "height"))
    if width <= 0 or height <= 0:
        raise InputError(config_path, f"{KEY}.region width and height must be > 0 (got {width}×{height})")
    path = region["slide"]
    slide = open_slide(path)
    try:
        return _read_region(slide, path, (x, y, width, height), float(region["mpp"] or 0), wsi_cfg)
    finally:
        slide.close()


def _read_region(
    slide: Any, path: str, box: tuple[int, int, int, int], manual_mpp: float, wsi_cfg: dict
) -> tuple[np.ndarray, dict[str, Any], dict[str, str]]:
    x, y, width, height = box
    mpp0 = slide_mpp(slide) or manual_mpp
    if not mpp0:
        raise InputError(path, f"no mpp metadata; set {KEY}.region.mpp")
    plan = choose_level(
        slide.level_downsamples, mpp0, wsi_cfg["mpp"], wsi_cfg["patch_size"], wsi_cfg["mpp_tolerance"], path
    )
    dims = slide.dimensions
    if x + width > dims[0] or y + height > dims[1]:
        raise InputError(
            path,
            f"{KEY}.region (x {x}, y {y}, width {width}, height {height}) lies outside the slide "
            f"({dims[0]}×{dims[1]} level-0 px)",
        )
    read_w = max(1, round(width / plan.level_downsample))
    read_h = max(1, round(height / plan.level_downsample))
    if read_w * read_h > MAX_REGION_PIXELS:
        raise InputError(
            path,
            f"{KEY}.region is {read_w}×{read_h} px at level {plan.level}; at most {MAX_REGION_PIXELS} px "
            "(choose a smaller region)",
        )
    try:
        img = slide.read_region((x, y), plan.level, (read_w, read_h))
    except openslide.OpenSlideError as exc:
        raise InputError(path, f"decode error reading {KEY}.region ({exc})") from None
    if plan.resample:
        size = (
            max(1, round(read_w * plan.patch_size / plan.read_size)),
            max(1, round(read_h * plan.patch_size / plan.read_size)),
        )
        img = img.resize(size, Image.Resampling.LANCZOS)
    rgba = np.asarray(img)
    opaque = rgba[..., 3] == 255
    info = {
        "source": "region",
        "slide": str(path),
        "region": {"x": x, "y": y, "width": width, "height": height},
        "level": plan.level,
        "mpp": plan.mpp,
        "level0_mpp": mpp0,
        "pixels": int(opaque.sum()),
    }
    return rgba[..., :3][opaque], info, {"region_slide": str(path)}


def _tissue_mask(slide: Any, entry: ImageEntry, mpp0: float, tissue_cfg: dict) -> tissue.TissueMask:
    """The slide's tissue mask as extraction builds it (a user mask, else Otsu); InputError without tissue."""
    if entry.mask:
        tm = tissue.user_mask(entry.mask, *slide.dimensions)
    elif tissue_cfg["method"] == "mask":
        raise InputError(entry.image, "wsi.tissue.method is 'mask' but the manifest row has no mask")
    else:
        try:
            tm = tissue.otsu_mask(slide, mpp0, tissue_cfg)
        except openslide.OpenSlideError as exc:
            raise InputError(entry.image, f"decode error while building the tissue mask ({exc})") from None
    if not tm.mask.any():
        raise InputError(
            entry.mask or entry.image,
            f"no tissue found for the stain reference ({KEY}.source: cohort; threshold {tm.threshold:.1f} "
            f"on {tissue_cfg['channel']}; adjust wsi.tissue or supply a mask)",
        )
    return tm


def tissue_patch_coords(
    tm: tissue.TissueMask, plan: ReadPlan, dims: tuple[int, int], k: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``k`` level-0 top-left corners of patches centred on distinct tissue cells, row-major."""
    rows, cols = np.nonzero(tm.mask)
    pick = np.sort(rng.choice(len(rows), size=min(k, len(rows)), replace=False))
    foot = plan.footprint
    cx = (cols[pick] + 0.5) * tm.cell - foot / 2
    cy = (rows[pick] + 0.5) * tm.cell - foot / 2
    x = np.clip(np.round(cx), 0, max(0, dims[0] - int(np.ceil(foot)))).astype(np.int64)
    y = np.clip(np.round(cy), 0, max(0, dims[1] - int(np.ceil(foot)))).astype(np.int64)
    coords = np.stack([x, y], axis=1)
    return coords[np.lexsort((coords[:, 0], coords[:, 1]))]


def _slide_target(entry: ImageEntry, cfg: dict, cohort: str, method: str, params: dict) -> dict[str, Any]:
    """Target of one slide of the cohort: fitted on its sampled tissue patches."""
    wsi_cfg = cfg["wsi"]
    slide = open_slide(entry.image)
    try:
        mpp0, _ = level0_mpp(slide, entry, cfg, cohort)
        plan = choose_level(
            slide.level_downsamples, mpp0, wsi_cfg["mpp"], wsi_cfg["patch_size"], wsi_cfg["mpp_tolerance"], entry.image
        )
        tm = _tissue_mask(slide, entry, mpp0, wsi_cfg["tissue"])
        rng = rng_for(cfg["seed"], "stain", entry.image_id)
        coords = tissue_patch_coords(
            tm, plan, slide.dimensions, stain_config(cfg)["reference"]["patches_per_slide"], rng
        )
        patches = RegionReader(slide, plan, entry.image).read(coords)
    finally:
        slide.close()
    keep = quality_ok(patches, wsi_cfg["quality"])
    if not keep.any():
        raise InputError(
            entry.image,
            "every sampled tissue patch of the stain reference was rejected as white/black/blurred (wsi.quality)",
        )
    try:
        target = stain.fit(method, params, patches[keep].reshape(-1, 3))
    except stain.DegenerateReference as exc:
        raise InputError(entry.image, f"degenerate stain reference ({KEY}.source: cohort): {exc}") from None
    return {"image_id": entry.image_id, "patches": int(keep.sum()), "target": target}


# ---- the reference document ----------------------------------------------------------------------------
def fit_reference(cfg: dict, cohort: str, config_path: str | Path, out: str | Path) -> dict[str, Any]:
    """Fit the configured reference of ``cohort`` and write it to ``out`` (atomically); returns the document."""
    scfg = stain_config(cfg)
    if scfg["method"] == "none":
        raise InputError(config_path, "wsi.stain.method is none: there is no stain reference to fit")
    if cfg["cohorts"].get(cohort, {}).get("kind") != "wsi":
        raise InputError(config_path, f"cohort {cohort!r} is not a WSI cohort of the config")
    method, params = scfg["method"], configured_params(cfg)
    rec = JobRecord("fit-stain", cfg, config_sections(cohort), format=STAIN_FORMAT, cohort=cohort)
    source = scfg["reference"]["source"]
    if source == "region":
        with rec.timed("read"):
            pixels, info, files = _region_pixels(cfg, config_path)
        with rec.timed("fit"):
            try:
                target = stain.fit(method, params, pixels)
            except stain.DegenerateReference as exc:
                raise InputError(info["slide"], f"degenerate stain reference ({KEY}.region): {exc}") from None
    else:
        per_slide, skipped, files = [], [], {}
        with rec.timed("fit"):
            for entry in manifest_entries(cfg, cohort):
                try:
                    per_slide.append(_slide_target(entry, cfg, cohort, method, params))
                    files[entry.image_id] = entry.image
                    if entry.mask:
                        files[f"{entry.image_id}.mask"] = entry.mask
                except InputError as exc:
                    if cfg["wsi"]["on_error"] != "skip":
                        raise
                    skipped.append({"image_id": entry.image_id, "error": str(exc)})
            if not per_slide:
                raise InputError(
                    cfg["cohorts"][cohort]["manifest"], f"no slide of cohort {cohort!r} gave a stain reference"
                )
            target = stain.median_target(method, [s["target"] for s in per_slide])
        info = {
            "source": "cohort",
            "patches_per_slide": scfg["reference"]["patches_per_slide"],
            "mpp": cfg["wsi"]["mpp"],
            "slides": per_slide,
            "skipped": skipped,
        }
    with rec.timed("hash"):
        inputs = job_mod.fingerprint(files)
    norm = stain.make(method, params, target)
    rec.update(norm.record(), reference=info, inputs=inputs)
    rec.finish("ok").save(out)
    return dict(rec)


def load_reference(path: str | Path, cohort: str | None = None) -> stain.StainNormaliser:
    """The normaliser of a stain reference document (``medflow-stain/1``); InputError naming the file."""
    doc = fsio.read_json_document(path, "stain reference", STAIN_FORMAT)
    if doc.get("status") != "ok":
        raise InputError(path, f"stain reference has status {doc.get('status')!r}")
    if cohort is not None and doc.get("cohort") != cohort:
        raise InputError(path, f"stain reference is of cohort {doc.get('cohort')!r}, not {cohort!r}")
    return stain.from_record(doc, path)


def check_matches_config(norm: stain.StainNormaliser, cfg: dict, path: str | Path) -> None:
    """The reference must be of the configured method and parameters (else it is stale: refit it)."""
    scfg = stain_config(cfg)
    if norm.method != scfg["method"] or norm.params != configured_params(cfg):
        raise InputError(
            path,
            f"stain reference is {norm.method} {norm.params}, the config (wsi.stain) asks for "
            f"{scfg['method']} {configured_params(cfg) if scfg['method'] != 'none' else ''}; rerun medflow fit-stain",
        )


def for_extraction(cfg: dict, cohort: str, path: str | Path | None) -> stain.StainNormaliser | None:
    """The normaliser `medflow extract-wsi` applies (``wsi.stain.apply: extraction``), else None;
    InputError when ``path`` is missing, stale, or given although nothing is applied at extraction."""
    wanted = enabled(cfg) and stain_config(cfg)["apply"] == "extraction"
    if not wanted:
        if path:
            raise InputError(path, "a stain reference was given but wsi.stain does not normalise at extraction")
        return None
    if not path:
        raise InputError(
            cfg["cohorts"][cohort]["manifest"],
            f"wsi.stain.apply is extraction: give the stain reference of cohort {cohort!r} (--stain, medflow fit-stain)",
        )
    norm = load_reference(path, cohort)
    check_matches_config(norm, cfg, path)
    return norm


# ---- CLI -----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="effective config YAML")
    p.add_argument("--cohort", required=True, help="WSI cohort (cohorts.<name>)")
    p.add_argument("--out", required=True, help="stain reference JSON to write (results/<site>/stain/<cohort>.json)")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    doc = fit_reference(cfg, args.cohort, args.config, args.out)
    print(
        f"fit-stain {args.cohort}: {doc['method']} target {doc['target']} (digest {doc['digest']}, "
        f"source {doc['reference']['source']}) → {args.out}"
    )
    return 0

"""The synthetic demo cohort (`medflow synth`): real file formats, deterministic from the config seed.

WSI slides are pyramidal tiled TIFFs (OpenSlide reads them as `generic-tiff`, every level, mpp from
the resolution tags) with CAMELYON-style ASAP XML annotations; HSI images are raw mosaics with
white/dark frames and a PNG ground truth. Each modality gets a CSV manifest, like any site cohort.

`plan(cfg)` lists the images before anything is written, so the workflow DAG can be built from it
(the Snakefile's demo wiring, workflow/rules/demo.smk). Nothing in the product imports this package.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..core import config as config_mod
from ..core import fsio
from ..core.errors import InputError
from ..core.manifest import ImageEntry, write_manifest
from ..core.seeds import rng_for
from ..extract.wsi.annotations import write_asap_xml
from ..extract.wsi.pyramid import write_pyramid_tiff
from .content import HSI_CLASSES, HSI_WAVELENGTHS, make_hsi, make_slide


# ---- plan ---------------------------------------------------------------------------------------
def plan(cfg: dict) -> dict[str, list[ImageEntry]]:
    """The demo cohort's manifest rows, computed from the config alone."""
    out = Path(cfg["synth"]["out"])
    seed = cfg["seed"]
    wsi_cfg, hsi_cfg = cfg["synth"]["wsi"], cfg["synth"]["hsi"]
    wsi = []
    for p in range(wsi_cfg["patients"]):
        patient = f"wsi_p{p:02d}"
        n_slides = int(rng_for(seed, "slides", patient).integers(1, wsi_cfg["max_slides_per_patient"] + 1))
        # Slides with tumour (s0, s1, ...), then tumour-free ones (n0, ...) labelled "normal" in the manifest.
        ids = [(f"{patient}_s{s}", "") for s in range(n_slides)]
        ids += [(f"{patient}_n{k}", "normal") for k in range(wsi_cfg["normal_slides"])]
        for image_id, label in ids:
            wsi.append(
                ImageEntry(
                    image_id=image_id,
                    patient_id=patient,
                    image=str(out / "wsi" / f"{image_id}.tiff"),
                    annotation=str(out / "wsi" / f"{image_id}.xml"),
                    label=label,
                )
            )
    hsi = []
    for p in range(hsi_cfg["patients"]):
        patient = f"hsi_p{p:02d}"
        image_id = f"{patient}_i0"
        folder = out / "hsi" / image_id
        hsi.append(
            ImageEntry(
                image_id=image_id,
                patient_id=patient,
                image=str(folder / "raw.npy"),
                annotation=str(folder / "gt.png"),
                white=str(folder / "white.npy"),
                dark=str(folder / "dark.npy"),
            )
        )
    return {"wsi": wsi, "hsi": hsi}


def manifest_path(cfg: dict, kind: str) -> str:
    """Where `medflow synth` writes the manifest of the demo's ``kind`` images (a cohort names it)."""
    return str(Path(cfg["synth"]["out"]) / kind / "manifest.csv")


def planned_manifests(cfg: dict) -> dict[str, list[ImageEntry]]:
    """Manifest path → its planned rows, for every manifest the demo writes."""
    return {manifest_path(cfg, kind): entries for kind, entries in plan(cfg).items()}


def planned_files(cfg: dict) -> list[str]:
    """Every file `medflow synth` writes (the rule's outputs)."""
    entries = plan(cfg)
    files = [manifest_path(cfg, kind) for kind in ("wsi", "hsi")]
    for kind in ("wsi", "hsi"):
        for e in entries[kind]:
            files.extend(e.files())
    return files


# ---- writing ------------------------------------------------------------------------------------
def _write_png(path: str | Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    fsio.write_bytes(path, buf.getvalue())


def _write_slide(seed: int, wsi_cfg: dict, entry: ImageEntry) -> None:
    rgb, polygons = make_slide(
        rng_for(seed, "wsi", entry.image_id),
        wsi_cfg["width"],
        wsi_cfg["height"],
        wsi_cfg["mpp"],
        with_tumour=entry.label != "normal",
    )
    write_pyramid_tiff(entry.image, rgb, wsi_cfg["mpp"])
    write_asap_xml(entry.annotation, {"metastases": polygons})


def write_cohort(cfg: dict, only: str | None = None, workers: int = 1) -> dict[str, float]:
    """Write the whole demo cohort. Existing identical files are simply rewritten (deterministic).

    Each slide has its own random stream, so ``workers`` processes (one when ≤ 1) write the same files as one."""
    seed, out = cfg["seed"], Path(cfg["synth"]["out"])
    entries = plan(cfg)
    timings = {}
    if only in (None, "wsi"):
        t0 = time.perf_counter()
        wc = cfg["synth"]["wsi"]
        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                list(pool.map(functools.partial(_write_slide, seed, wc), entries["wsi"]))
        else:
            for e in entries["wsi"]:
                _write_slide(seed, wc, e)
        write_manifest(manifest_path(cfg, "wsi"), entries["wsi"])
        timings["wsi_s"] = time.perf_counter() - t0
    if only in (None, "hsi"):
        t0 = time.perf_counter()
        hc = cfg["synth"]["hsi"]
        for e in entries["hsi"]:
            raw, white, dark, gt = make_hsi(rng_for(seed, "hsi", e.image_id), hc["mosaic_height"], hc["mosaic_width"])
            fsio.write_npy(e.image, raw)
            fsio.write_npy(e.white, white)
            fsio.write_npy(e.dark, dark)
            _write_png(e.annotation, gt)
        write_manifest(manifest_path(cfg, "hsi"), entries["hsi"])
        timings["hsi_s"] = time.perf_counter() - t0
    fsio.write_json(
        out / "synth.json",
        {
            "seed": seed,
            "config_hash": config_mod.section_hash(cfg, "synth"),
            "classes": {"wsi": ["normal", "tumour"], "hsi": list(HSI_CLASSES)},
            "wavelengths_nm": HSI_WAVELENGTHS.tolist(),
            "timings_s": timings,
        },
    )
    return timings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--only", choices=["wsi", "hsi"], help="write only one modality")
    p.add_argument("--workers", type=int, default=1, help="processes writing slides in parallel (same files)")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    if "synth" not in cfg:
        raise InputError(args.config, "no 'synth' section: the demo cohort is not configured")
    timings = write_cohort(cfg, args.only, args.workers)
    counts = {k: len(v) for k, v in plan(cfg).items()}
    print(
        f"synth: wrote {counts} images to {cfg['synth']['out']} in "
        + ", ".join(f"{k}={v:.1f}" for k, v in timings.items())
    )
    print(json.dumps({k: [e.image_id for e in v] for k, v in plan(cfg).items()}))
    return 0

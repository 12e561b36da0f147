"""Node-local measurements of `medflow bench`: WSI extraction, the HSI chain, HDF5 reads through the loader.

Each runs the product's own code on synthetic inputs (`medflow.bench.inputs`) for about
``bench.seconds``: `medflow.extract.wsi.job.extract_slide` (patches/s with 1 reader process and with
all allocated cores), `medflow.extract.hsi.chain.process_image` (images/s), and shuffled whole-chunk
reads through `medflow.train.loader` (MB/s, ms/patch).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..core import provenance
from ..core.index import load_index
from ..core.manifest import ImageEntry
from ..core.seeds import rng_for
from ..extract.hsi.chain import process_image
from ..extract.wsi.job import extract_slide
from ..train.loader import EpochLoader
from ..train.patchset import PatchSet
from . import inputs
from .timing import repeat_for


def _wsi_inputs(cfg: dict, scratch: Path, quick: bool) -> tuple[ImageEntry, dict, int]:
    """A synthetic slide + annotation and a grid-sampling extraction config."""
    # Level-0 mpp = the configured patch mpp: patches are read at level 0 without resampling, and a small
    # slide still yields a few hundred patches with 50 % grid overlap.
    side = 2048 if quick else 3072
    mpp = float(cfg["wsi"]["mpp"])
    entry = inputs.write_slide(scratch, rng_for(cfg["seed"], "bench", "wsi"), side, mpp)
    wcfg = copy.deepcopy(cfg)
    wcfg["cohorts"] = {"bench": {"kind": "wsi", "manifest": str(scratch / "unused.csv")}}
    wcfg["wsi"]["sampling"] = {**wcfg["wsi"]["sampling"], "mode": "grid", "overlap": 0.5, "max_patches": 0}
    wcfg["wsi"]["on_error"] = "fail"
    wcfg["wsi"]["stain"] = {**wcfg["wsi"].get("stain", {}), "method": "none"}  # decode throughput, no stain reference
    return entry, wcfg, side


def measure_wsi(cfg: dict, seconds: float, scratch: Path, quick: bool) -> dict[str, Any]:
    entry, wcfg, side = _wsi_inputs(cfg, scratch, quick)
    cores = provenance.allocated_cpus()
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {"slide_px": [side, side], "cores": cores, "runs": {}}
    for label, workers in (("1core", 1), ("all", cores)):
        wcfg["wsi"]["workers"] = workers
        out, rec_path = scratch / f"wsi_{label}.h5", scratch / f"wsi_{label}.record.json"

        def step() -> float:
            rec = extract_slide(entry, wcfg, "bench", out, rec_path, force=True, verbose=False)
            return float(rec["n_patches"])

        reps, patches, elapsed = repeat_for(seconds, step)
        metrics[f"wsi.patches_per_s.{label}"] = patches / elapsed
        details["runs"][label] = {"workers": workers, "extractions": reps, "patches": patches, "seconds": elapsed}
    details["patch_size"], details["mpp"] = wcfg["wsi"]["patch_size"], wcfg["wsi"]["mpp"]
    return {"metrics": metrics, "details": details}


# ---- HSI chain ------------------------------------------------------------------------------------
def measure_hsi(cfg: dict, seconds: float, scratch: Path, quick: bool) -> dict[str, Any]:
    size = int(cfg["hsi"]["mosaic"]["size"])
    # The brain study's snapshot camera is 2045×1085 px (409×217 × 25 bands); quick mode uses 500×400.
    h, w = (400, 500) if quick else (1085, 2045)
    h, w = h // size * size, w // size * size
    entry = inputs.write_hsi(scratch, rng_for(cfg["seed"], "bench", "hsi"), h, w, size)
    stage_sums: dict[str, float] = {}

    def step() -> float:
        _, _, timings = process_image(entry, cfg)
        for k, v in timings.items():
            stage_sums[k] = stage_sums.get(k, 0.0) + float(v)
        return 1.0

    reps, images, elapsed = repeat_for(seconds, step)
    stage_sums = {k: v / (reps + 1) for k, v in stage_sums.items()}  # the warm-up step is included
    return {
        "metrics": {"hsi.images_per_s": images / elapsed, "hsi.mpx_per_s": images * h * w / elapsed / 1e6},
        "details": {"mosaic": [h, w], "images": reps, "seconds": elapsed, "stage_s_per_image": stage_sums},
    }


# ---- HDF5 reads through the loader ----------------------------------------------------------------
def measure_hdf5(cfg: dict, seconds: float, scratch: Path, quick: bool) -> dict[str, Any]:
    size = int(cfg["wsi"]["patch_size"])
    n_patches = 256 if quick else 1024
    labels = [i % 2 for i in range(n_patches // 2)]
    index_path = inputs.write_synthetic_cohort(
        scratch / "hdf5",
        {"img0": ("p0", labels), "img1": ("p1", labels)},
        ["normal", "tumour"],
        patch_shape=(size, size, 3),
        chunk_patches=int(cfg["shards"]["chunk_patches"]),
        seed=int(cfg["seed"]),
        cohort="bench",
        compression=cfg["shards"]["compression"],
    )
    pset = PatchSet(load_index(index_path), ["p0", "p1"])
    loader = EpochLoader(pset, batch_size=64, shuffle=True, seed=int(cfg["seed"]), preload=False)
    epochs = [0]

    def step() -> float:
        loader.set_epoch(epochs[0])
        epochs[0] += 1
        n = 0
        for x, _ in loader:
            n += len(x)
        return float(n)

    reps, patches, elapsed = repeat_for(seconds, step)
    patch_bytes = size * size * 3
    pset.close()
    return {
        "metrics": {
            "hdf5.read_mb_per_s": patches * patch_bytes / elapsed / 1e6,
            "hdf5.ms_per_patch": 1000.0 * elapsed / patches,
        },
        "details": {
            "patches": patches,
            "epochs": reps,
            "seconds": elapsed,
            "patch_bytes": patch_bytes,
            "batch": 64,
            "chunk_patches": int(cfg["shards"]["chunk_patches"]),
            "note": "shuffled whole-chunk streaming reads (preload off), warm page cache",
        },
    }

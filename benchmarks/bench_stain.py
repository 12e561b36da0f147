#!/usr/bin/env python
"""Stain normalisation throughput on real 224² patches: medflow vs torchstain 1.4.1 (numpy), side by side.

Patches: ``--n`` random level-0 tissue patches of the real SVS files in ../shared/data (CMU-1-Small-Region,
JPEG; the TCGA frozen section, JPEG 2000), half each; the reference is a 800×800 tissue region of CMU.
One core: BLAS is limited to one thread before NumPy loads, every method runs in this process, and the
methods take turns within each of ``--repeats`` rounds (best round reported), so neighbours' load on a
shared node hits them alike. CPU time is this process's; wall time is printed too.

  transform   normalise patches onto a fitted target: medflow in batches of 64 (``StainNormaliser.apply``),
              torchstain one image at a time (``normalize``, its only API). Includes each patch's own
              statistics (Reinhard: L*a*b* mean/std; Macenko: its stain vectors and concentrations).
  fit         fit a target on one 224² patch (``stain.fit`` / torchstain ``fit``).
  decode      OpenSlide reads of the same patches (``RegionReader``, the reader extraction uses), tile cache
              on (OpenSlide's default) and off: what normalisation at extraction is added to.
  load        the training loader's read of the same patches from an HDF5 shard (memory-mapped gather),
              and HED jitter (``stain_jitter.hed_jitter``): what normalisation at load time is added to.
  extract     `medflow extract-wsi` end to end on CMU (grid of ``--n`` patches at 0.5 µm/px, one reader
              process) without normalisation and with each method applied at extraction: patches/s, and
              CPU ms/patch of the whole process (the normaliser runs in the shard-writer thread).

Published anchor: slideflow on an AMD Threadripper (all cores), 299² images: Macenko 881–929 img/s,
Reinhard-fast ~4,200 img/s; the "/299²" column converts one-core 224² rates to 299² images (× 224²/299²).

    .venv/bin/python benchmarks/bench_stain.py [--n 256] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, set before NumPy loads its BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import openslide  # noqa: E402

from medflow.bench.inputs import write_synthetic_cohort  # noqa: E402
from medflow.core import config as config_mod  # noqa: E402
from medflow.core.index import load_index  # noqa: E402
from medflow.core.manifest import entry as manifest_entry  # noqa: E402
from medflow.extract.wsi import stain, stain_reference  # noqa: E402
from medflow.extract.wsi.job import extract_slide  # noqa: E402
from medflow.extract.wsi.quality import quality_ok  # noqa: E402
from medflow.extract.wsi.slide import ReadPlan, RegionReader  # noqa: E402
from medflow.train.patchset import PatchSet  # noqa: E402
from medflow.train.stain_jitter import draw, hed_jitter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
SLIDES = {"cmu": "cmu1_small_region/CMU-1-Small-Region.svs", "tcga": "tcga_cr7395_svs/tcga-cr-7395-01a-01-ts1.svs"}
REFERENCE = {"x": 1000, "y": 1800, "width": 800, "height": 800}  # CMU tissue
SIZE, BATCH = 224, 64
PUBLISHED = {"macenko": "881–929", "reinhard": "~4,200 (fast)"}


def tissue_coords(slide: openslide.OpenSlide, n: int, seed: int) -> np.ndarray:
    """n level-0 corners of 224² patches passing extraction's quality rule (not mostly glass)."""
    rng = np.random.default_rng(seed)
    width, height = slide.dimensions
    out: list[tuple[int, int]] = []
    while len(out) < n:
        x, y = int(rng.integers(0, width - SIZE)), int(rng.integers(0, height - SIZE))
        patch = np.asarray(slide.read_region((x, y), 0, (SIZE, SIZE)))[..., :3]
        if quality_ok(patch[None], {"max_white": 0.5, "max_black": 0.1, "min_sharpness": 0})[0]:
            out.append((x, y))
    return np.asarray(sorted(out, key=lambda c: (c[1], c[0])), dtype=np.int64)


def best(methods: dict[str, tuple[Callable[[], int], int]], repeats: int) -> dict[str, dict[str, float]]:
    """Per method the fastest round's ms/patch (CPU and wall); one warm-up call each first."""
    for run, _ in methods.values():
        run()
    cpu = {name: float("inf") for name in methods}
    wall = dict(cpu)
    for _ in range(repeats):
        for name, (run, n) in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name] = min(wall[name], 1000 * (time.perf_counter() - t0) / n)
            cpu[name] = min(cpu[name], 1000 * (time.process_time() - c0) / n)
    return {name: {"cpu_ms": cpu[name], "wall_ms": wall[name]} for name in methods}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256, help="patches (half from each slide)")
    p.add_argument("--fit-n", type=int, default=16, help="patches fitted one by one per fit measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="")
    args = p.parse_args()
    try:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer
    except ImportError:
        print(
            "torchstain is not installed (pip install torchstain==1.4.1): no reference implementation", file=sys.stderr
        )
        return 1
    if not DATA.is_dir():
        print(f"real slides not found at {DATA} (set MEDFLOW_SHARED_DATA)", file=sys.stderr)
        return 1

    slides = {name: openslide.OpenSlide(str(DATA / rel)) for name, rel in SLIDES.items()}
    plan = ReadPlan(level=0, level_downsample=1.0, level0_mpp=0.5, read_size=SIZE, patch_size=SIZE)
    readers = {name: RegionReader(s, plan, name) for name, s in slides.items()}
    coords = {name: tissue_coords(s, args.n // 2, seed) for seed, (name, s) in enumerate(slides.items())}
    patches = np.concatenate([readers[name].read(coords[name]) for name in slides])
    ref = np.asarray(
        slides["cmu"].read_region((REFERENCE["x"], REFERENCE["y"]), 0, (REFERENCE["width"], REFERENCE["height"]))
    )[..., :3]
    fit_patches = patches[:: max(1, len(patches) // args.fit_n)][: args.fit_n]
    n = len(patches)

    def decode(cache: bool) -> Callable[[], int]:
        def run() -> int:
            for name, s in slides.items():
                s.set_cache(openslide.OpenSlideCache(256 << 20 if cache else 0))
                readers[name].read(coords[name])
            return n

        return run

    methods: dict[str, tuple[Callable[[], int], int]] = {
        "decode (OpenSlide, cache on)": (decode(True), n),
        "decode (OpenSlide, cache off)": (decode(False), n),
    }
    for method in ("reinhard", "macenko"):
        for label, params in (
            (method, {}),
            *((("reinhard, all pixels", {"background": 255}),) if method == "reinhard" else ()),
        ):
            norm = stain.make(method, params, stain.fit(method, params, ref.reshape(-1, 3)))
            out = np.empty_like(patches[:BATCH])

            def transform(norm: stain.StainNormaliser = norm, out: np.ndarray = out) -> int:
                for lo in range(0, n, BATCH):
                    norm.apply(patches[lo : lo + BATCH], out=out[: len(patches[lo : lo + BATCH])])
                return n

            methods[f"medflow {label}: transform"] = (transform, n)
            methods[f"medflow {label}: fit"] = (
                lambda method=method, params=params: (
                    [stain.fit(method, params, q.reshape(-1, 3)) for q in fit_patches] and len(fit_patches)
                ),
                len(fit_patches),
            )
        ts = NumpyReinhardNormalizer() if method == "reinhard" else NumpyMacenkoNormalizer()
        ts.fit(ref)
        call = (
            (lambda q, ts=ts: ts.normalize(q))
            if method == "reinhard"
            else (lambda q, ts=ts: ts.normalize(q, stains=False))
        )
        sub = patches[: max(BATCH, n // 4)]  # torchstain is slower: a quarter of the patches
        methods[f"torchstain {method}: transform"] = (
            lambda call=call, sub=sub: [call(q) for q in sub] and len(sub),
            len(sub),
        )
        fresh = NumpyReinhardNormalizer() if method == "reinhard" else NumpyMacenkoNormalizer()
        methods[f"torchstain {method}: fit"] = (
            lambda fresh=fresh: [fresh.fit(q) for q in fit_patches] and len(fit_patches),
            len(fit_patches),
        )

    with tempfile.TemporaryDirectory() as tmp:
        index = write_synthetic_cohort(
            tmp, {"s": ("P", [0] * n)}, ["a", "b"], patch_shape=(SIZE, SIZE, 3), make_patches=lambda rng, k: patches
        )
        pset = PatchSet(load_index(index), ["P"])
        order = np.random.default_rng(0).permutation(n)
        buf = np.empty((BATCH, SIZE, SIZE, 3), np.uint8)

        def load() -> int:
            for lo in range(0, n, BATCH):
                part = np.sort(order[lo : lo + BATCH])
                pset.read(part, out=buf[: len(part)])
            return n

        jit = draw(np.random.default_rng(1), n, 0.05, 0.05)

        def jitter() -> int:
            for lo in range(0, n, BATCH):
                hed_jitter(patches[lo : lo + BATCH], jit[lo : lo + BATCH], out=buf[: len(patches[lo : lo + BATCH])])
            return n

        methods["load (shard read, mmap gather)"] = (load, n)
        methods["HED jitter (training augmentation)"] = (jitter, n)
        results = best(methods, args.repeats)
        pset.close()

    scale = (SIZE * SIZE) / (299 * 299)
    print(f"{n} real 224² patches (CMU + TCGA), one core, best of {args.repeats} interleaved rounds\n")
    print(
        f"{'':44s} {'CPU ms/img':>10s} {'img/s':>8s} {'/299²':>7s} {'wall img/s':>10s}  published (slideflow, all cores, 299²)"
    )
    for name, r in results.items():
        rate = 1000 / r["cpu_ms"]
        published = next(
            (v for k, v in PUBLISHED.items() if name.startswith(f"medflow {k}") and "transform" in name), ""
        )
        print(
            f"{name:44s} {r['cpu_ms']:10.3f} {rate:8.0f} {rate * scale:7.0f} {1000 / r['wall_ms']:10.0f}  {published}"
        )
    print()
    for method in ("reinhard", "macenko"):
        for kind in ("transform", "fit"):
            ours, theirs = results[f"medflow {method}: {kind}"], results[f"torchstain {method}: {kind}"]
            print(
                f"medflow / torchstain {method} {kind}: {theirs['cpu_ms'] / ours['cpu_ms']:.1f}× faster (CPU), "
                f"{theirs['wall_ms'] / ours['wall_ms']:.1f}× (wall)"
            )
    decode_ms = results["decode (OpenSlide, cache on)"]["cpu_ms"]
    decode_off = results["decode (OpenSlide, cache off)"]["cpu_ms"]
    load_ms = results["load (shard read, mmap gather)"]["cpu_ms"]
    print()
    for method in ("reinhard", "macenko"):
        t = results[f"medflow {method}: transform"]["cpu_ms"]
        print(
            f"{method}: {t:.2f} ms/patch = {t / decode_ms:.2f}× the decode (cache on; {t / decode_off:.2f}× cache off) "
            f"— at extraction it runs in the writer thread, beside the decode; at load time it is "
            f"{t / load_ms:.0f}× the shard read: {1000 / t:.0f} img/s per core"
        )
    extraction = measure_extraction(n, args.repeats)
    print()
    base = extraction["none"]
    for name, r in extraction.items():
        print(
            f"extract-wsi, stain {name:8s}: {r['patches_per_s']:6.1f} patches/s wall ({r['patches_per_s'] / base['patches_per_s']:.2f}× "
            f"unnormalised), {r['cpu_ms']:.2f} CPU ms/patch (all threads; +{r['cpu_ms'] - base['cpu_ms']:.2f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"n": n, "results": results, "extraction": extraction}, indent=2))
    return 0


def measure_extraction(n: int, repeats: int) -> dict[str, dict[str, float]]:
    """Whole `medflow extract-wsi` jobs on CMU (grid, n patches), by stain method, best of interleaved rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "m.csv").write_text(f"image_id,patient_id,image\ncmu,P,{DATA / SLIDES['cmu']}\n")
        cfgs: dict[str, tuple[dict, Path | None]] = {}
        for method in ("none", "reinhard", "macenko"):
            cfg = config_mod.load(ROOT / "config.yaml")
            cfg["cohorts"] = {"b": {"kind": "wsi", "manifest": str(work / "m.csv")}}
            cfg["wsi"].update(mpp=0.5, sampling={**cfg["wsi"]["sampling"], "mode": "grid", "max_patches": n})
            region = {"slide": str(DATA / SLIDES["cmu"]), **REFERENCE}
            cfg["wsi"]["stain"] = {
                "method": method,
                "apply": "extraction",
                "reference": {"source": "region", "region": region},
            }
            cfg = config_mod.validate(cfg)
            ref = None
            if method != "none":
                ref = work / f"{method}.json"
                stain_reference.fit_reference(cfg, "b", "bench", ref)
            cfgs[method] = (cfg, ref)
        best_run: dict[str, dict[str, float]] = {m: {"patches_per_s": 0.0, "cpu_ms": float("inf")} for m in cfgs}
        for _ in range(repeats + 1):  # the first round warms the page cache
            for method, (cfg, ref) in cfgs.items():
                entry = manifest_entry(cfg, "b", "cmu")
                t0, c0 = time.perf_counter(), time.process_time()
                rec = extract_slide(
                    entry, cfg, "b", work / "s.h5", work / "s.json", force=True, verbose=False, stain=ref
                )
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                k = rec["n_patches"]
                best_run[method]["patches_per_s"] = max(best_run[method]["patches_per_s"], k / wall)
                best_run[method]["cpu_ms"] = min(best_run[method]["cpu_ms"], 1000 * cpu / k)
        return best_run


if __name__ == "__main__":
    sys.exit(main())

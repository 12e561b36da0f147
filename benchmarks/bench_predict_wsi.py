#!/usr/bin/env python
"""Whole-slide inference speed: `medflow predict-wsi` vs a bare loop on the same tiles, side by side.

(a) medflow end to end for one slide (`medflow.predict.wsi.SlideJob.run`: open, level-0 mpp, read
    plan, tissue mask, tile grid, background-thread reading + quality check, batched inference, and
    every output: .npz, heatmap PNG, GeoJSON, detection CSV, record);
(b) a bare loop over the same tile coordinates: `OpenSlide.read_region` → RGB numpy (→ PIL Lanczos
    when the plan resamples), batches of the same size through the same model (`predict_proba`).
Both are run alternately ``--repeats`` times; printed: tiles/s of each, the ratio a/b of the medians and
of each back-to-back pair, CPU ms per tile of the whole process, and medflow's model-busy fraction
(inference time / read+inference phase; on a GPU: how much the device waits on decoding).

Slide: ../shared/data CMU-1-Small-Region when present (else a synthetic pyramid), model: a randomly
initialised ResNet-18 at the demo's settings (input 112, 1 µm/px, 224-px tiles). Usage:

    .venv/bin/python benchmarks/bench_predict_wsi.py [--repeats 3] [--overlap 0.75] [--device auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medflow.bench.inputs import write_slide  # noqa: E402
from medflow.core import config as config_mod  # noqa: E402
from medflow.core.manifest import ImageEntry  # noqa: E402
from medflow.extract.wsi.slide import open_slide  # noqa: E402
from medflow.predict import wsi  # noqa: E402
from medflow.train import models  # noqa: E402

SHARED = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))


def bare_loop(entry: ImageEntry, coords, forward, level: int, read_size: int, patch: int, model, batch: int, device):
    """read_region of every tile + the same forward of the tiles medflow classifies (``forward``: those
    its quality check kept, so both do the same model work), nothing else; returns (seconds, probabilities)."""
    t0 = time.perf_counter()
    slide = open_slide(entry.image)
    out, pending = [], []
    for (x, y), keep in zip(coords.tolist(), forward.tolist()):
        rgb = np.asarray(slide.read_region((x, y), level, (read_size, read_size)))[..., :3]
        if read_size != patch:
            rgb = np.asarray(Image.fromarray(rgb).resize((patch, patch), Image.Resampling.LANCZOS))
        if not keep:
            continue
        pending.append(rgb)
        if len(pending) == batch:
            out.append(models.predict_proba(model, torch.from_numpy(np.stack(pending)).to(device)).cpu().numpy())
            pending = []
    if pending:
        out.append(models.predict_proba(model, torch.from_numpy(np.stack(pending)).to(device)).cpu().numpy())
    slide.close()
    return time.perf_counter() - t0, np.concatenate(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overlap", type=float, default=0.75, help="tile overlap (more tiles: a longer measurement)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument(
        "--slide", default="cmu", choices=["cmu", "tcga", "synthetic"], help="shared-data slide or a synthetic one"
    )
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_wsi_"))
    real = {  # image id → (file, manifest mpp): the TCGA slide has no mpp metadata (JPEG 2000 tiles)
        "cmu": (SHARED / "cmu1_small_region" / "CMU-1-Small-Region.svs", ""),
        "tcga": (SHARED / "tcga_cr7395_svs" / "tcga-cr-7395-01a-01-ts1.svs", "0.25"),
    }
    path, mpp = real.get(args.slide, (Path("/nonexistent"), ""))
    if path.is_file():
        entry = ImageEntry(args.slide, "p", str(path), mpp=float(mpp) if mpp else None)
    else:
        entry, mpp = write_slide(tmp, np.random.default_rng(0), 4096, 0.5), ""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    del cfg["synth"]
    manifest = tmp / "manifest.csv"
    manifest.write_text(f"image_id,patient_id,image,mpp\n{entry.image_id},p,{entry.image},{mpp}\n")
    cfg["cohorts"] = {"bench": {"kind": "wsi", "manifest": str(manifest)}}
    cfg["studies"] = {}
    cfg["predict_wsi"] = {"overlap": args.overlap, "batch_size": args.batch, "device": args.device}
    cfg = config_mod.validate(cfg)
    torch.manual_seed(0)
    net = models.build({"name": "resnet18", "input_size": 112}, 2, 3, cfg["wsi"]["patch_size"])
    models.save_model(tmp / "model.pt", net, {"class_names": ["normal", "tumour"], "kind": "wsi"})
    model, meta = models.load_model(tmp / "model.pt")
    d = wsi.make_dist(cfg)
    model = model.to(d.device).eval()
    job = wsi.SlideJob(cfg, "bench", model, meta, str(tmp / "model.pt"), d, "tumour")
    rows = []
    for rep in range(args.repeats):
        cpu0, t0 = time.process_time(), time.perf_counter()
        rec = job.run(entry, tmp / f"out{rep}", None, None)
        a_s, a_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert rec is not None
        with np.load(tmp / f"out{rep}" / f"{entry.image_id}.npz") as npz:
            coords, probs, ok = npz["coords"], npz["probabilities"], npz["quality_ok"]
        geo = rec["geometry"]
        cpu0 = time.process_time()
        b_s, b_probs = bare_loop(
            entry, coords, ok, geo["level"], geo["read_size"], geo["patch_size"], model, args.batch, d.device
        )
        b_cpu = time.process_time() - cpu0
        same = float(np.abs(b_probs - probs[ok]).max())
        n = len(coords)
        rows.append(
            {
                "tiles": n,
                "medflow_tiles_per_s": n / a_s,
                "bare_tiles_per_s": n / b_s,
                "ratio": b_s / a_s,
                "medflow_cpu_ms_per_tile": 1000 * a_cpu / n,
                "bare_cpu_ms_per_tile": 1000 * b_cpu / n,
                "model_busy_fraction": rec["throughput"]["model_busy_fraction"],
                "max_abs_prob_diff": same,
            }
        )
        r = rows[-1]
        print(
            f"repeat {rep}: {n} tiles  (a) medflow {r['medflow_tiles_per_s']:.1f} tiles/s  (b) bare "
            f"{r['bare_tiles_per_s']:.1f} tiles/s  a/b {r['ratio']:.2f}  CPU ms/tile {r['medflow_cpu_ms_per_tile']:.1f}"
            f" vs {r['bare_cpu_ms_per_tile']:.1f}  model busy {r['model_busy_fraction']:.2f}  |Δp| {same:.1e}"
        )
    a = statistics.median(r["medflow_tiles_per_s"] for r in rows)
    b = statistics.median(r["bare_tiles_per_s"] for r in rows)
    summary = {
        "slide": entry.image,
        "device": str(d.device),
        "threads": args.threads,
        "load_avg": os.getloadavg(),
        "median_medflow_tiles_per_s": a,
        "median_bare_tiles_per_s": b,
        "ratio_of_medians": a / b,
        "paired_ratios": [r["ratio"] for r in rows],
        "repeats": rows,
    }
    print(
        f"median: medflow {a:.1f} tiles/s, bare loop {b:.1f} tiles/s, ratio {a / b:.2f} (target ≥ 0.9); "
        f"paired {', '.join(f'{r:.2f}' for r in summary['paired_ratios'])}; device {d.device}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

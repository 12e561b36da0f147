"""Whole-image HSI classification maps (`medflow predict-hsi`).

For each image: rerun the extraction chain (`medflow.hsi.run_chain`, the same code as extraction),
round the cube through the shard dtype (so the model sees what it was trained on), view every
k×k×B window with ``sliding_window_view`` (no copy, no per-pixel loop), gather them in batches of
``hsi.predict_batch`` pixels and classify under ``torch.inference_mode()``. Writes per image
``<id>.npz`` (labels int16, −1 where the border was skipped; probabilities float16 (H,W,C);
class_names) and ``<id>.png`` (colour map with legend, next to the ground truth when present), plus
one ``record.json`` (job "predict-hsi").
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import config as config_mod
from ..core import fsio, provenance
from ..core import progress as progress_mod
from ..core.errors import InputError
from ..core.metrics import classification_metrics
from ..core.records import JobRecord
from ..extract.hsi import chain as hsi_chain
from ..extract.hsi.patches import pixel_windows
from ..train.models import load_model, predict_proba
from .targets import named_or_outer_test

# Fixed map colours (RGB) per class name, as in the brain-tumour study's maps: healthy green, tumour red,
# blood vessels blue/magenta, dura yellow. Other class names take matplotlib's tab10 colours in order.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "healthy": (0, 176, 0),
    "normal": (0, 176, 0),
    "tumour": (220, 0, 0),
    "tumor": (220, 0, 0),
    "venous": (30, 60, 255),
    "arterial": (255, 40, 210),
    "dura": (255, 210, 0),
    "background": (90, 90, 90),
}
NO_PREDICTION = (0, 0, 0)  # border pixels skipped (border: skip)
UNLABELLED_GT = (200, 200, 200)  # ground-truth panel: pixels without a label (light: unlike "not classified")


def class_palette(class_names: list[str]) -> np.ndarray:
    """(C+1, 3) uint8: row 0 = no prediction, row c+1 = class c."""
    from matplotlib import colormaps

    tab10 = colormaps["tab10"]
    rows: list[tuple[int, ...]] = [NO_PREDICTION]
    for i, name in enumerate(class_names):
        rgb = CLASS_COLOURS.get(name.lower())
        rows.append(rgb if rgb else tuple(int(255 * v) for v in tab10(i % 10)[:3]))
    return np.array(rows, dtype=np.uint8)


# ---- windows and prediction ---------------------------------------------------------------------------
def predict_cube(
    model: Any,
    cube: np.ndarray,
    k: int,
    border: str,
    batch: int,
    device: str = "cpu",
    on_done: Callable[[float], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(labels int16 (H,W) with −1 where no window, probabilities float16 (H,W,C), timings patches/predict).

    Batches are whole rows of windows (⌈batch / row width⌉ rows ≥ 1): a basic slice of the window view,
    copied once into a contiguous NHWC block in the cube's dtype (float16 shards → half the bytes).
    ``on_done(fraction)`` is told the fraction of the cube each batch completes (progress)."""
    windows, offset = pixel_windows(cube, k, pad=border == "reflect")
    offset = -offset  # window (0, 0) is centred on pixel (offset, offset)
    rows_v, cols_v = windows.shape[:2]
    rows_per_batch = max(1, batch // max(cols_v, 1))
    labels = np.full(cube.shape[:2], -1, dtype=np.int16)
    probs: np.ndarray | None = None
    timings = {"patches": 0.0, "predict": 0.0}
    with torch.inference_mode():
        for r0 in range(0, rows_v, rows_per_batch):
            r1 = min(rows_v, r0 + rows_per_batch)
            t0 = time.perf_counter()
            x = torch.from_numpy(np.ascontiguousarray(windows[r0:r1]).reshape(-1, k, k, cube.shape[2]))
            t1 = time.perf_counter()
            p = predict_proba(model, x.to(device)).cpu().numpy().reshape(r1 - r0, cols_v, -1)
            if probs is None:
                probs = np.zeros((*cube.shape[:2], p.shape[-1]), dtype=np.float16)
            rows = slice(offset + r0, offset + r1)
            cols = slice(offset, offset + cols_v)
            probs[rows, cols] = p
            labels[rows, cols] = p.argmax(axis=-1)
            timings["patches"] += t1 - t0
            timings["predict"] += time.perf_counter() - t1
            if on_done is not None:
                on_done((r1 - r0) / rows_v)
    assert probs is not None, "cube smaller than one window"
    return labels, probs, timings


# ---- outputs ---------------------------------------------------------------------------------------------
def write_npz(path: Path, labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> None:
    fsio.write_npz(path, compressed=True, labels=labels, probabilities=probs, class_names=np.array(class_names))


def legend_entries(
    labels: np.ndarray, class_names: list[str], gt: np.ndarray | None
) -> list[tuple[tuple[int, ...], str]]:
    """(RGB, text) of every colour a map shows: the classes, and when present the pixels the model did
    not classify (border: skip) and the ground-truth panel's unlabelled pixels."""
    palette = class_palette(class_names)
    entries = [(tuple(int(v) for v in palette[i + 1]), name) for i, name in enumerate(class_names)]
    if (labels < 0).any():
        entries.append((NO_PREDICTION, "not classified (border)"))
    if gt is not None and (gt < 0).any():
        entries.append((UNLABELLED_GT, "unlabelled (no ground truth)"))
    return entries


def write_png(
    path: Path, image_id: str, labels: np.ndarray, class_names: list[str], gt: np.ndarray | None = None
) -> None:
    """Colour map with a legend (and the ground truth beside it when labelled pixels exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    palette = class_palette(class_names)
    panels = [("prediction", palette[labels.astype(np.int64) + 1])]
    if gt is not None and (gt >= 0).any():
        gt_rgb = palette[gt + 1]
        gt_rgb[gt < 0] = UNLABELLED_GT
        panels.append(("ground truth", gt_rgb))
    rows, cols = labels.shape
    scale = max(1.0, 300.0 / max(rows, cols))  # small cubes are drawn larger
    fig_w = len(panels) * cols * scale / 100 + 1.8
    fig_h = rows * scale / 100 + 0.6
    fig, axes = plt.subplots(1, len(panels), figsize=(fig_w, fig_h), dpi=100, squeeze=False)
    for ax, (title, rgb) in zip(axes[0], panels):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"{image_id}: {title}", fontsize=8)
        ax.set_axis_off()
    handles = [
        Patch(color=tuple(np.asarray(rgb) / 255.0), label=text)
        for rgb, text in legend_entries(labels, class_names, gt if len(panels) > 1 else None)
    ]
    axes[0][-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    fig.subplots_adjust(wspace=0.05)
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)


# ---- the job -----------------------------------------------------------------------------------------------
def _check_model(meta: dict, model_path: str, class_names: list[str], k: int, bands: int) -> None:
    if meta.get("class_names") and list(meta["class_names"]) != list(class_names):
        raise InputError(model_path, f"model classes {meta['class_names']} differ from hsi.class_names {class_names}")
    if meta.get("patch_size") not in (None, k):
        raise InputError(
            model_path, f"model was trained on {meta['patch_size']}×{meta['patch_size']} patches, hsi.patch is {k}"
        )
    if meta.get("in_channels") not in (None, bands):
        raise InputError(model_path, f"model expects {meta['in_channels']} bands, the cube has {bands}")


def predict_image(
    model: Any,
    meta: dict,
    model_path: str,
    item: Any,
    cfg: dict,
    out_dir: Path,
    positive_class: str | None,
    device: str,
    on_done: Callable[[float], None] | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Chain + map + outputs for one image: (its entry for the record, GT labels and probabilities of
    the labelled classified pixels, empty without ground truth)."""
    hcfg = cfg["hsi"]
    k, names = hcfg["patch"], list(hcfg["class_names"])
    result = hsi_chain.run_chain(item, cfg)
    cube = result.cube.astype(hcfg["dtype"])  # exactly what the shards (training data) hold
    _check_model(meta, model_path, names, k, cube.shape[2])
    if min(cube.shape[:2]) <= (k // 2 if hcfg["border"] == "reflect" else k - 1):
        raise InputError(
            item.image, f"cube {cube.shape[:2]} is too small for {k}×{k} windows (border: {hcfg['border']})"
        )
    timings = {
        "load": result.timings.get("load", 0.0),
        "chain": sum(result.timings.get(s, 0.0) for s in hsi_chain.STEPS),
    }
    labels, probs, t = predict_cube(model, cube, k, hcfg["border"], hcfg["predict_batch"], device, on_done)
    timings.update(t)
    t0 = time.perf_counter()
    write_npz(out_dir / f"{item.image_id}.npz", labels, probs, names)
    write_png(out_dir / f"{item.image_id}.png", item.image_id, labels, names, result.labels if result.has_gt else None)
    timings["write"] = time.perf_counter() - t0
    info: dict[str, Any] = {
        "image_id": item.image_id,
        "patient_id": item.patient_id,
        "shape": list(cube.shape),
        "pixels": int(labels.size),
        "classified": int((labels >= 0).sum()),
        "map": f"{item.image_id}.png",
        "array": f"{item.image_id}.npz",
        "predicted_counts": {n: int((labels == i).sum()) for i, n in enumerate(names)},
        "timings_s": timings,
        "metrics": None,
    }
    scored = (result.labels >= 0) & (labels >= 0)
    y_true, y_prob = result.labels[scored], probs[scored].astype(np.float32)
    if len(y_true):
        info["metrics"] = classification_metrics(y_true, y_prob, names, positive_class)
    return info, y_true, y_prob


def cpu_threads() -> int:
    """Threads for torch: OMP_NUM_THREADS, else the SLURM allocation, else the CPUs this process may use.

    torch's default (all cores of the node) oversubscribes a 1-CPU job badly: its spinning OpenMP
    workers then make a tiny network 10–30× slower."""
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return provenance.allocated_cpus()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--model", required=True, help="model.pt written by `medflow select` / `medflow train`")
    p.add_argument("--cohort", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--image-ids", nargs="+", help="images of the cohort to map")
    which.add_argument("--folds", help="fold plan: map the images of the outer fold's test patients (with --outer)")
    p.add_argument("--outer", type=int, help="outer fold index (recorded; selects test images with --folds)")
    p.add_argument("--out-dir", required=True, help="maps directory: <id>.npz, <id>.png, record.json")
    progress_mod.add_quiet_argument(p)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg = progress_mod.apply_quiet(config_mod.load(args.config), args.quiet)
    config_mod.study(cfg, args.study, args.config)
    items = named_or_outer_test(cfg, args, "image")
    out_dir = Path(args.out_dir)
    record = JobRecord(
        "predict-hsi",
        cfg,
        ("hsi", f"studies.{args.study}", "cohorts"),
        clock_start=t0,
        study=args.study,
        cohort=args.cohort,
        outer=args.outer,
        model=os.path.relpath(args.model, out_dir),
        images=[],
        metrics={},
    )
    record["timings_s"]["load_args"] = time.perf_counter() - t0
    with record.timed("setup"):  # CUDA initialisation can take seconds on a GPU node
        wanted = cfg["hsi"]["predict_device"]
        if wanted == "cuda" and not torch.cuda.is_available():
            raise InputError(args.config, "hsi.predict_device is cuda but no CUDA device is visible")
        device = "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"
        threads = cpu_threads()
        torch.set_num_threads(threads)
    record["threads"] = threads
    with record.timed("load_model"):
        model, meta = load_model(args.model, device)
    record["inputs"] = {"files": {"model": {"path": record["model"], "sha256": fsio.sha256_file(args.model)}}}
    positive = cfg["studies"][args.study].get("positive_class")
    names = list(cfg["hsi"]["class_names"])
    pooled_true, pooled_prob = [], []
    label = f"predict-hsi {args.study}" + ("" if args.outer is None else f" outer{args.outer}")
    report = progress_mod.reporter(cfg, label, len(items), "images")
    for item in items:
        info, y_true, y_prob = predict_image(
            model, meta, args.model, item, cfg, out_dir, positive, device, report.advance
        )
        record["images"].append(info)
        pooled_true.append(y_true)
        pooled_prob.append(y_prob)
        for key, value in info["timings_s"].items():
            record["timings_s"][key] = record["timings_s"].get(key, 0.0) + value
        metrics = info["metrics"]
        print(
            f"predict-hsi {item.image_id}: {info['shape'][0]}×{info['shape'][1]} map"
            + (f", accuracy {metrics['oacc']:.3f} on {metrics['n']} labelled px" if metrics else "")
            + f" → {out_dir / info['map']}"
        )
    report.close()
    record["metrics"] = {"images": {}}
    for info in record["images"]:  # full metrics once, under metrics; the image entry keeps accuracy
        metrics = info.pop("metrics")
        info["accuracy"] = metrics["oacc"] if metrics else None
        if metrics:
            record["metrics"]["images"][info["image_id"]] = metrics
    if sum(len(y) for y in pooled_true):
        record["metrics"]["all"] = classification_metrics(
            np.concatenate(pooled_true), np.concatenate(pooled_prob), names, positive
        )
    record.finish("ok")
    pixels = sum(i["pixels"] for i in record["images"])
    work_s = sum(record["timings_s"].get(k, 0.0) for k in ("load", "chain", "patches", "predict", "write"))
    record["device"] = device
    record["throughput"] = {"px_per_s": pixels / work_s if work_s else None, "s_per_image": work_s / len(items)}
    record["outputs"] = {
        name: {"path": name, "sha256": fsio.sha256_file(out_dir / name)}
        for info in record["images"]
        for name in (info["map"], info["array"])
    }
    record.save(out_dir / "record.json")
    return 0

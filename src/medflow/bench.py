"""`medflow bench`: node-throughput benchmark of the medflow stages, and a check against site references.

Measurements (each an independent function, run for about ``bench.seconds``; ``--quick`` shortens them):
- ``wsi``: end-to-end WSI extraction (`medflow.wsi.extract_slide`) of a synthetic pyramid, patches/s
  with 1 reader process and with all allocated cores;
- ``hsi``: the hyperspectral chain (`medflow.hsi.process_image`) on a synthetic raw mosaic, images/s;
- ``hdf5``: streaming shard reads through the training loader (`medflow.data`, not preloaded), MB/s
  and ms/patch;
- ``train``: training images/s per device for each of ``bench.models`` with 1..``bench.max_ranks``
  ranks (``mpiexec -n r`` of this command's worker mode, through the training jobs' data-parallel path
  `medflow.dist` with the configured backend, Horovod or DDP), and the scaling efficiency;
- ``allreduce``: allreduce bandwidth between 2 ranks (Horovod, or torch.distributed gloo/NCCL).

Results: one JSON per node (format ``medflow-bench/1``) with the site identity, software versions and a
flat ``metrics`` map. ``--check`` compares each metric named in ``bench.references[<site>]`` with its
ReFrame-style band ``value × (1 + lower) ≤ measured ≤ value × (1 + upper)`` and exits 3 naming
every metric outside its band (or not measured).
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import config as config_mod
from . import fsio, provenance
from .errors import InputError
from .records import now_iso

BENCH_FORMAT = "medflow-bench/1"
GROUPS = ("wsi", "hsi", "hdf5", "train", "allreduce")
CHECK_FAILED = 3
UNITS = {"patches_per_s": "patches/s", "images_per_s": "images/s", "mpx_per_s": "megapixels/s",
         "read_mb_per_s": "MB/s", "ms_per_patch": "ms/patch", "img_per_s": "images/s",
         "img_per_s_per_device": "images/s per device", "scaling_efficiency": "fraction",
         "algbw_gb_per_s": "GB/s", "busbw_gb_per_s": "GB/s", "latency_ms": "ms"}


class Unavailable(Exception):
    """A measurement cannot run on this node (missing launcher, module, GPU...): recorded as skipped."""


# ---- timing helper ------------------------------------------------------------------------------
def repeat_for(seconds: float, step: Callable[[], float], min_reps: int = 1, warmup: int = 1) -> tuple[int, float, float]:
    """Run ``step`` (returning its work units) ``warmup`` times untimed, then until ``seconds`` have
    passed (at least ``min_reps`` times). Returns (repetitions, work units, elapsed seconds)."""
    for _ in range(warmup):
        step()
    reps, work, t0 = 0, 0.0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < seconds:
        work += step()
        reps += 1
    return reps, work, time.perf_counter() - t0


# ---- WSI extraction -------------------------------------------------------------------------------
def _wsi_inputs(cfg: dict, scratch: Path, quick: bool) -> tuple[Any, dict, int]:
    """A synthetic slide + annotation (the demo's generator) and a grid-sampling extraction config."""
    from . import synth
    from .cohort import ImageEntry

    # Level-0 mpp = the configured patch mpp: patches are read at level 0 without resampling, and a small
    # slide (synthesis costs ~1 s per megapixel) still yields a few hundred patches with 50 % grid overlap.
    side = 2048 if quick else 3072
    mpp = float(cfg["wsi"]["mpp"])
    rgb, polygons = synth.make_slide(config_mod.rng_for(cfg["seed"], "bench", "wsi"), side, side, mpp)
    slide, xml = scratch / "bench_slide.tiff", scratch / "bench_slide.xml"
    synth.write_pyramid_tiff(slide, rgb, mpp)
    # Star polygons near the border may reach outside a small slide: clip them (extraction rejects those).
    synth.write_asap_xml(xml, {"metastases": [np.clip(poly, 0, side - 1) for poly in polygons]})
    wcfg = copy.deepcopy(cfg)
    wcfg["cohorts"] = {"bench": {"kind": "wsi", "manifest": "synth"}}
    wcfg["wsi"]["sampling"] = {**wcfg["wsi"]["sampling"], "mode": "grid", "overlap": 0.5, "max_patches": 0}
    wcfg["wsi"]["on_error"] = "fail"
    entry = ImageEntry(image_id="bench_slide", patient_id="bench", image=str(slide), annotation=str(xml))
    return entry, wcfg, side


def measure_wsi(cfg: dict, seconds: float, scratch: Path, quick: bool) -> dict[str, Any]:
    from . import wsi

    entry, wcfg, side = _wsi_inputs(cfg, scratch, quick)
    cores = provenance.allocated_cpus()
    metrics, details = {}, {"slide_px": [side, side], "cores": cores, "runs": {}}
    for label, workers in (("1core", 1), ("all", cores)):
        wcfg["wsi"]["workers"] = workers
        out, rec_path = scratch / f"wsi_{label}.h5", scratch / f"wsi_{label}.record.json"

        def step() -> float:
            with _quiet():
                rec = wsi.extract_slide(entry, wcfg, "bench", out, rec_path, force=True)
            return float(rec["n_patches"])
        reps, patches, elapsed = repeat_for(seconds, step)
        metrics[f"wsi.patches_per_s.{label}"] = patches / elapsed
        details["runs"][label] = {"workers": workers, "extractions": reps, "patches": patches, "seconds": elapsed}
    details["patch_size"], details["mpp"] = wcfg["wsi"]["patch_size"], wcfg["wsi"]["mpp"]
    return {"metrics": metrics, "details": details}


# ---- HSI chain ------------------------------------------------------------------------------------
def measure_hsi(cfg: dict, seconds: float, scratch: Path, quick: bool) -> dict[str, Any]:
    from PIL import Image

    from . import hsi, synth
    from .cohort import ImageEntry

    size = int(cfg["hsi"]["mosaic"]["size"])
    # The brain study's snapshot camera is 2045×1085 px (409×217 × 25 bands); quick mode uses the demo size.
    h, w = ((cfg["synth"]["hsi"]["mosaic_height"], cfg["synth"]["hsi"]["mosaic_width"]) if quick else (1085, 2045))
    h, w = h // size * size, w // size * size
    raw, white, dark, gt = synth.make_hsi(config_mod.rng_for(cfg["seed"], "bench", "hsi"), h, w, size)
    paths = {name: scratch / f"hsi_{name}.npy" for name in ("raw", "white", "dark")}
    for name, arr in (("raw", raw), ("white", white), ("dark", dark)):
        np.save(paths[name], arr)
    Image.fromarray(gt).save(scratch / "hsi_gt.png")
    entry = ImageEntry(image_id="bench_hsi", patient_id="bench", image=str(paths["raw"]),
                       annotation=str(scratch / "hsi_gt.png"), white=str(paths["white"]), dark=str(paths["dark"]))
    stage_sums: dict[str, float] = {}

    def step() -> float:
        _, _, timings = hsi.process_image(entry, cfg)
        for k, v in timings.items():
            stage_sums[k] = stage_sums.get(k, 0.0) + float(v)
        return 1.0
    reps, images, elapsed = repeat_for(seconds, step)
    stage_sums = {k: v / (reps + 1) for k, v in stage_sums.items()}  # the warm-up step is included
    return {"metrics": {"hsi.images_per_s": images / elapsed, "hsi.mpx_per_s": images * h * w / elapsed / 1e6},
            "details": {"mosaic": [h, w], "images": reps, "seconds": elapsed, "stage_s_per_image": stage_sums}}


# ---- HDF5 reads through the loader ----------------------------------------------------------------
def measure_hdf5(cfg: dict, seconds: float, scratch: Path, quick: bool) -> dict[str, Any]:
    from . import data, shards

    size = int(cfg["wsi"]["patch_size"])
    n_patches = 256 if quick else 1024
    labels = [i % 2 for i in range(n_patches // 2)]
    index_path = data.write_synthetic_cohort(
        scratch / "hdf5", {"img0": ("p0", labels), "img1": ("p1", labels)}, ["normal", "tumour"],
        patch_shape=(size, size, 3), chunk_patches=int(cfg["shards"]["chunk_patches"]), seed=int(cfg["seed"]),
        cohort="bench", compression=cfg["shards"]["compression"])
    pset = data.PatchSet(shards.load_index(index_path), ["p0", "p1"])
    loader = data.make_loader(pset, batch_size=64, shuffle=True, seed=int(cfg["seed"]), preload=False)
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
    return {"metrics": {"hdf5.read_mb_per_s": patches * patch_bytes / elapsed / 1e6,
                        "hdf5.ms_per_patch": 1000.0 * elapsed / patches},
            "details": {"patches": patches, "epochs": reps, "seconds": elapsed, "patch_bytes": patch_bytes,
                        "batch": 64, "chunk_patches": int(cfg["shards"]["chunk_patches"]),
                        "note": "shuffled whole-chunk streaming reads (preload off), warm page cache"}}


# ---- distributed workers (training step, allreduce) -----------------------------------------------
def _dist_context(cfg: dict, ranks: int | None) -> Any:
    """The training jobs' data-parallel context (`medflow.dist`, configured backend). ``ranks`` = 1
    ignores the launcher environment: a lone worker inside a multi-task SLURM step must not wait for peers."""
    from . import dist
    d = dist.init(cfg["launch"]["backend"], int(cfg["launch"]["threads_per_rank"]), env={} if ranks == 1 else None)
    if ranks is not None and d.size != ranks:
        d.shutdown()
        raise InputError(None, f"bench worker expected {ranks} ranks but the launcher started {d.size}")
    return d


def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch
        torch.cuda.synchronize(device)


def _timed_steps(d: Any, step: Callable[[], None], seconds: float, min_steps: int) -> tuple[int, float]:
    """Warm up, let rank 0 choose the step count from 3 probe steps (ranks stay in lockstep), then time
    the steps; returns (steps, slowest rank's seconds)."""
    for _ in range(2):
        step()
    _sync(d.device)
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    _sync(d.device)
    per_step = max((time.perf_counter() - t0) / 3, 1e-6)
    steps = int(d.broadcast_object(max(min_steps, int(seconds / per_step))))
    d.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(d.device)
    return steps, max(d.allgather_object(time.perf_counter() - t0))


def model_spec(cfg: dict, name: str) -> dict[str, Any]:
    """Model and training settings, patch shape and dtype of a benchmarked model: those of the first
    study that trains it, else the schema's defaults on the WSI (RGB) or, for conv2dnet, HSI geometry."""
    for study in cfg.get("studies", {}).values():
        if study.get("model", {}).get("name") == name:
            kind = cfg["cohorts"].get(study["cohort"], {}).get("kind", "wsi")
            return _spec(cfg, study, kind)
    defaults = config_mod.validate({"studies": {"bench": {"cohort": "bench", "model": {"name": name}}}}, "bench")
    return _spec(cfg, defaults["studies"]["bench"], "hsi" if name == "conv2dnet" else "wsi")


def _spec(cfg: dict, study: dict, kind: str) -> dict[str, Any]:
    common = {"model": study["model"], "train": study["train"], "batch": int(study["train"]["batch_size"])}
    if kind == "hsi":
        k, bands = int(cfg["hsi"]["patch"]), len(cfg["hsi"]["wavelengths"]) or int(cfg["hsi"]["mosaic"]["size"]) ** 2
        return {**common, "shape": [k, k, bands], "dtype": cfg["hsi"]["dtype"], "classes": len(cfg["hsi"]["class_names"])}
    size = int(cfg["wsi"]["patch_size"])
    return {**common, "shape": [size, size, 3], "dtype": "uint8", "classes": len(cfg["wsi"]["labels"]["classes"])}


def worker_train(cfg: dict, model_name: str, seconds: float, out: Path, ranks: int | None = None) -> None:
    """One rank of the training-throughput measurement: the training jobs' own step (`medflow.train.Trainer`:
    Horovod or DDP via `medflow.dist`, the study's optimiser, AMP + channels_last on CUDA) on fixed batches."""
    import torch

    from . import models, train

    d = _dist_context(cfg, ranks)
    spec = model_spec(cfg, model_name)
    tc, on_cuda = spec["train"], d.device.type == "cuda"
    torch.manual_seed(int(cfg["seed"]))
    net = models.build(spec["model"], spec["classes"], spec["shape"][2], spec["shape"][0]).to(d.device)
    if on_cuda and tc["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    lr = train.scaled_lr(float(tc["lr"]), d.size, tc["lr_scaling"])
    opt = d.wrap_optimizer(train.make_optimizer([p for p in net.parameters() if p.requires_grad], tc, lr), net)
    d.broadcast_state(net, opt)
    trainer = train.Trainer(model=d.wrap_model(net), optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), d=d,
                            train_cfg=tc, peak_lr=lr, base_lr=lr,
                            scaler=torch.amp.GradScaler("cuda") if on_cuda and tc["amp"] else None)
    trainer.model.train()
    gen = torch.Generator().manual_seed(int(cfg["seed"]) + d.rank)
    if spec["dtype"] == "uint8":
        x = torch.randint(0, 256, (spec["batch"], *spec["shape"]), dtype=torch.uint8, generator=gen)
    else:
        x = torch.rand((spec["batch"], *spec["shape"]), generator=gen).to(getattr(torch, spec["dtype"]))
    x, y = x.to(d.device), torch.randint(0, spec["classes"], (spec["batch"],), generator=gen).to(d.device)
    amp = trainer.amp

    def step() -> None:
        with trainer.autocast():
            loss = models.loss_of(trainer.model(x), y, trainer.criterion)
        trainer.step(loss)
    steps, elapsed = _timed_steps(d, step, seconds, min_steps=3)
    if d.is_root:
        device = d.devices[0] if d.devices else "cpu"
        fsio.write_json(out, {"model": model_name, "ranks": d.size, "backend": d.backend, "steps": steps,
                              "batch_per_rank": spec["batch"], "shape": spec["shape"], "dtype": spec["dtype"],
                              "device": device, "amp": bool(amp), "optimizer": tc["optimizer"],
                              "threads_per_rank": int(cfg["launch"]["threads_per_rank"]), "seconds": elapsed,
                              "img_per_s": steps * spec["batch"] * d.size / elapsed,
                              "img_per_s_per_device": steps * spec["batch"] / elapsed})
    d.shutdown()


def worker_allreduce(cfg: dict, seconds: float, out: Path, ranks: int | None = None) -> None:
    """One rank of the allreduce bandwidth test: in-place sum of a float32 buffer of ``bench.allreduce_mb`` MB
    with the configured backend's allreduce (Horovod, or torch.distributed gloo/NCCL)."""
    import torch

    d = _dist_context(cfg, ranks)
    if d.size < 2:
        d.shutdown()
        raise InputError(None, "the allreduce worker needs at least 2 ranks")
    n = int(float(cfg["bench"]["allreduce_mb"]) * 1e6 / 4)
    buf = torch.ones(n, dtype=torch.float32, device=d.device)
    if d.backend == "horovod":
        import horovod.torch as hvd
        op = lambda: hvd.allreduce_(buf, op=hvd.Sum, name="medflow.bench.allreduce")  # noqa: E731
        library = "horovod"
    else:
        import torch.distributed as td
        op = lambda: td.all_reduce(buf)  # noqa: E731
        library = f"torch.distributed/{td.get_backend()}"
    steps, elapsed = _timed_steps(d, op, seconds, min_steps=5)
    if d.is_root:
        nbytes = n * 4
        algbw = nbytes * steps / elapsed / 1e9
        fsio.write_json(out, {"ranks": d.size, "bytes": nbytes, "steps": steps, "seconds": elapsed,
                              "device": d.devices[0] if d.devices else "cpu", "backend": library,
                              "algbw_gb_per_s": algbw, "busbw_gb_per_s": algbw * 2 * (d.size - 1) / d.size,
                              "latency_ms": 1000 * elapsed / steps})
    d.shutdown()


# ---- launching workers ------------------------------------------------------------------------------
def mpi_command(cfg: dict, ranks: int) -> list[str]:
    """``mpiexec -n r`` with the local flags medflow uses (Open MPI: oversubscribe, no binding, root)."""
    exe = shutil.which(cfg["launch"]["mpiexec"]) or shutil.which("mpirun")
    if exe is None:
        raise Unavailable(f"no MPI launcher ({cfg['launch']['mpiexec']!r}) on PATH for {ranks} ranks")
    return [exe, *provenance.mpiexec_flags(), "-n", str(ranks)]


def launch_worker(cfg_path: Path, cfg: dict, ranks: int, worker_args: list[str], out: Path, timeout: float) -> dict:
    """Run this command's worker mode on ``ranks`` ranks (plain subprocess for 1) and read rank 0's JSON."""
    cmd = [sys.executable, "-m", "medflow.cli", "bench", "--config", str(cfg_path), "--worker", *worker_args,
           "--ranks", str(ranks), "--out", str(out)]
    if ranks > 1:
        cmd = [*mpi_command(cfg, ranks), *cmd]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(cfg["launch"]["threads_per_rank"]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{' '.join(worker_args)} on {ranks} ranks timed out after {timeout:.0f} s") from None
    if proc.returncode != 0 or not out.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # the worker's exception line says more than the launcher's closing banner
        errors = [ln.strip() for ln in lines if re.match(r"^\w*(Error|Exception)\b|^medflow bench: error", ln.strip())]
        why = errors[-1] if errors else " | ".join(ln.strip() for ln in lines[-3:])
        raise Unavailable(f"{' '.join(worker_args)} on {ranks} ranks failed (exit {proc.returncode}): {why}")
    return fsio.read_json(out)


def _rank_counts(cfg: dict) -> list[int]:
    gpus = provenance.gpus()
    top = int(cfg["bench"]["max_ranks"])
    if gpus:
        top = min(top, len(gpus))
    return list(range(1, max(1, top) + 1))


def measure_train(cfg: dict, seconds: float, scratch: Path, quick: bool, cfg_path: Path) -> dict[str, Any]:
    metrics, details, skipped = {}, {}, {}
    for model in cfg["bench"]["models"]:
        runs = {}
        for r in _rank_counts(cfg):
            try:
                runs[r] = launch_worker(cfg_path, cfg, r, ["train", "--model", model, "--seconds", str(seconds)],
                                        scratch / f"train_{model}_{r}.json", timeout=120 + 20 * seconds)
            except Unavailable as exc:
                skipped[f"{model}.r{r}"] = str(exc)
        for r, res in runs.items():
            metrics[f"train.{model}.img_per_s.r{r}"] = res["img_per_s"]
            metrics[f"train.{model}.img_per_s_per_device.r{r}"] = res["img_per_s_per_device"]
            if r > 1 and 1 in runs:
                metrics[f"train.{model}.scaling_efficiency.r{r}"] = res["img_per_s"] / (r * runs[1]["img_per_s"])
        details[model] = {f"r{r}": res for r, res in runs.items()}
    if not metrics and skipped:
        raise Unavailable("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return {"metrics": metrics, "details": details, **({"skipped": skipped} if skipped else {})}


def measure_allreduce(cfg: dict, seconds: float, scratch: Path, quick: bool, cfg_path: Path) -> dict[str, Any]:
    res = launch_worker(cfg_path, cfg, 2, ["allreduce", "--seconds", str(seconds)], scratch / "allreduce.json",
                        timeout=120 + 10 * seconds)
    return {"metrics": {f"allreduce.{k}": res[k] for k in ("algbw_gb_per_s", "busbw_gb_per_s", "latency_ms")},
            "details": res}


# ---- the benchmark -----------------------------------------------------------------------------------
def run_bench(cfg: dict, cfg_path: Path, groups: list[str], quick: bool,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the selected measurement groups; a group that cannot run here is listed under ``skipped``."""
    seconds = min(float(cfg["bench"]["seconds"]), 1.0) if quick else float(cfg["bench"]["seconds"])
    started, t0 = now_iso(), time.perf_counter()
    result: dict[str, Any] = {
        "format": BENCH_FORMAT, "site": provenance.site_info(cfg), "software": provenance.software(),
        "launch": provenance.launch_info(), "config_hash": config_mod.section_hash(
            cfg, "bench", "wsi", "hsi", "shards", "launch", "studies"),
        "seed": cfg["seed"], "quick": quick, "seconds_per_measurement": seconds, "groups": groups,
        "started": started, "metrics": {}, "units": {}, "details": {}, "skipped": {}, "timings_s": {}}
    with tempfile.TemporaryDirectory(prefix="medflow-bench-") as tmp:
        scratch = Path(tmp)
        for group in groups:
            g0 = time.perf_counter()
            try:
                out = _MEASURE[group](cfg, seconds, scratch, quick, cfg_path)
            except Unavailable as exc:
                result["skipped"][group] = str(exc)
                progress(f"bench {group}: skipped ({exc})")
                continue
            finally:
                result["timings_s"][group] = time.perf_counter() - g0
            result["metrics"].update(out["metrics"])
            result["details"][group] = out["details"]
            if out.get("skipped"):
                result["skipped"].update({f"{group}.{k}": v for k, v in out["skipped"].items()})
            for name, value in out["metrics"].items():
                progress(f"bench {name} = {value:.4g} {unit_of(name)}")
    result["units"] = {name: unit_of(name) for name in result["metrics"]}
    result["finished"], result["wall_s"] = now_iso(), time.perf_counter() - t0
    return result


def unit_of(metric: str) -> str:
    parts = metric.split(".")
    for part in reversed(parts):
        if part in UNITS:
            return UNITS[part]
    return ""


_MEASURE: dict[str, Callable[..., dict[str, Any]]] = {
    "wsi": lambda cfg, s, d, q, p: measure_wsi(cfg, s, d, q),
    "hsi": lambda cfg, s, d, q, p: measure_hsi(cfg, s, d, q),
    "hdf5": lambda cfg, s, d, q, p: measure_hdf5(cfg, s, d, q),
    "train": measure_train,
    "allreduce": measure_allreduce,
}


# ---- reference check ----------------------------------------------------------------------------------
def check(result: dict[str, Any], references: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per referenced metric: within ``[value×(1+lower), value×(1+upper)]`` (upper None = no cap)."""
    verdicts = []
    for metric, ref in sorted(references.items()):
        value = float(ref["value"])
        lower = ref.get("lower", -0.2)
        upper = ref.get("upper")
        lo = value * (1 + float(lower)) if lower is not None else float("-inf")
        hi = value * (1 + float(upper)) if upper is not None else float("inf")
        lo, hi = min(lo, hi), max(lo, hi)  # negative reference values flip the band
        measured = result.get("metrics", {}).get(metric)
        ok = measured is not None and lo <= float(measured) <= hi
        verdicts.append({"metric": metric, "measured": measured, "reference": value, "lower": lo, "upper": hi,
                         "ok": ok, "reason": "" if ok else ("not measured" if measured is None else
                                                             "below reference band" if measured < lo else
                                                             "above reference band")})
    return verdicts


def site_references(cfg: dict, site: str, path: str | Path) -> dict[str, dict[str, Any]]:
    refs = cfg["bench"]["references"]
    if site not in refs:
        raise InputError(path, f"no bench.references for site {site!r} (sites with references: {sorted(refs)})")
    return refs[site]


def report_check(verdicts: list[dict[str, Any]], site: str) -> int:
    for v in verdicts:
        measured = "not measured" if v["measured"] is None else f"{v['measured']:.4g}"
        band = f"[{v['lower']:.4g}, {v['upper']:.4g}]"
        line = f"{'PASS' if v['ok'] else 'FAIL'} {v['metric']}: {measured} {unit_of(v['metric'])} (reference {v['reference']:.4g}, band {band})"
        print(line if v["ok"] else f"{line}: {v['reason']}", file=sys.stdout if v["ok"] else sys.stderr)
    failed = [v["metric"] for v in verdicts if not v["ok"]]
    if failed:
        print(f"medflow bench: check failed for site {site}: {', '.join(failed)}", file=sys.stderr)
        return CHECK_FAILED
    print(f"medflow bench: all {len(verdicts)} referenced metrics of site {site} within their bands")
    return 0


# ---- CLI: medflow bench ------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--out", help="results JSON (results/<site>/bench/<host>.json); an existing directory → "
                                 "<dir>/<host>.json; required unless --from-results")
    p.add_argument("--check", action="store_true",
                   help=f"compare with bench.references[<site>]; exit {CHECK_FAILED} naming each metric outside its band")
    p.add_argument("--quick", action="store_true", help="≤ 1 s per measurement and small inputs (smoke test)")
    p.add_argument("--only", help=f"comma-separated measurement groups ({','.join(GROUPS)}); default bench.measure")
    p.add_argument("--from-results", metavar="JSON", help="check an existing results file instead of measuring")
    p.add_argument("--worker", choices=["train", "allreduce"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, help=argparse.SUPPRESS)


def _groups(args: argparse.Namespace, cfg: dict) -> list[str]:
    groups = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else list(cfg["bench"]["measure"])
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise InputError(None, f"--only: unknown measurement group(s) {unknown}; choose from {list(GROUPS)}")
    return groups


def _out_path(out: str) -> Path:
    path = Path(out)
    if path.is_dir() or out.endswith(os.sep):
        return path / f"{provenance.short_host()}.json"
    return path


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    if args.worker == "train":
        worker_train(cfg, args.model, float(args.seconds or cfg["bench"]["seconds"]), Path(args.out), args.ranks)
        return 0
    if args.worker == "allreduce":
        worker_allreduce(cfg, float(args.seconds or cfg["bench"]["seconds"]), Path(args.out), args.ranks)
        return 0
    if not args.out and not args.from_results:
        raise InputError(None, "--out is required (unless --from-results checks a saved run)")
    site = provenance.site_name(cfg)
    references = site_references(cfg, site, args.config) if args.check else {}
    if args.from_results:
        result = fsio.read_json_document(args.from_results, "bench results file", BENCH_FORMAT)
    else:
        out = _out_path(args.out)
        result = run_bench(cfg, Path(args.config).resolve(), _groups(args, cfg), args.quick)
        if args.check:
            result["check"] = {"site": site, "verdicts": check(result, references)}
        fsio.write_json(out, result)
        print(f"bench {out}: {len(result['metrics'])} metrics in {result['wall_s']:.1f} s"
              + (f"; skipped {sorted(result['skipped'])}" if result["skipped"] else ""))
    if args.check:
        return report_check(check(result, references), site)
    return 0


class _quiet:
    """Silence the per-job progress lines of the stages while benchmarking them."""

    def __enter__(self) -> None:
        self._stdout = sys.stdout
        sys.stdout = open(os.devnull, "w")

    def __exit__(self, *exc: Any) -> bool:
        sys.stdout.close()
        sys.stdout = self._stdout
        return False

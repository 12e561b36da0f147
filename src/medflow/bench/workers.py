"""Distributed measurements of `medflow bench`: training images/s per device for 1..N ranks and allreduce
bandwidth, each run as ranks of this command's worker mode under the launcher (`mpiexec -n r` locally),
through the training jobs' own data-parallel path (`medflow.train.dist`, Horovod or DDP).

The allreduce worker times a sweep of message sizes and fits the α–β model (`medflow.bench.scaling`).
With ``bench.nodes`` > 1, inside a SLURM allocation of that many nodes, it also runs one rank per node
(``bench.srun``), which measures the node interconnect."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core import config as config_mod
from ..core import fsio, provenance
from ..core.errors import InputError
from ..core.seeds import stream_seed
from ..train import dist, models
from ..train.optim import make_optimizer, scaled_lr
from ..train.trainer import Trainer
from . import scaling
from .timing import Unavailable


def _dist_context(cfg: dict, ranks: int | None) -> Any:
    """The training jobs' data-parallel context (`medflow.dist`, configured backend). ``ranks`` = 1
    ignores the launcher environment: a lone worker inside a multi-task SLURM step must not wait for peers."""
    d = dist.init(cfg["launch"]["backend"], int(cfg["launch"]["threads_per_rank"]), env={} if ranks == 1 else None)
    if ranks is not None and d.size != ranks:
        d.shutdown()
        raise InputError(None, f"bench worker expected {ranks} ranks but the launcher started {d.size}")
    return d


def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
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
        return {
            **common,
            "shape": [k, k, bands],
            "dtype": cfg["hsi"]["dtype"],
            "classes": len(cfg["hsi"]["class_names"]),
        }
    size = int(cfg["wsi"]["patch_size"])
    return {**common, "shape": [size, size, 3], "dtype": "uint8", "classes": len(cfg["wsi"]["labels"]["classes"])}


def worker_train(cfg: dict, model_name: str, seconds: float, out: Path, ranks: int | None = None) -> None:
    """One rank of the training-throughput measurement: the training jobs' own step (`medflow.train.Trainer`:
    Horovod or DDP via `medflow.dist`, the study's optimiser, AMP + channels_last on CUDA) on fixed batches."""
    d = _dist_context(cfg, ranks)
    spec = model_spec(cfg, model_name)
    tc, on_cuda = spec["train"], d.device.type == "cuda"
    torch.manual_seed(stream_seed(cfg["seed"], "bench", "init", model_name))
    net = models.build(spec["model"], spec["classes"], spec["shape"][2], spec["shape"][0]).to(d.device)
    if on_cuda and tc["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    lr = scaled_lr(float(tc["lr"]), d.size, tc["lr_scaling"])
    opt = d.wrap_optimizer(make_optimizer([p for p in net.parameters() if p.requires_grad], tc, lr), net)
    d.broadcast_state(net, opt)
    trainer = Trainer(
        model=d.wrap_model(net),
        optimizer=opt,
        criterion=torch.nn.CrossEntropyLoss(),
        d=d,
        train_cfg=tc,
        peak_lr=lr,
        base_lr=lr,
        scaler=torch.amp.GradScaler("cuda") if on_cuda and tc["amp"] else None,
    )
    trainer.model.train()
    gen = torch.Generator().manual_seed(stream_seed(cfg["seed"], "bench", "batch", d.rank))
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
        fsio.write_json(
            out,
            {
                "model": model_name,
                "ranks": d.size,
                "backend": d.backend,
                "steps": steps,
                "batch_per_rank": spec["batch"],
                "shape": spec["shape"],
                "dtype": spec["dtype"],
                "device": device,
                "amp": bool(amp),
                "optimizer": tc["optimizer"],
                "threads_per_rank": int(cfg["launch"]["threads_per_rank"]),
                "seconds": elapsed,
                "img_per_s": steps * spec["batch"] * d.size / elapsed,
                "img_per_s_per_device": steps * spec["batch"] / elapsed,
                "step_s": elapsed / steps,
                # what each step allreduces: the gradients of the trainable parameters
                "grad_bytes": sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad),
            },
        )
    d.shutdown()


def sweep_sizes(largest_bytes: int) -> list[int]:
    """Message sizes of the allreduce sweep: latency- to bandwidth-bound, up to ``bench.allreduce_mb``."""
    return sorted({max(4096, largest_bytes // k // 4 * 4) for k in (256, 32, 4, 1)})


def worker_allreduce(cfg: dict, seconds: float, out: Path, ranks: int | None = None) -> None:
    """One rank of the allreduce bandwidth test: in-place sums of float32 buffers up to ``bench.allreduce_mb``
    MB with the configured backend's allreduce (Horovod, or torch.distributed gloo/NCCL); the headline
    numbers are those of the largest size, the sweep gives the α–β fit."""
    d = _dist_context(cfg, ranks)
    if d.size < 2:
        d.shutdown()
        raise InputError(None, "the allreduce worker needs at least 2 ranks")
    layout = d.layout()
    largest = int(float(cfg["bench"]["allreduce_mb"]) * 1e6 / 4) * 4
    sizes = sweep_sizes(largest)
    sweep = []
    for nbytes in sizes:
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=d.device)
        op, library = _allreduce_op(d, buf)
        steps, elapsed = _timed_steps(d, op, seconds / len(sizes), min_steps=5)
        sweep.append({"bytes": nbytes, "steps": steps, "seconds": elapsed, "s_per_op": elapsed / steps})
    if d.is_root:
        top = sweep[-1]
        algbw = top["bytes"] * top["steps"] / top["seconds"] / 1e9
        fit = scaling.fit([r["bytes"] for r in sweep], [r["s_per_op"] for r in sweep], d.size)
        fsio.write_json(
            out,
            {
                "ranks": d.size,
                "nodes": layout["nodes"],
                "hosts": layout["hosts"],
                "bytes": top["bytes"],
                "steps": top["steps"],
                "seconds": top["seconds"],
                "device": d.devices[0] if d.devices else "cpu",
                "backend": library,
                "algbw_gb_per_s": algbw,
                "busbw_gb_per_s": algbw * 2 * (d.size - 1) / d.size,
                "latency_ms": 1000 * top["seconds"] / top["steps"],
                "sweep": sweep,
                "fit": {"alpha_us": fit.alpha_s * 1e6, "busbw_gb_per_s": fit.busbw_gb_per_s},
            },
        )
    d.shutdown()


def _allreduce_op(d: Any, buf: torch.Tensor) -> tuple[Callable[[], Any], str]:
    if d.backend == "horovod":
        import horovod.torch as hvd

        return lambda: hvd.allreduce_(buf, op=hvd.Sum, name=f"medflow.bench.allreduce.{buf.numel()}"), "horovod"
    import torch.distributed as td

    return lambda: td.all_reduce(buf), f"torch.distributed/{td.get_backend()}"


# ---- launching workers ------------------------------------------------------------------------------
def mpi_command(cfg: dict, ranks: int) -> list[str]:
    """``mpiexec -n r`` with the local flags medflow uses (Open MPI: oversubscribe, no binding, root)."""
    exe = shutil.which(cfg["launch"]["mpiexec"]) or shutil.which("mpirun")
    if exe is None:
        raise Unavailable(f"no MPI launcher ({cfg['launch']['mpiexec']!r}) on PATH for {ranks} ranks")
    return [exe, *provenance.mpiexec_flags(), "-n", str(ranks)]


_KEEP_SLURM = ("SLURM_JOB_ID", "SLURM_CONF", "SLURM_CLUSTER_NAME")


def srun_command(cfg: dict, nodes: int) -> list[str]:
    """One rank per node of this SLURM allocation (``bench.srun``); Unavailable outside an allocation."""
    if not os.environ.get("SLURM_JOB_ID"):
        raise Unavailable(f"bench.nodes = {nodes} measures across a SLURM allocation of {nodes} nodes; not in one")
    srun = cfg["bench"]["srun"].split()
    if shutil.which(srun[0]) is None:
        raise Unavailable(f"{srun[0]!r} (bench.srun) not on PATH")
    return [*srun, "-N", str(nodes), "-n", str(nodes), "--ntasks-per-node=1"]


def launch_worker(
    cfg_path: Path,
    cfg: dict,
    ranks: int,
    worker_args: list[str],
    out: Path,
    timeout: float,
    launcher: list[str] | None = None,
) -> dict:
    """Run this command's worker mode on ``ranks`` ranks (plain subprocess for 1, else ``launcher``, by
    default the local ``mpiexec -n ranks``) and read rank 0's JSON."""
    cmd = [
        sys.executable,
        "-m",
        "medflow.cli",
        "bench",
        "--config",
        str(cfg_path),
        "--worker",
        *worker_args,
        "--ranks",
        str(ranks),
        "--out",
        str(out),
    ]
    if ranks > 1:
        cmd = [*(launcher or mpi_command(cfg, ranks)), *cmd]
    # srun: a new step of the whole allocation, not of a step this process may run in. mpiexec: this node
    # only; Open MPI takes SLURM_JOBID for an allocation it must read (and fails without SLURM_NODELIST).
    keep = _KEEP_SLURM if launcher is not None else ("SLURM_CONF",)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_")) or k in keep}
    env.setdefault("OMP_NUM_THREADS", str(cfg["launch"]["threads_per_rank"]))
    env.setdefault("SRUN_CPUS_PER_TASK", str(cfg["launch"]["threads_per_rank"]))
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
                runs[r] = launch_worker(
                    cfg_path,
                    cfg,
                    r,
                    ["train", "--model", model, "--seconds", str(seconds)],
                    scratch / f"train_{model}_{r}.json",
                    timeout=120 + 20 * seconds,
                )
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
    """2 ranks on this node (``allreduce.*``), and one rank per node of the allocation when ``bench.nodes``
    > 1 (``allreduce.internode.*``); each with the α–β fit of its sweep (``….fit.alpha_us``, ``….fit.busbw_gb_per_s``)."""
    runs = {
        "": launch_worker(
            cfg_path, cfg, 2, ["allreduce", "--seconds", str(seconds)], scratch / "allreduce.json", 120 + 10 * seconds
        )
    }
    skipped = {}
    nodes = int(cfg["bench"]["nodes"])
    if nodes > 1:
        try:
            runs["internode."] = launch_worker(
                cfg_path,
                cfg,
                nodes,
                ["allreduce", "--seconds", str(seconds)],
                scratch / "allreduce_internode.json",
                180 + 10 * seconds,
                launcher=srun_command(cfg, nodes),
            )
        except Unavailable as exc:
            skipped["internode"] = str(exc)
    metrics = {}
    for prefix, res in runs.items():
        metrics.update({f"allreduce.{prefix}{k}": res[k] for k in ("algbw_gb_per_s", "busbw_gb_per_s", "latency_ms")})
        metrics.update({f"allreduce.{prefix}fit.{k}": v for k, v in res["fit"].items()})
    details = {**runs[""], **({"internode": runs["internode."]} if "internode." in runs else {})}
    return {"metrics": metrics, "details": details, **({"skipped": skipped} if skipped else {})}

#!/usr/bin/env python
"""Training throughput, side by side in one run (issue 5 targets):

1. loader vs memory: training steps fed by the real medflow loader from HDF5 shards (streaming and
   preloaded) vs the same model fed the same batches from in-memory tensors. Target ≥ 0.95×.
2. scaling: for each backend (horovod, ddp), 2 ranks vs 1 rank under mpiexec, one thread per
   rank, real loader, same per-rank batch (weak scaling). Efficiency = img/s(2) / (2 · img/s(1)).
   Target ≥ 0.85. A 1-rank job is what `medflow train` runs for one task: no communication.
3. with CUDA: ResNet50 training img/s, AMP + channels_last, batch 128 (reference 2,470 img/s A100).

Every measurement takes the best of ``--repeats`` rounds, the methods taking turns within a
round, so load from other processes on a shared node hits them alike. Prints every ratio.

    .venv/bin/python benchmarks/bench_train.py [--models resnet18 conv2dnet] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medflow.bench.inputs import write_synthetic_cohort  # noqa: E402
from medflow.core.index import load_index  # noqa: E402
from medflow.train import dist, models  # noqa: E402
from medflow.train.loader import EpochLoader  # noqa: E402
from medflow.train.patchset import PatchSet  # noqa: E402

# model → (model config, patch shape, dtype, per-rank batch) as in the demo config
SETUPS = {
    "resnet18": ({"name": "resnet18", "input_size": 112}, (224, 224, 3), "uint8", 16),
    "conv2dnet": ({"name": "conv2dnet"}, (7, 7, 25), "float16", 16),
}


def make_cohort(root: Path, model: str, n: int) -> str:
    _, shape, dtype, _ = SETUPS[model]
    per_image = n // 4
    images = {
        f"{model}{i}": (f"P{i}", [i % 2] * (per_image // 2) + [1 - i % 2] * (per_image - per_image // 2))
        for i in range(4)
    }
    return write_synthetic_cohort(
        root / model,
        images,
        ["normal", "tumour"],
        patch_shape=shape,
        dtype=dtype,
        chunk_patches=32,
        cohort=model,
        kind="wsi" if dtype == "uint8" else "hsi",
    )


def build(model: str, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    cfg, shape, _, _ = SETUPS[model]
    torch.manual_seed(0)
    net = models.build(cfg, 2, shape[-1], shape[0]).to(device)
    return net, torch.optim.Adam(net.parameters(), lr=1e-3)


CRITERION = nn.CrossEntropyLoss()


def step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    models.loss_of(net(x), y, CRITERION).backward()
    opt.step()


def timed_steps(net, opt, batches, steps: int) -> float:
    """Seconds for ``steps`` training steps drawing batches from the endless iterator ``batches``."""
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        step(net, opt, x, y)
    return time.perf_counter() - t0


def endless(loader, first_epoch: int = 0):
    """The loader's batches, epoch after epoch (as a training job sees them)."""
    epoch = first_epoch
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def cycle(items: list):
    while True:
        yield from items


# ---- 1. loader vs in-memory -------------------------------------------------------------------
def loader_vs_memory(index: str, model: str, steps: int, repeats: int) -> dict:
    _, _, _, batch = SETUPS[model]
    torch.set_num_threads(1)
    idx = json.loads(Path(index).read_text())
    index_d = load_index(index)
    patients = [s["patient_id"] for s in idx["shards"]]
    stream_set, ram_set = PatchSet(index_d, patients), PatchSet(index_d, patients)
    loaders = {
        "stream": EpochLoader(stream_set, batch_size=batch, seed=1, augment="dihedral", preload=False),
        "preload": EpochLoader(ram_set, batch_size=batch, seed=1, augment="dihedral", preload=True),
        # the same without the dihedral augmentation: separates reading from augmenting
        "preload_noaug": EpochLoader(ram_set, batch_size=batch, seed=1, augment="none", preload=True),
    }
    fixed = [(x.clone(), y.clone()) for x, y in loaders["preload"]]  # one epoch of identical batches
    sources = {"memory": cycle(fixed), **{name: endless(loader) for name, loader in loaders.items()}}
    net, opt = build(model, torch.device("cpu"))
    for source in sources.values():
        timed_steps(net, opt, source, 2)  # warm-up (allocator, kernels, page cache)
    best = {name: float("inf") for name in sources}
    for _ in range(repeats):
        for name, source in sources.items():
            best[name] = min(best[name], timed_steps(net, opt, source, steps))
    ips = {k: steps * batch / v for k, v in best.items()}
    return {
        "img_per_s": ips,
        **{f"ratio_{name}": ips[name] / ips["memory"] for name in loaders},
        "load_ms_per_patch_stream": loaders["stream"].load_ms_per_patch,
    }


# ---- 2. scaling (worker runs under mpiexec) -------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    d = dist.init(args.backend, 1)
    _, _, _, batch = SETUPS[args.model]
    index = load_index(args.index)
    pset = PatchSet(index, [s["patient_id"] for s in index["shards"]])
    loader = EpochLoader(
        pset, batch_size=batch, rank=d.rank, world_size=d.size, seed=1, augment="dihedral", drop_last=True
    )
    net, opt = build(args.model, d.device)
    wrapped = d.wrap_model(net)
    opt = d.wrap_optimizer(opt, net)
    d.broadcast_state(net, opt)

    source = endless(loader)
    timed_steps(wrapped, opt, source, 2)  # warm-up: DDP bucket rebuild, Horovod negotiation
    d.barrier()
    cpu0 = time.process_time()
    elapsed = timed_steps(wrapped, opt, source, args.steps)
    cpu_s = time.process_time() - cpu0  # all threads of this rank, incl. Horovod's background thread
    d.barrier()
    per_rank = d.allreduce_sum([0.0] * d.rank + [elapsed] + [0.0] * (d.size - d.rank - 1))
    cpu_total = float(d.allreduce_sum([cpu_s])[0])
    images = d.size * batch * args.steps
    if d.is_root:
        Path(args.out).write_text(
            json.dumps(
                {
                    "ranks": d.size,
                    "backend": d.backend,
                    "img_per_s": images / float(per_rank.max()),
                    "cpu_ms_per_img": 1000.0 * cpu_total / images,
                }
            )
        )
    d.shutdown()


def mpi_cmd(n: int) -> list[str]:
    flags = ["--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return ["mpiexec", *flags, "-n", str(n)]


def launch(n: int, backend: str, model: str, index: str, steps: int, tmp: Path) -> dict:
    out = tmp / f"scale-{backend}-{model}-{n}.json"
    cmd = mpi_cmd(n) + [
        sys.executable,
        __file__,
        "--worker",
        "--backend",
        backend,
        "--model",
        model,
        "--index",
        index,
        "--steps",
        str(steps),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return json.loads(out.read_text())


def scaling(backends: list[str], model: str, index: str, steps: int, repeats: int, tmp: Path) -> dict:
    """Wall-clock efficiency (needs 2 idle cores) and CPU-time efficiency (CPU per image, 1 rank vs
    2 ranks: the communication/synchronisation overhead, much less sensitive to other load)."""
    out = {}
    for backend in backends:
        ips, cpu = {1: 0.0, 2: 0.0}, {1: float("inf"), 2: float("inf")}
        for _ in range(repeats):
            for n in (1, 2):
                res = launch(n, backend, model, index, steps, tmp)
                ips[n] = max(ips[n], res["img_per_s"])
                cpu[n] = min(cpu[n], res["cpu_ms_per_img"])
        out[backend] = {
            "img_per_s_1": ips[1],
            "img_per_s_2": ips[2],
            "efficiency": ips[2] / (2 * ips[1]),
            "cpu_ms_per_img_1": cpu[1],
            "cpu_ms_per_img_2": cpu[2],
            "cpu_efficiency": cpu[1] / cpu[2],
        }
    return out


# ---- 3. GPU ------------------------------------------------------------------------------------------
def gpu_resnet50(steps: int = 30, batch: int = 128) -> dict | None:
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda")
    net = models.build({"name": "resnet50"}, 1000, 3, 224).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    crit = nn.CrossEntropyLoss()

    def one() -> None:
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = crit(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(10):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    ips = steps * batch / (time.perf_counter() - t0)
    return {"device": torch.cuda.get_device_name(0), "img_per_s": ips, "ratio_to_a100_reference": ips / 2470.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "conv2dnet"], choices=sorted(SETUPS))
    p.add_argument("--backends", nargs="*", default=["horovod", "ddp"], help="none: skip the scaling runs")
    p.add_argument("--n", type=int, default=512, help="patches in the synthetic shards")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 12 resnet18, 200 conv2dnet)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write all numbers here")
    # worker mode (under mpiexec)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict = {"cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes skew every ratio)")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for model in args.models:
            steps = args.steps or (12 if model == "resnet18" else 200)
            index = make_cohort(tmp, model, args.n)
            lm = loader_vs_memory(index, model, steps, args.repeats)
            ratios = ", ".join(
                f"{name} {lm['img_per_s'][name]:.1f} ({lm['ratio_' + name]:.3f}×)"
                for name in ("stream", "preload", "preload_noaug")
            )
            print(
                f"[{model}] loader vs memory: memory {lm['img_per_s']['memory']:.1f} img/s, {ratios}  target ≥ 0.95×",
                flush=True,
            )
            sc = scaling(args.backends, model, index, steps, max(2, args.repeats - 1), tmp)
            for backend, s in sc.items():
                print(
                    f"[{model}] {backend}: 1 rank {s['img_per_s_1']:.1f} img/s, 2 ranks {s['img_per_s_2']:.1f} img/s, "
                    f"scaling efficiency {s['efficiency']:.3f}  target ≥ 0.85; CPU ms/img {s['cpu_ms_per_img_1']:.2f} "
                    f"vs {s['cpu_ms_per_img_2']:.2f}, CPU efficiency {s['cpu_efficiency']:.3f}",
                    flush=True,
                )
            results[model] = {"loader_vs_memory": lm, "scaling": sc}
    gpu = gpu_resnet50()
    if gpu:
        print(
            f"[resnet50 GPU] {gpu['device']}: {gpu['img_per_s']:.0f} img/s AMP+channels_last "
            f"({gpu['ratio_to_a100_reference']:.2f}× the A100 reference 2,470)"
        )
    else:
        print("[resnet50 GPU] no CUDA device: skipped")
    results["gpu_resnet50"] = gpu
    results["load_avg_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

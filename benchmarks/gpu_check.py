#!/usr/bin/env python
"""GPU numbers for benchmarks/gpu_check.sh: ResNet-50 training img/s with AMP + channels_last, fed by the real
HDF5 loader vs synthetic tensors already on the GPU, and how busy each keeps the GPU.

Three feeds of the same training step (medflow's ResNet-50 on raw uint8 NHWC patches, SGD, AMP,
channels_last; the step of `medflow.train.trainer.Trainer`):

- ``synthetic``: one fixed batch on the GPU (the ceiling: no input pipeline);
- ``loader``: `medflow.train.loader.EpochLoader` over real HDF5 shards, configured as `medflow train`
  configures it (preload auto, dihedral augmentation, no workers);
- ``loader_prefetch``: the same loader streaming from HDF5 with one read-ahead thread and pinned memory.

GPU busy = mean `nvidia-smi` utilisation sampled every 100 ms during each feed (where nvidia-smi
exists), and the loader's img/s as a fraction of the synthetic rate. Published anchors: 2,470 img/s
per A100 (NVIDIA DeepLearningExamples, PyTorch AMP); ~7,000 img/s per H100 is a tuned MXNet + DALI
ceiling (MLPerf).

    python benchmarks/gpu_check.py --out DIR [--seconds 20] [--batch 128] [--cpu]

``--cpu`` runs the same code on the CPU with tiny sizes: a dry run of this script where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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
from medflow.train.trainer import Trainer  # noqa: E402

A100_REFERENCE = 2470.0


class GpuSampler:
    """Mean GPU utilisation (%) from `nvidia-smi -lms` while active; None without nvidia-smi."""

    def __init__(self, device: torch.device):
        self.device = device
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        exe = shutil.which("nvidia-smi")
        if exe and self.device.type == "cuda":
            index = str(self.device.index or 0)
            cmd = [exe, "-i", index, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.samples: list[float] = []
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def make_trainer(model: str, device: torch.device, size: int, amp: bool) -> Trainer:
    net = models.build({"name": model}, 2, 3, size).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    d = dist.Dist("none", 0, 1, 0, device)
    cfg = {"lr": 0.01, "warmup_epochs": 0, "scheduler": "none", "epochs": 1}
    scaler = torch.amp.GradScaler("cuda") if amp else None
    return Trainer(net, opt, nn.CrossEntropyLoss(), d, cfg, 0.01, 0.01, scaler)


def run_feed(trainer: Trainer, batches: Callable[[], Iterator], seconds: float, warmup: int) -> dict:
    device = trainer.d.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it = batches()

    def step() -> int:
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with trainer.autocast():
            loss = models.loss_of(trainer.model(x), y, trainer.criterion)
        trainer.step(loss)
        return len(y)

    for _ in range(warmup):
        step()
    sync()
    images, steps, t0 = 0, 0, time.perf_counter()
    with GpuSampler(device) as gpu:
        while time.perf_counter() - t0 < seconds or steps < 3:
            images += step()
            steps += 1
        sync()
        elapsed = time.perf_counter() - t0
    return {"img_per_s": images / elapsed, "steps": steps, "seconds": elapsed, "gpu_util_pct": gpu.mean}


def endless(loader) -> Iterator:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per feed")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--patches", type=int, default=4096, help="patches in the HDF5 cohort")
    ap.add_argument("--model", default="", help="default resnet50 (resnet18 with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU with tiny sizes")
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for a dry run)", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    size, batch, seconds, n = (
        (32, 4, min(args.seconds, 0.5), 64) if args.cpu else (224, args.batch, args.seconds, args.patches)
    )
    model = args.model or ("resnet18" if args.cpu else "resnet50")
    torch.backends.cudnn.benchmark = True
    result: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "model": model,
        "patch": [size, size, 3],
        "batch": batch,
        "amp": device.type == "cuda",
        "channels_last": device.type == "cuda",
        "feeds": {},
    }
    with tempfile.TemporaryDirectory(prefix="medflow-gpucheck-") as tmp:
        t0 = time.perf_counter()
        per_image = n // 4
        images = {f"img{i}": (f"p{i}", [j % 2 for j in range(per_image)]) for i in range(4)}
        index = write_synthetic_cohort(
            Path(tmp), images, ["normal", "tumour"], patch_shape=(size, size, 3), cohort="gpu"
        )
        result["cohort"] = {"patches": n, "bytes": n * size * size * 3, "write_s": time.perf_counter() - t0}
        pset = PatchSet(load_index(index), [f"p{i}" for i in range(4)])
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen).to(device)
        y = torch.randint(0, 2, (batch,), generator=gen).to(device)
        feeds = {
            "synthetic": lambda: iter(lambda: (x, y), None),
            "loader": lambda: endless(EpochLoader(pset, batch_size=batch, seed=0, augment="dihedral", drop_last=True)),
            "loader_prefetch": lambda: endless(
                EpochLoader(
                    pset,
                    batch_size=batch,
                    seed=0,
                    augment="dihedral",
                    drop_last=True,
                    preload=False,
                    prefetch=2,
                    pin_memory=True,
                )
            ),
        }
        for name, feed in feeds.items():
            trainer = make_trainer(model, device, size, amp=device.type == "cuda")
            result["feeds"][name] = run_feed(trainer, feed, seconds, warmup=1 if args.cpu else 10)
            f = result["feeds"][name]
            util = "n/a" if f["gpu_util_pct"] is None else f"{f['gpu_util_pct']:.0f} %"
            print(f"gpu_check {name}: {f['img_per_s']:.1f} img/s, GPU busy {util}", flush=True)
        pset.close()
    synthetic = result["feeds"]["synthetic"]["img_per_s"]
    for name in ("loader", "loader_prefetch"):
        result["feeds"][name]["fraction_of_synthetic"] = result["feeds"][name]["img_per_s"] / synthetic
    result["ratio_to_a100_reference"] = synthetic / A100_REFERENCE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(
        f"gpu_check: {model} on {result['device']}: synthetic {synthetic:.0f} img/s "
        f"({result['ratio_to_a100_reference']:.2f}x the A100 reference 2,470), loader "
        f"{result['feeds']['loader']['fraction_of_synthetic']:.2f}x / prefetch "
        f"{result['feeds']['loader_prefetch']['fraction_of_synthetic']:.2f}x of synthetic"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

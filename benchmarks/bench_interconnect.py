#!/usr/bin/env python
"""Interconnect scaling (issue 12, item 5): allreduce bandwidth and 2-node training efficiency at several
link rates, measured on a virtual 2-node SLURM cluster and compared with the α–β model.

Brings up `slurm/cluster.sh up --nodes 2` (needs root, slurm-wlm, munge; prints why and exits 0 without
them), then for each link rate (``cluster.sh shape``: tc tbf on both ends of every node link):

1. allreduce, one rank per node (`srun -N2`), `medflow bench`'s own worker: a sweep of message sizes
   up to ``--allreduce-mb``; bus bandwidth at the largest size and the α–β least-squares fit;
2. the training step of ``--model`` (the bench worker: the training jobs' Trainer, Horovod or DDP) on
   2 ranks on 2 nodes, and as the baseline two independent 1-rank runs at the same time, one per
   node (all nodes share this machine's cores: a 1-rank run alone would get more CPU than each rank
   of the pair); measured efficiency = img/s(2 ranks) / (2 · img/s(slower 1-rank run));
3. the modelled efficiency `medflow.bench.scaling.efficiency(step_s(1 rank), gradient bytes, 2, fit)`
   (no overlap of communication and backward: a lower bound).

Then the same model, fed the published setups' link rates, gradient sizes and step times, next to
their published efficiencies (inputs marked "assumed" are this script's estimates, not measurements).
All nodes share this machine's cores: absolute rates are CPU-bound, the ratios are the point.

    sudo .venv/bin/python benchmarks/bench_interconnect.py [--rates none,25gbit,10gbit,1gbit]
        [--model resnet18] [--backend ddp] [--repeats 2] [--seconds 3] [--allreduce-mb 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medflow.bench import scaling  # noqa: E402
from medflow.bench.scaling import AlphaBeta  # noqa: E402

CLUSTER = ROOT / "slurm" / "cluster.sh"
PY = Path(sys.executable)

# Published data-parallel efficiencies and the inputs the model needs for them. Gradient sizes are
# parameter counts x 4 bytes (fp32 gradients, also under AMP's master weights); step times follow from
# the published per-GPU throughput where given, else are assumed; link latencies are assumed.
PUBLISHED = [
    {
        "setup": "Horovod: ResNet-101, 512 P100 (128 nodes x 4), 25 Gbit/s RoCE",
        "source": "Sergeev & Del Balso 2018 (arXiv:1802.05799), ~90 %",
        "efficiency": 0.90,
        "nodes": 128,
        "link": AlphaBeta.from_link(25.0, 10.0),  # 25 Gbit/s, 10 us (assumed)
        "grad_bytes": 44.5e6 * 4,  # ResNet-101: 44.5 M parameters
        "step_s": 64 / 130,  # assumed: batch 64 at ~130 img/s per P100 (TF fp32)
    },
    {
        "setup": "NVIDIA: ResNet-50 AMP, 8 x A100 in one DGX (NVSwitch)",
        "source": "DeepLearningExamples: 2,470 -> 16,621 img/s (84 %)",
        "efficiency": 16_621 / (8 * 2_470),
        "nodes": 8,  # 8 GPUs on one NVSwitch: a ring of 8 at NVLink bus bandwidth
        "link": AlphaBeta(5e-6, 1 / 230e9),  # ~230 GB/s NCCL bus bandwidth, 5 us (assumed)
        "grad_bytes": 25.6e6 * 4,  # ResNet-50: 25.6 M parameters
        "step_s": 256 / 2_470,  # batch 256 per GPU at the published 2,470 img/s
    },
    {
        "setup": "CSC Mahti: ResNet-50 DDP, 8 A100 on 2 nodes (4 per node), HDR InfiniBand",
        "source": "CSC Mahti docs, 90.6 %",
        "efficiency": 0.906,
        "nodes": 2,
        "link": AlphaBeta.from_link(200.0, 5.0),  # assumed: one HDR200 port per node, 5 us
        "grad_bytes": 25.6e6 * 4,
        "step_s": 256 / 2_470,  # assumed: NVIDIA's A100 AMP rate
    },
]


def sh(*cmd: str, timeout: float = 300, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return proc.stdout


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (slurm/cluster.sh runs slurmd in network namespaces)"
    for exe in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/srun", "/usr/sbin/tc"):
        if not os.access(exe, os.X_OK) and not shutil.which(Path(exe).name):
            return f"{exe} missing (apt-get install slurm-wlm munge iproute2)"
    return None


def write_config(base: Path, args: argparse.Namespace) -> Path:
    cfg = {
        "site": {"name": "interconnect"},
        "results": str(base / "results"),
        "cohorts": {"bench": {"kind": "wsi", "manifest": str(base / "unused.csv")}},
        "wsi": {"patch_size": args.patch},
        "studies": {"bench": {"cohort": "bench", "model": {"name": args.model}, "train": {"batch_size": args.batch}}},
        "launch": {"backend": args.backend, "threads_per_rank": 1},
        "bench": {"seconds": args.seconds, "allreduce_mb": args.allreduce_mb, "models": [args.model]},
    }
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Runner:
    """Bench workers as SLURM steps on the virtual cluster."""

    def __init__(self, base: Path, cluster: Path, config: Path):
        self.base, self.config = base, config
        self.env = {
            **os.environ,
            "PATH": f"{cluster}/bin{os.pathsep}{PY.parent}{os.pathsep}{os.environ['PATH']}",
            "SLURM_CONF": f"{cluster}/etc/slurm.conf",
            "PYTHONPATH": str(ROOT / "src"),
            "OMP_NUM_THREADS": "1",
        }

    def worker(self, nodes: int, *worker_args: str, ranks: int | None = None) -> list[dict]:
        """One rank per node; ``ranks`` = 1 runs independent 1-rank workers side by side, one per node."""
        ranks = nodes if ranks is None else ranks
        stem = self.base / f"w-{nodes}-{ranks}-{worker_args[0]}"
        for old in self.base.glob(f"{stem.name}-*.json"):
            old.unlink()
        srun = ["srun", "--mpi=pmix", "-N", str(nodes), "-n", str(nodes), "--ntasks-per-node=1", "--cpus-per-task=1"]
        worker = [str(PY), "-m", "medflow.cli", "bench", "--config", str(self.config), "--worker", *worker_args]
        # each task names its output after its SLURM_PROCID (rank 0 alone writes in a multi-rank run)
        script = f'"$@" --ranks {ranks} --out "{stem}-$SLURM_PROCID.json"'
        sh(*srun, "bash", "-c", script, "worker", *worker, timeout=600, env=self.env)
        return [json.loads(p.read_text()) for p in sorted(self.base.glob(f"{stem.name}-*.json"))]


def measure(runner: Runner, args: argparse.Namespace) -> dict:
    """Best of ``--repeats`` rounds for each measurement, 1 and 2 ranks taking turns (shared cores)."""
    train = ["train", "--model", args.model, "--seconds", str(args.seconds)]
    runs: dict[str, list[dict]] = {"allreduce": [], "r1": [], "r2": []}
    for _ in range(args.repeats):
        runs["allreduce"] += runner.worker(2, "allreduce", "--seconds", str(args.seconds))
        # The 1-rank baseline runs on both nodes at once (two independent jobs): the nodes share this
        # machine's cores, so only then does it see the CPU share each rank of the 2-rank run gets.
        pair = runner.worker(2, *train, ranks=1)
        runs["r1"].append(min(pair, key=lambda r: r["img_per_s"]))
        runs["r2"] += runner.worker(2, *train)
    allreduce = max(runs["allreduce"], key=lambda r: r["busbw_gb_per_s"])
    assert allreduce["nodes"] == 2, allreduce["hosts"]
    r1, r2 = (max(runs[k], key=lambda r: r["img_per_s"]) for k in ("r1", "r2"))
    fit = AlphaBeta(allreduce["fit"]["alpha_us"] * 1e-6, 1 / (allreduce["fit"]["busbw_gb_per_s"] * 1e9))
    return {
        "allreduce": allreduce,
        "r1": r1,
        "r2": r2,
        "measured_efficiency": r2["img_per_s"] / (2 * r1["img_per_s"]),
        "modelled_efficiency": scaling.efficiency(r1["step_s"], r1["grad_bytes"], 2, fit),
    }


def print_tables(rows: dict[str, dict], args: argparse.Namespace) -> None:
    first = next(iter(rows.values()))
    grad_mb, step_ms = first["r1"]["grad_bytes"] / 1e6, 1000 * first["r1"]["step_s"]
    print(f"\n{args.model} ({grad_mb:.1f} MB of gradients, 1-rank step {step_ms:.0f} ms, batch {args.batch}), ")
    print(f"{args.backend}, 2 nodes x 1 rank, allreduce sweep up to {args.allreduce_mb:g} MB:\n")
    head = f"{'link':>8} {'allreduce busbw':>16} {'fit: alpha':>11} {'fit: busbw':>11} {'2-node efficiency':>18} {'modelled':>9}"
    print(head + f" {'implied':>8}")
    print(f"{'':>8} {'GB/s (largest)':>16} {'us':>11} {'GB/s':>11} {'measured':>18} {'(no overlap)':>9} {'overlap':>8}")
    for rate, row in rows.items():
        a, r1 = row["allreduce"], row["r1"]
        fit = AlphaBeta(a["fit"]["alpha_us"] * 1e-6, 1 / (a["fit"]["busbw_gb_per_s"] * 1e9))
        hidden = scaling.overlap_to_match(r1["step_s"], r1["grad_bytes"], 2, fit, min(row["measured_efficiency"], 1.0))
        print(
            f"{rate:>8} {a['busbw_gb_per_s']:>16.3f} {a['fit']['alpha_us']:>11.0f} {a['fit']['busbw_gb_per_s']:>11.3f}"
            f" {row['measured_efficiency']:>18.3f} {row['modelled_efficiency']:>9.3f}"
            f" {'-' if hidden is None else f'{hidden:.2f}':>8}"
        )
    print("\nPublished figures vs the same model (no overlap; 'overlap' = share of the allreduce that must be")
    print("hidden behind backward for the model to match the published efficiency):\n")
    print(f"{'setup':<72} {'published':>9} {'model':>6} {'overlap':>8}")
    for p in PUBLISHED:
        e = scaling.efficiency(p["step_s"], p["grad_bytes"], p["nodes"], p["link"])
        hidden = scaling.overlap_to_match(p["step_s"], p["grad_bytes"], p["nodes"], p["link"], p["efficiency"])
        note = f"{hidden:>8.2f}" if hidden is not None else f"{'-':>8}"
        print(f"{p['setup']:<72} {p['efficiency']:>9.3f} {e:>6.3f} {note}")
        print(
            f"  {p['source']}; step {1000 * p['step_s']:.0f} ms, {p['grad_bytes'] / 1e6:.0f} MB, "
            f"link {p['link'].busbw_gb_per_s:.1f} GB/s, alpha {p['link'].alpha_s * 1e6:.0f} us"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="none,25gbit,10gbit,1gbit", help="comma-separated tc rates; none = unshaped")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--patch", type=int, default=64, help="patch side (the model's input size)")
    ap.add_argument("--batch", type=int, default=16, help="per-rank batch")
    ap.add_argument("--backend", default="ddp", choices=["horovod", "ddp"])
    ap.add_argument("--repeats", type=int, default=2, help="rounds per link rate (best of)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--allreduce-mb", type=float, default=32.0)
    ap.add_argument("--json", help="write every measurement here")
    args = ap.parse_args()
    reason = skip_reason()
    if reason:
        print(f"bench_interconnect: skipped: {reason}")
        return 0
    base = Path(tempfile.mkdtemp(prefix="medflow-interconnect-", dir="/tmp"))
    cluster = base / "slurm"
    rows: dict[str, dict] = {}
    try:
        up = ["bash", str(CLUSTER), "up", str(cluster), "--nodes", "2", "--cpus", "2", "--mem-mb", "8000"]
        print(sh(*up, "--share", str(base), "--name", "interconnect").strip())
        runner = Runner(base, cluster, write_config(base, args))
        for rate in args.rates.split(","):
            print(sh("bash", str(CLUSTER), "shape", str(cluster), rate).strip())
            rows[rate] = measure(runner, args)
            r = rows[rate]
            print(
                f"  {rate}: allreduce {r['allreduce']['busbw_gb_per_s']:.3f} GB/s, "
                f"efficiency {r['measured_efficiency']:.3f} measured / {r['modelled_efficiency']:.3f} modelled",
                flush=True,
            )
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(cluster)], capture_output=True, timeout=300)
        shutil.rmtree(base, ignore_errors=True)
    print_tables(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

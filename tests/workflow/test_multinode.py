"""Cross-node training through `snakemake --profile slurm` on a virtual multi-node SLURM cluster.

`slurm/cluster.sh up DIR --nodes N` gives each node its own network, UTS and mount namespace (own host
name, address, private /tmp) with slurmd per node; this test's base directory is shared into every
node's /tmp as a cluster's shared file system would be. One fold per case, all from one small HSI
cohort prepared once through the profile:

- Horovod and DDP, 2 nodes × 1 rank and 2 nodes × 2 ranks (the Horovod 2 × 2 job GPU-shaped on fake
  GPUs: `--gres=gpu:2 --ntasks-per-gpu=1`): ranks on different hosts, identical replicas, loss falls,
  the record's layout (nodes, ranks per node, local ranks) and the sbatch geometry;
- DDP on a cluster whose node names resolve nowhere (`--no-dns`);
- a node killed (`cluster.sh kill-node`) during epoch 2: SLURM requeues the job on the nodes left, it
  resumes from its checkpoint, the DAG completes and the weights equal an uninterrupted run.

Needs root, slurm-wlm and munge (skips otherwise); every snakemake call runs under `timeout`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from snakemake_executor_plugin_slurm.utils import set_gres_string
from test_slurm import (
    CLUSTER_SH,
    SNAKEFILE,
    Cluster,
    _cluster_skip_reason,
    _submit_line,
    assert_sbatch_line,
    reduced_demo_config,
    run_snakemake,
    sbatch_lines,
)

from conftest import fault_env
from medflow.train import geometry

SITE = "mn"  # one results directory for every cluster of this module (shards are prepared once)
STUDY = "hsi_demo"


# --------------------------------------------------------------------------- fast: the job geometry


def _train_line(launch: dict) -> str:
    """The plugin's sbatch line for the `train` rule under slurm/config.yaml's train resources."""
    full = {"ranks": 2, "nodes": 1, "gpus_per_node": 0, "threads_per_rank": 1, **launch}
    res = {"mem_mb_per_cpu": 3000, "runtime": 240, "mpi": "srun --mpi=pmix", **geometry.slurm_resources(full)}

    # the plugin appends the GPU request after the submit string
    class Res(dict):
        __getattr__ = dict.__getitem__

    return _submit_line(res) + set_gres_string(SimpleNamespace(resources=Res(res)))


def test_train_geometry_gives_ranks_per_node_and_gpus_per_node():
    # CPU, 2 nodes x 2 ranks: --ntasks-per-node (a bare --ntasks=4 was placed 3 + 1 by SLURM 22.05).
    words = _train_line({"ranks": 4, "nodes": 2}).split()
    assert {"--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1"} <= set(words)
    assert not any(w.startswith("--ntasks=") for w in words)
    # 2 nodes x 1 rank: --ntasks=2 on 2 nodes is one per node.
    assert {"--nodes=2", "--ntasks=2"} <= set(_train_line({"ranks": 2, "nodes": 2}).split())
    # GPU, 2 nodes x 2 GPUs: GPUs per node (--gres), one rank per GPU, no job-total --gpus.
    gpu = _train_line({"ranks": 4, "nodes": 2, "gpus_per_node": 2})
    assert {"--nodes=2", "--ntasks=4", "--ntasks-per-gpu=1", "--gres=gpu:2"} <= set(gpu.split())
    assert "--gpus=" not in gpu and "--ntasks-per-node" not in gpu
    # One node as before.
    assert {"--nodes=1", "--ntasks=2"} <= set(_train_line({"ranks": 2}).split())


@pytest.mark.parametrize(
    "launch, message",
    [
        ({"ranks": 3, "nodes": 2}, "not a multiple"),
        ({"ranks": 1, "nodes": 2}, "exceeds"),
        ({"ranks": 2, "nodes": 1, "gpus_per_node": 4}, "one rank per GPU"),
    ],
)
def test_train_geometry_rejects_uneven_layouts(launch, message):
    full = {"ranks": 2, "nodes": 1, "gpus_per_node": 0, "threads_per_rank": 1, **launch}
    assert message in (geometry.problem(full) or "")
    with pytest.raises(ValueError, match=message):
        geometry.slurm_resources(full)


# --------------------------------------------------------------------------- clusters


def _up(directory: Path, share: Path, nodes: int, *extra: str) -> Cluster:
    reason = _cluster_skip_reason() or next(
        (
            f"{exe} missing (apt-get install iproute2 util-linux)"
            for exe in ("ip", "tc", "nsenter", "unshare")
            if not shutil.which(exe)
        ),
        None,
    )
    if reason:
        pytest.skip(reason)
    cmd = ["bash", str(CLUSTER_SH), "up", str(directory), "--nodes", str(nodes), "--cpus", "8"]
    cmd += ["--mem-mb", "16000", "--share", str(share), *extra]
    up = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SH), "down", str(directory)], capture_output=True, timeout=120)
        pytest.fail(f"cluster.sh up --nodes {nodes} failed:\n{up.stdout}{up.stderr}")
    name = re.search(r"^ClusterName=(\S+)", (directory / "etc" / "slurm.conf").read_text(), re.M)
    return Cluster(dir=directory, name=name.group(1) if name else "")


def _down(cluster: Cluster) -> None:
    subprocess.run(["bash", str(CLUSTER_SH), "down", str(cluster.dir)], capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def cluster3(base):
    """Three nodes with two fake GPUs each (a 2-node job still has a node left when one dies)."""
    cluster = _up(base / "slurm3", base, 3, "--gpus", "2", "--name", "mnci")
    yield cluster
    _down(cluster)


@pytest.fixture(scope="module")
def nodns(base):
    cluster = _up(base / "slurm-nodns", base, 2, "--no-dns", "--name", "nodns")
    yield cluster
    _down(cluster)


# --------------------------------------------------------------------------- the workflow


def _config(base: Path, **launch) -> dict:
    """The reduced demo, HSI only (6 patients: 3 outer x 2 inner folds, one per test), 3 epochs."""
    cfg = reduced_demo_config(base, site=SITE)
    cfg["synth"]["hsi"]["patients"] = 6
    cfg["cohorts"] = {STUDY: cfg["cohorts"][STUDY]}
    cfg["studies"] = {STUDY: cfg["studies"][STUDY]}
    cfg["studies"][STUDY]["train"] = {"epochs": 3, "batch_size": 16, "bn_recalibration": 64}
    cfg["folds"] = {"strategy": "kfold", "outer": 3, "inner": 2, "balance": "stratified"}
    cfg["hsi"]["images_per_job"] = 4  # 6 images: 2 extraction jobs (4 + 2), one SLURM array
    cfg["launch"] = {"backend": "horovod", "ranks": 2, "nodes": 1, "threads_per_rank": 1, **launch}
    return cfg


def _write(base: Path, cfg: dict, name: str) -> Path:
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _results(base: Path) -> Path:
    return base / "results" / SITE


def _snakemake(cluster: Cluster, base: Path, config: Path, targets: list[str], timeout_s: int = 420, **env: str):
    args = ["-s", str(SNAKEFILE), "--configfile", str(config), "--", *targets]
    return run_snakemake(cluster, base, args, timeout_s, **env)


@pytest.fixture(scope="module")
def prepared(cluster3, base) -> Path:
    """Shards, index and fold plan of the HSI cohort, made through the profile on the 3-node cluster."""
    config = _write(base, _config(base), "prepare")
    res = _results(base)
    proc = _snakemake(cluster3, base, config, [str(res / "folds" / f"{STUDY}.json")])
    assert proc.returncode == 0, proc.stdout[-5000:]
    # Extraction in batches (hsi.images_per_job = 4): one array of 2 tasks, one shard + record per image.
    (line,) = sbatch_lines(proc.stdout, "extract_hsi")
    assert_sbatch_line(line, "--array=1-2", "--ntasks=1")
    batch_files = sorted((res / "shards" / STUDY / "batches").glob("b*.json"))
    assert [json.loads(b.read_text())["n_images"] for b in batch_files] == [4, 2]
    index = json.loads((res / "index" / f"{STUDY}.json").read_text())
    assert len(index["shards"]) == 6 == len(list((res / "shards" / STUDY).glob("*.record.json")))
    return res


def _fold_dir(res: Path, outer: int, inner: int) -> Path:
    return res / "runs" / STUDY / f"outer{outer}" / f"inner{inner}"


def _train(cluster: Cluster, base: Path, fold: tuple[int, int], name: str, timeout_s: int = 420, env=None, **launch):
    config = _write(base, _config(base, **launch), name)
    target = _fold_dir(_results(base), *fold) / "record.json"
    return _snakemake(cluster, base, config, [str(target)], timeout_s, **(env or {}))


def _assert_cross_node(record: dict, backend: str, nodes: int, per_node: int) -> None:
    launch = record["launch"]
    assert record["status"] == "ok"
    assert (launch["backend"], launch["launcher"], launch["ranks"]) == (backend, "srun", nodes * per_node)
    # Where the ranks ran: distinct hosts, the same count on each, local ranks 0..per_node-1 on each.
    assert launch["nodes"] == nodes and len(set(launch["hosts"])) == nodes
    assert all(re.fullmatch(r"node\d+", h) for h in launch["hosts"])
    assert launch["ranks_per_node"] == [per_node] * nodes
    assert launch["local_ranks"] == list(range(per_node)) * nodes
    hosts = [row["host"] for row in launch["per_rank"]]
    assert [row["rank"] for row in launch["per_rank"]] == list(range(nodes * per_node))
    assert len(set(hosts)) == nodes and sorted(hosts) == sorted(launch["hosts"] * per_node)
    # Identical parameters on every rank after training.
    assert record["replicas"]["identical"] and len(record["replicas"]["state_sha256"]) == nodes * per_node


def _assert_loss_falls(run_dir: Path) -> None:
    curves = np.genfromtxt(run_dir / "curves.csv", delimiter=",", names=True)
    assert len(curves) == 3 and curves["train_loss"][-1] < curves["train_loss"][0]


CASES = [  # (backend, ranks per node, fold, GPU-shaped)
    pytest.param("horovod", 1, (0, 0), False, id="horovod-2x1"),
    pytest.param("horovod", 2, (0, 1), True, id="horovod-2x2-gpus"),
    pytest.param("ddp", 1, (1, 0), False, id="ddp-2x1"),
    pytest.param("ddp", 2, (1, 1), False, id="ddp-2x2"),
]


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("backend, per_node, fold, gpus", CASES)
def test_fold_trains_across_two_nodes(cluster3, base, prepared, backend, per_node, fold, gpus):
    launch = {"backend": backend, "ranks": 2 * per_node, "nodes": 2, "gpus_per_node": per_node if gpus else 0}
    proc = _train(cluster3, base, fold, f"{backend}-{per_node}", **launch)
    assert proc.returncode == 0, proc.stdout[-6000:]
    run_dir = _fold_dir(prepared, *fold)
    record = json.loads((run_dir / "record.json").read_text())
    _assert_cross_node(record, backend, 2, per_node)
    _assert_loss_falls(run_dir)
    assert record["launch"]["slurm_job_id"] in cluster3.known_job_ids()

    (line,) = sbatch_lines(proc.stdout, "train")
    if gpus:  # GPUs per node and one rank per GPU (fake GPUs: SLURM schedules them, training runs on CPU)
        assert_sbatch_line(line, "--nodes=2", "--ntasks=4", "--ntasks-per-gpu=1", "--gres=gpu:2")
        assert "--gpus=" not in line
    elif per_node == 2:
        assert_sbatch_line(line, "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1")
    else:
        assert_sbatch_line(line, "--nodes=2", "--ntasks=2", "--cpus-per-task=1")
    if backend == "ddp":  # rank 0's address on the node network; every rank bound to its eth0
        rdzv = record["launch"]["rendezvous"]
        assert re.fullmatch(r"10\.213\.\d+\.\d+", rdzv["address"]) and rdzv["source"] == "subnet"
        assert {row["interface"] for row in record["launch"]["per_rank"]} == {"eth0"}


def _in_node(cluster: Cluster, node: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), "exec", str(cluster.dir), node, *cmd], capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
@pytest.mark.slurm
def test_ddp_across_nodes_whose_names_do_not_resolve(nodns, base, prepared):
    # The trap this guards against: no node resolves its own name or another's.
    probe = "import socket\ntry:\n    socket.gethostbyname(socket.gethostname())\nexcept socket.gaierror as e:\n    print('gaierror', e.errno)"
    out = _in_node(nodns, "node1", "python3", "-c", probe)
    assert out.stdout.startswith("gaierror"), out.stdout + out.stderr
    assert _in_node(nodns, "node1", "getent", "hosts", "node2").returncode != 0

    proc = _train(nodns, base, (2, 1), "ddp-nodns", backend="ddp", ranks=4, nodes=2)
    assert proc.returncode == 0, proc.stdout[-6000:]
    run_dir = _fold_dir(prepared, 2, 1)
    record = json.loads((run_dir / "record.json").read_text())
    _assert_cross_node(record, "ddp", 2, 2)
    _assert_loss_falls(run_dir)
    assert record["site"]["cluster"] == "nodns" and record["launch"]["slurm_job_id"] in nodns.known_job_ids()
    assert record["launch"]["rendezvous"]["address"].startswith("10.213.")
    assert {row["interface"] for row in record["launch"]["per_rank"]} == {"eth0"}

    # Horovod needs no names either (MPI's own wire-up over PMIx): the same fold again, 2 nodes x 1 rank.
    proc = _train(nodns, base, (2, 1), "horovod-nodns", backend="horovod", ranks=2, nodes=2)
    assert proc.returncode == 0, proc.stdout[-6000:]
    record = json.loads((run_dir / "record.json").read_text())
    _assert_cross_node(record, "horovod", 2, 1)
    _assert_loss_falls(run_dir)


# --------------------------------------------------------------------------- a node dies


def _job_nodes(cluster: Cluster, job_id: str) -> list[str]:
    out = cluster.slurm(
        "scontrol", "show", "hostnames", cluster.slurm("squeue", "-h", "-j", job_id, "-o", "%N").strip()
    )
    return out.split()


def _running_train_job(cluster: Cluster, deadline: float) -> str:
    while time.time() < deadline:
        rows = [line.split() for line in cluster.slurm("squeue", "-h", "-t", "R", "-o", "%A %k").splitlines()]
        train = [row[0] for row in rows if len(row) == 2 and row[1].startswith("rule_train")]
        if train:
            return train[0]
        time.sleep(0.5)
    raise AssertionError("no running train job")


@pytest.mark.slow
@pytest.mark.slurm
def test_node_killed_in_epoch_two_requeues_and_resumes_to_identical_weights(cluster3, base, prepared):
    launch = {"backend": "horovod", "ranks": 2, "nodes": 2}
    fold = (2, 0)
    run_dir = _fold_dir(prepared, *fold)
    # The uninterrupted run first (same config, same fold): the weights to reach.
    proc = _train(cluster3, base, fold, "uninterrupted", **launch)
    assert proc.returncode == 0, proc.stdout[-6000:]
    reference = base / "uninterrupted-model.pt"
    shutil.copy(run_dir / "model.pt", reference)
    for name in ("record.json", "model.pt", "curves.csv", "checkpoint.pt"):
        (run_dir / name).unlink()

    # Again, held on rank 0 right after the checkpoint of epoch 1 (the other rank is in epoch 2's first
    # allreduce); then the second node of the job dies: slurmd, steps and link.
    marker = base / "held-in-epoch-2"
    env = fault_env(MEDFLOW_TEST_HOLD_AFTER_EPOCH=f"0:{marker}")
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(proc=_train(cluster3, base, fold, "killed", 900, env=env, **launch))
    )
    runner.start()
    deadline = time.time() + 300
    job_id = _running_train_job(cluster3, deadline)
    while not marker.exists() and time.time() < deadline and runner.is_alive():
        time.sleep(0.3)
    assert marker.exists(), "the training job never reached the end of epoch 1"
    nodes = _job_nodes(cluster3, job_id)
    assert len(nodes) == 2
    killed = subprocess.run(
        ["bash", str(CLUSTER_SH), "kill-node", str(cluster3.dir), nodes[1]], capture_output=True, text=True
    )
    try:
        assert killed.returncode == 0, killed.stderr
        runner.join(timeout=900)
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "revive-node", str(cluster3.dir), nodes[1]], capture_output=True)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stdout[-6000:]

    # SLURM requeued the same job (no second submission by Snakemake) and it ran on the nodes left.
    assert len(sbatch_lines(proc.stdout, "train")) == 1
    job = cluster3.slurm("scontrol", "show", "job", job_id)
    assert re.search(r"\bRestarts=1\b", job) and re.search(r"\bJobState=COMPLETED\b", job), job
    record = json.loads((run_dir / "record.json").read_text())
    assert record["launch"]["slurm_job_id"] == job_id
    assert record["resumed_from_epoch"] == 1 and record["epochs_run"] == 3
    assert nodes[1] not in record["launch"]["hosts"]
    _assert_cross_node(record, "horovod", 2, 1)

    # On CPU the resumed run reaches exactly the weights of the uninterrupted one.
    got = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    want = torch.load(reference, weights_only=True)["state_dict"]
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert os.path.exists(run_dir / "checkpoint.pt")


# --------------------------------------------------------------------------- the benchmark across nodes


@pytest.mark.slow
@pytest.mark.slurm
def test_bench_measures_allreduce_across_the_allocation(cluster3, base):
    """`snakemake --profile slurm benchmark` with bench.nodes = 2: one job on 2 nodes; its allreduce runs
    one rank per node (srun inside the allocation) and feeds the predicted N-node efficiency."""
    cfg = _config(base)
    cfg["bench"] = {
        "measure": ["train", "allreduce"],
        "models": ["conv2dnet"],
        "max_ranks": 1,
        "seconds": 0.5,
        "allreduce_mb": 2.0,
        "nodes": 2,
        "predict_nodes": [2, 16],
    }
    config = _write(base, cfg, "bench")
    out = _results(base) / "bench" / "bench.json"
    proc = _snakemake(cluster3, base, config, [str(out)])
    assert proc.returncode == 0, proc.stdout[-6000:]
    (line,) = sbatch_lines(proc.stdout, "bench")
    assert_sbatch_line(line, "--nodes=2", "--ntasks=2")
    result = json.loads(out.read_text())
    assert not result["skipped"], result["skipped"]
    m, internode = result["metrics"], result["details"]["allreduce"]["internode"]
    assert internode["ranks"] == 2 and internode["nodes"] == 2 and len(set(internode["hosts"])) == 2
    assert result["details"]["allreduce"]["nodes"] == 1  # the node-local pair for comparison
    for key in ("busbw_gb_per_s", "algbw_gb_per_s", "latency_ms", "fit.alpha_us", "fit.busbw_gb_per_s"):
        assert m[f"allreduce.internode.{key}"] > 0 and m[f"allreduce.{key}"] > 0
    assert len(internode["sweep"]) >= 3
    assert result["details"]["predict"]["link"] == "internode"
    e2, e16 = m["predict.conv2dnet.efficiency.n2"], m["predict.conv2dnet.efficiency.n16"]
    assert 0 < e16 < e2 <= 1
    assert result["units"]["predict.conv2dnet.efficiency.n2"] == "fraction"

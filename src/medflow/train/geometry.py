"""The shape of a training job from ``launch``: ranks per node and the SLURM resources of the `train` rule.

One rank per GPU on GPU nodes, the same number of ranks on every node. SLURM has traps here, measured
on SLURM 22.05 (`slurm/cluster.sh`, 2 nodes): ``--nodes=2 --ntasks=4`` placed 3 + 1 ranks, so CPU jobs
of several nodes ask ``--ntasks-per-node``; that flag is mutually exclusive with ``--ntasks-per-gpu``
(sbatch: fatal), so GPU jobs ask ``--ntasks=<ranks> --ntasks-per-gpu=1`` with ``--gres=gpu:<per node>``
(2 + 2); and ``--gpus=N`` is a job total, so GPUs are asked per node. Pure Python, no torch: the
Snakefile imports it.
"""

from __future__ import annotations

from typing import Any


def problem(launch: dict[str, Any]) -> str | None:
    """What is wrong with this ``launch`` section's geometry, or None."""
    ranks, nodes, gpus = int(launch["ranks"]), int(launch["nodes"]), int(launch["gpus_per_node"])
    if nodes > ranks:
        return f"launch.nodes = {nodes} exceeds launch.ranks = {ranks} (each node needs a rank)"
    if ranks % nodes:
        return f"launch.ranks = {ranks} is not a multiple of launch.nodes = {nodes} (same ranks on every node)"
    if gpus and ranks != nodes * gpus:
        return f"launch.ranks = {ranks} must be launch.nodes × launch.gpus_per_node = {nodes * gpus} (one rank per GPU)"
    return None


def ranks_per_node(launch: dict[str, Any]) -> int:
    return int(launch["ranks"]) // int(launch["nodes"])


def slurm_resources(launch: dict[str, Any]) -> dict[str, Any]:
    """Resources of the `train` rule that shape its SLURM job (snakemake-executor-plugin-slurm names)."""
    why = problem(launch)
    if why:
        raise ValueError(f"config: {why}")
    ranks, nodes, gpus = int(launch["ranks"]), int(launch["nodes"]), int(launch["gpus_per_node"])
    res: dict[str, Any] = {"nodes": nodes, "cpus_per_task": int(launch["threads_per_rank"])}
    if gpus:
        res.update(tasks=ranks, tasks_per_gpu=1, gres=f"gpu:{gpus}")
    elif nodes > 1 and ranks_per_node(launch) > 1:
        res["tasks_per_node"] = ranks_per_node(launch)  # the plugin rejects tasks + tasks_per_node together
    else:
        res["tasks"] = ranks
    return res

"""Who ran what, where: site identity, software versions, git commit, launcher environment."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import __version__

_REPO = Path(__file__).resolve().parents[2]


def short_host() -> str:
    return socket.gethostname().split(".")[0]


@functools.lru_cache(maxsize=1)
def slurm_cluster_name() -> str:
    """The SLURM ClusterName: from the job environment, else `scontrol show config`, else ''."""
    if os.environ.get("SLURM_CLUSTER_NAME"):
        return os.environ["SLURM_CLUSTER_NAME"]
    if not shutil.which("scontrol"):
        return ""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip()
    return ""


def site_name(cfg: dict | None = None) -> str:
    """config site.name, else MEDFLOW_SITE, else the SLURM cluster name, else the short host name."""
    name = ((cfg or {}).get("site") or {}).get("name") or os.environ.get("MEDFLOW_SITE", "")
    return name or slurm_cluster_name() or short_host()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def allocated_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def gpus() -> list[str]:
    """GPU model names visible to this process (torch only if already imported: keep CLI start fast)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            ).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return []


def site_info(cfg: dict | None = None) -> dict[str, Any]:
    devices = gpus()
    return {
        "name": site_name(cfg),
        "cluster": slurm_cluster_name(),
        "host": short_host(),
        "cpu": cpu_model(),
        "cpu_count": allocated_cpus(),
        "gpus": devices,
        "gpu_count": len(devices),
    }


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def mpi_version() -> str | None:
    for exe in ("mpirun", "mpiexec"):
        if shutil.which(exe):
            try:
                out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
                return out.splitlines()[0].strip() if out else None
            except (OSError, subprocess.SubprocessError, IndexError):
                return None
    return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Commit of the medflow source tree (+ '-dirty'); MEDFLOW_GIT_COMMIT in images without .git."""
    if os.environ.get("MEDFLOW_GIT_COMMIT"):
        return os.environ["MEDFLOW_GIT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def software() -> dict[str, Any]:
    return {
        "medflow": __version__,
        "python": platform.python_version(),
        "numpy": _dist_version("numpy"),
        "h5py": _dist_version("h5py"),
        "openslide": _dist_version("openslide-python"),
        "openslide_bin": _dist_version("openslide-bin"),
        "torch": _dist_version("torch"),
        "torchvision": _dist_version("torchvision"),
        "horovod": _dist_version("horovod"),
        "snakemake": _dist_version("snakemake"),
        "mpi": mpi_version(),
        "git": git_commit(),
    }


def mpiexec_flags() -> list[str]:
    """Flags for a local Open MPI launch: oversubscribe (ranks may outnumber cores on a laptop), no core
    binding (each rank sets its own thread count), and root allowed (containers, CI). Other MPIs: none."""
    if "open mpi" not in (mpi_version() or "").lower():
        return []
    flags = ["--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return flags


def launch_info(backend: str = "none", ranks: int = 1, devices: list[str] | None = None) -> dict[str, Any]:
    env = os.environ
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID") is not None:
        launcher = "srun"
    elif env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE") or env.get("PMIX_RANK"):
        launcher = "mpiexec"
    else:
        launcher = "none"
    return {
        "backend": backend,
        "ranks": ranks,
        "launcher": launcher,
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_nodes": env.get("SLURM_JOB_NODELIST"),
        "devices": devices or [],
    }

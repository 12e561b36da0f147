"""`snakemake --profile slurm` against a real, throw-away one-node SLURM cluster (slurm/cluster.sh).

Fast checks (profile keys, the plugin's GPU task geometry, the container definitions) run anywhere.
The cluster tests need root, slurm-wlm and munge; they skip cleanly otherwise. Every snakemake call
runs under `timeout`: without working status queries the SLURM plugin waits forever.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT, VENV_BIN, fault_env, move_demo

CLUSTER_SH = ROOT / "slurm" / "cluster.sh"
PROFILE = ROOT / "slurm"
SNAKEFILE = ROOT / "Snakefile"
# Poll SLURM every second at first (the profile's 20 s suits real clusters, not tests).
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5"]


def _cluster_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run slurmctld/slurmd/munged"
    for exe in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/sbatch"):
        if not os.access(exe, os.X_OK):
            return f"{exe} missing (apt-get install slurm-wlm munge)"
    return None


# --------------------------------------------------------------------------- helpers


class Cluster(SimpleNamespace):
    """A running throw-away cluster: its directory and an environment whose PATH reaches it."""

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("MEDFLOW_SITE", "MEDFLOW_TEST_FAIL_ONCE")
        }
        env["PATH"] = f"{self.dir}/bin{os.pathsep}{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["SLURM_CONF"] = f"{self.dir}/etc/slurm.conf"
        env.update(extra)
        return env

    def slurm(self, *args: str) -> str:
        """Run a SLURM client command against this cluster; return stdout."""
        out = subprocess.run(
            [f"{self.dir}/bin/{args[0]}", *args[1:]], capture_output=True, text=True, env=self.env(), timeout=30
        )
        assert out.returncode == 0, f"{args}: {out.stderr}"
        return out.stdout

    def known_job_ids(self) -> set[str]:
        """Job ids slurmctld still lists (MinJobAge=300) plus those jobcomp/filetxt logged (`sacct -c`)."""
        ids = set(self.slurm("squeue", "--states=all", "-h", "-o", "%A").split())
        ids |= set(self.slurm("sacct", "-c", "-X", "-n", "-P", "-o", "JobIdRaw").split())
        return ids


def run_snakemake(
    cluster: Cluster,
    workdir: Path,
    args: list[str],
    timeout_s: int,
    **env: str,
) -> subprocess.CompletedProcess:
    """snakemake --profile slurm ... under a hard timeout; returns the finished process (log in .stdout)."""
    cmd = [
        "timeout",
        "-k",
        "15",
        str(timeout_s),
        str(VENV_BIN / "snakemake"),
        "--profile",
        str(PROFILE),
        *FAST_POLL,
        "--verbose",
        "--directory",
        str(workdir),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=cluster.env(**env), capture_output=True, text=True)
    proc.stdout = proc.stdout + proc.stderr
    (workdir / f"snakemake-{int(time.time() * 1000)}.log").write_text(proc.stdout)
    assert proc.returncode not in (124, 137, -9), f"snakemake timed out after {timeout_s} s:\n{proc.stdout[-4000:]}"
    return proc


def sbatch_lines(log: str, rule: str) -> list[str]:
    """The plugin's logged sbatch calls for one rule (without the --wrap payload)."""
    lines = [
        line.split(" --wrap=")[0]
        for line in log.splitlines()
        if "sbatch call:" in line and f"--comment rule_{rule}" in line
    ]
    return [line[line.index("sbatch ") :] for line in lines]


def assert_sbatch_line(line: str, *flags: str) -> None:
    words = line.split()
    for flag in flags:
        assert flag in words, f"{flag!r} missing from: {line}"


# --------------------------------------------------------------------------- fast checks


def test_profile_sets_srun_one_rank_per_gpu_and_status_without_accounting():
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"  # works without slurmdbd
    ranked = profile["set-resources"]
    # The launcher is the rules' own (launch.srun under this executor); the profile pins one rank per GPU.
    assert all(
        "mpi" not in ranked[rule] and ranked[rule]["tasks_per_gpu"] == 1 for rule in ("train", "refit", "predict_wsi")
    )
    assert "extract_wsi" in profile["slurm-array-jobs"] and "extract_hsi" in profile["slurm-array-jobs"]
    # Nothing site-specific is hard-coded: partition/account/QoS/constraint come from the environment.
    for key in ("slurm_partition", "slurm_account", "qos", "constraint"):
        assert "environ" in profile["default-resources"][key]


def test_profile_resource_expressions_read_the_environment(monkeypatch):
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    defaults, train = profile["default-resources"], profile["set-resources"]["train"]
    for var in ("MEDFLOW_SLURM_PARTITION", "SBATCH_PARTITION", "MEDFLOW_SLURM_GPU_PARTITION", "MEDFLOW_SLURM_QOS"):
        monkeypatch.delenv(var, raising=False)
    assert eval(defaults["slurm_partition"]) is None and eval(defaults["qos"]) is None
    monkeypatch.setenv("SBATCH_PARTITION", "batch")
    assert eval(defaults["slurm_partition"]) == "batch"
    monkeypatch.setenv("MEDFLOW_SLURM_PARTITION", "cpu")
    monkeypatch.setenv("MEDFLOW_SLURM_GPU_PARTITION", "gpu")
    assert eval(defaults["slurm_partition"]) == "cpu" and eval(train["slurm_partition"]) == "gpu"


def _submit_line(resources: dict) -> str:
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command

    class Res(dict):
        __getattr__ = dict.__getitem__

    job = SimpleNamespace(resources=Res(resources), threads=resources.get("cpus_per_task", 1))
    params = {
        "run_uuid": "medflow_x",
        "slurm_logfile": "x.log",
        "comment_str": "rule_train",
        "account": "",
        "partition": "",
        "workdir": "/w",
    }
    return get_submit_command(job, params)


def test_gpu_trap_tasks_per_gpu_pins_one_rank_per_gpu():
    """The plugin writes --ntasks-per-gpu=<tasks> unless tasks_per_gpu is set: 2 ranks per GPU."""
    rule = {"tasks": 2, "nodes": 1, "cpus_per_task": 1, "mem_mb_per_cpu": 3000, "gpu": 2, "mpi": "srun"}
    assert "--ntasks-per-gpu=2" in _submit_line(rule).split()  # the trap, still present in plugin 2.8
    line = _submit_line({**rule, "tasks_per_gpu": 1})  # what slurm/config.yaml adds for `train`
    assert_sbatch_line(line, "--ntasks-per-gpu=1", "--ntasks=2", "--cpus-per-task=1", "--nodes=1")


def test_container_definitions_install_through_the_install_script():
    docker = (ROOT / "containers" / "Dockerfile").read_text()
    apptainer = (ROOT / "containers" / "medflow.def").read_text()
    for text in (docker, apptainer):
        assert re.search(r"containers/install\.sh", text), "images must install exactly as the README does"
        assert "MEDFLOW_GIT_COMMIT" in text
    assert re.search(r"^RUN .*containers/install\.sh", docker, re.M)
    assert re.search(r"^%post", apptainer, re.M)


@pytest.mark.skipif(not SNAKEFILE.exists(), reason="Snakefile not written yet")
def test_container_image_follows_config(tmp_path):
    """`container:` comes from config; a dry run with apptainer deployment plans to pull that image."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    move_demo(cfg, tmp_path / "demo")
    cfg["site"]["name"] = "ctest"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    # No container engine runs here; Snakemake only asks the binary for its version in a dry run.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "apptainer").write_text("#!/bin/sh\necho 'apptainer version 1.3.4'\n")
    (shim / "apptainer").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}

    def dry_run(*extra: str) -> str:
        out = subprocess.run(
            [
                str(VENV_BIN / "snakemake"),
                "-s",
                str(SNAKEFILE),
                "--configfile",
                str(tmp_path / "config.yaml"),
                "--software-deployment-method",
                "apptainer",
                "-n",
                "--cores",
                "1",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        return out.stdout + out.stderr

    image = "docker://registry.example.org/medflow:9.9"
    assert f"Singularity image {image} will be pulled" in dry_run("--config", f"container={image}")
    assert "will be pulled" not in dry_run()  # container: "" (the default) runs jobs on the host


def test_sigterm_from_scancel_leaves_no_temporary_file(tmp_path):
    """scancel sends SIGTERM before SIGKILL; a medflow command then exits through its cleanup code."""
    import signal

    script = (
        "import sys, time\n"
        "from medflow import cli\nfrom medflow.core import fsio\n"
        "cli._exit_on_sigterm()\n"
        f"with fsio.atomic_path({str(tmp_path / 'out.bin')!r}) as tmp:\n"
        "    tmp.write_bytes(b'partial'); print('writing', flush=True); time.sleep(60)\n"
    )
    with subprocess.Popen([str(VENV_BIN / "python"), "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither out.bin nor .out.bin.tmp-*


# --------------------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _cluster_skip_reason()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("slurm")
    # 16 CPUs / 64 GB declared on a 2-core machine: all 8 two-rank training jobs of the demo run at once
    # instead of in waves, each wave costing a status-poll interval (jobs mostly wait on Python
    # start-up). Two fake GPUs let SLURM schedule the --gpus/--ntasks-per-gpu lines for real.
    up = subprocess.run(
        [
            "bash",
            str(CLUSTER_SH),
            "up",
            str(directory),
            "--cpus",
            "16",
            "--mem-mb",
            "64000",
            "--gpus",
            "2",
            "--name",
            "medflowci",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if up.returncode != 0:
        logs = "\n".join(p.read_text()[-2000:] for p in (directory / "log").glob("*.log"))
        pytest.fail(f"cluster.sh up failed:\n{up.stdout}{up.stderr}\n{logs}")
    yield Cluster(dir=directory, name="medflowci")
    subprocess.run(["bash", str(CLUSTER_SH), "down", str(directory)], capture_output=True, timeout=120)


TOY_SNAKEFILE = r"""
rule all:
    input: "train.json", "flaky.txt"

rule extract:
    output: "shard_{i}.txt"
    resources: cpus_per_task=1, mem_mb=300, runtime=5
    shell: "echo ${{SLURM_JOB_ID}} ${{MEDFLOW_TOY_ENV:-unset}} > {output}"

rule train:
    input: expand("shard_{i}.txt", i=range(3))
    output: "train.json"
    # medflow's ranked rules launch with launch.srun under the SLURM executor; the profile adds one rank per GPU
    resources: tasks=2, nodes=1, cpus_per_task=1, mem_mb_per_cpu=300, runtime=5, gpu=2, mpi="srun --mpi=pmix"
    shell:
        "{resources.mpi} -n {resources.tasks} python -c 'import json, os; print(json.dumps({{k: os.environ.get(k) "
        "for k in (\"SLURM_JOB_ID\", \"SLURM_STEP_ID\", \"SLURM_PROCID\", \"SLURM_NTASKS\")}}))' > {output}"

rule flaky:
    output: "flaky.txt"
    resources: cpus_per_task=1, mem_mb=300, runtime=5
    shell: "test -e flaky.marker || {{ touch flaky.marker; exit 1; }}; echo ok > {output}"
"""


@pytest.mark.slow
@pytest.mark.slurm
def test_toy_workflow_through_slurm(cluster, tmp_path):
    """Array extraction jobs, a 2-rank srun job on (fake) GPUs, and a retried failure, on real SLURM."""
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE)
    proc = run_snakemake(
        cluster,
        tmp_path,
        ["-s", str(tmp_path / "Snakefile"), "--slurm-array-jobs", "extract"],
        240,
        MEDFLOW_TOY_ENV="exported",
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    log = proc.stdout

    # Extraction: one array job for the fan-out, one CPU each, memory and time limits set.
    (extract_line,) = sbatch_lines(log, "extract")
    assert_sbatch_line(extract_line, "--array=1-3", "--ntasks=1", "--cpus-per-task=1", "-t", "--export=ALL")
    assert re.search(r"--mem \d+", extract_line)
    # Training: 2 tasks, one rank per GPU (not the plugin's default of `tasks` ranks per GPU).
    (train_line,) = sbatch_lines(log, "train")
    assert_sbatch_line(
        train_line, "--ntasks=2", "--ntasks-per-gpu=1", "--gpus=2", "--nodes=1", "--cpus-per-task=1", "--mem-per-cpu"
    )
    assert "--ntasks-per-gpu=2" not in train_line

    ids = cluster.known_job_ids()
    for i in range(3):
        job_id, env_value = (tmp_path / f"shard_{i}.txt").read_text().split()
        assert job_id in ids  # ran as a SLURM job
        assert env_value == "exported"  # the submit environment reaches jobs (MEDFLOW_TEST_FAIL_ONCE relies on it)
    ranks = [json.loads(line) for line in (tmp_path / "train.json").read_text().splitlines()]
    assert sorted(r["SLURM_PROCID"] for r in ranks) == ["0", "1"]  # two ranks, started by srun
    assert {r["SLURM_JOB_ID"] for r in ranks} <= ids and len({r["SLURM_JOB_ID"] for r in ranks}) == 1
    assert all(r["SLURM_STEP_ID"] is not None and r["SLURM_NTASKS"] == "2" for r in ranks)

    # The flaky job failed once (marker written by attempt 1) and its retry completed the DAG.
    assert (tmp_path / "flaky.marker").exists() and (tmp_path / "flaky.txt").read_text().strip() == "ok"
    assert len(sbatch_lines(log, "flaky")) == 2


# --------------------------------------------------------------------------- the demo DAG on SLURM


def reduced_demo_config(tmp: Path, site: str = "") -> dict:
    """The demo config, smaller: 4 patients per cohort, 2 outer x 2 inner folds, 1 epoch."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["results"] = str(tmp / "results")
    cfg["site"]["name"] = site  # "" → the SLURM cluster name
    cfg["synth"] = {
        "out": cfg["synth"]["out"],
        "wsi": {"patients": 4, "max_slides_per_patient": 1, "width": 1024, "height": 768, "mpp": 0.5},
        "hsi": {"patients": 4, "mosaic_height": 100, "mosaic_width": 150},
    }
    move_demo(cfg, tmp / "data" / "demo")
    cfg["wsi"].update({"patch_size": 64, "sampling": {"mode": "random", "per_class": 8}})
    cfg["hsi"].update({"per_class": 40})
    cfg["folds"] = {"strategy": "kfold", "outer": 2, "inner": 2, "balance": "stratified"}
    cfg["studies"]["wsi_demo"]["model"] = {"name": "resnet18", "input_size": 32}
    cfg["studies"]["wsi_demo"]["train"] = {"epochs": 1, "batch_size": 8}
    cfg["studies"]["hsi_demo"]["train"] = {"epochs": 1, "batch_size": 16}
    cfg["launch"] = {"backend": "horovod", "ranks": 2, "threads_per_rank": 1}
    return cfg


def _arrays(shard: Path) -> dict:
    import h5py

    with h5py.File(shard, "r") as h5:
        return {name: h5[name][()] for name in ("patches", "labels", "coords")}


def _cancel_running_train_job(cluster: Cluster, proc: subprocess.Popen, log: Path) -> str:
    """Wait until a train job has started medflow (its log exists), then scancel it mid-start-up."""
    deadline, seen = time.time() + 150, None
    while time.time() < deadline and proc.poll() is None:
        rows = [line.split(maxsplit=1) for line in cluster.slurm("squeue", "-h", "-t", "R", "-o", "%A %k").splitlines()]
        train = [row[0] for row in rows if len(row) == 2 and row[1].startswith("rule_train")]
        if train and log.exists():
            seen = seen or time.time()
            if time.time() - seen > 2:
                cluster.slurm("scancel", train[0])
                return train[0]
        time.sleep(0.5)
    raise AssertionError("no running train job to cancel")


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.skipif(not SNAKEFILE.exists(), reason="Snakefile not written yet")
def test_demo_dag_through_slurm(cluster, tmp_path):
    """`snakemake --profile slurm` runs the whole demo DAG as SLURM jobs; results match a local run."""
    import numpy as np

    cfg = reduced_demo_config(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    marker = tmp_path / "plan-folds.failed-once"
    proc = run_snakemake(
        cluster,
        tmp_path,
        ["-s", str(SNAKEFILE), "--configfile", str(tmp_path / "config.yaml")],
        600,
        **fault_env(MEDFLOW_TEST_FAIL_ONCE=f"plan-folds:{marker}"),
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    log = proc.stdout
    res = Path(cfg["results"]) / cluster.name  # site = the SLURM cluster name
    assert res.is_dir(), sorted(p.name for p in Path(cfg["results"]).iterdir())

    # A job made to fail once (plan-folds) was resubmitted by the profile's retries and the DAG completed.
    assert marker.exists()
    assert len(sbatch_lines(log, "prepare")) + len(sbatch_lines(log, "plan_folds")) >= 3  # 2 cohorts + 1 retry

    # The generated sbatch lines: an extraction array job and a 2-rank training job.
    for rule in ("extract_wsi", "extract_hsi"):
        (line,) = sbatch_lines(log, rule)
        assert_sbatch_line(line, "--array=1-4", "--ntasks=1", "--cpus-per-task=1", "-t", "--mem")
    train_lines = sbatch_lines(log, "train")
    assert len(train_lines) == 8  # 2 studies x 2 outer x 2 inner
    refit_lines = sbatch_lines(log, "refit")
    assert len(refit_lines) == 4  # 2 studies x 2 outer
    for line in train_lines + refit_lines:
        assert_sbatch_line(line, "--ntasks=2", "--nodes=1", "--cpus-per-task=1", "--mem-per-cpu")

    # Every job ran under SLURM: the job ids in the records are ones slurmctld knows.
    known = cluster.known_job_ids()
    records = [json.loads(p.read_text()) for p in res.rglob("record.json")]
    shard_records = [json.loads(p.read_text()) for p in res.glob("shards/*/*.record.json")]
    assert len(shard_records) == 8 and len(records) >= 8 + 4 + 2
    for record in records + shard_records:
        assert record["launch"]["slurm_job_id"] in known, record["job"]
        assert record["site"]["name"] == cluster.name
    train_records = [r for r in records if r["job"] == "train"]
    assert sum("refit" not in r for r in train_records) == 8 and sum("refit" in r for r in train_records) == 4
    for record in train_records:
        assert record["status"] == "ok"
        launch = record["launch"]
        assert (launch["launcher"], launch["ranks"], launch["backend"]) == ("srun", 2, cfg["launch"]["backend"])
    assert len({r["launch"]["slurm_job_id"] for r in train_records}) == 12  # one SLURM job per fold and refit

    # The report names the SLURM site.
    report = (res / "report" / "report.md").read_text()
    assert cluster.name in report
    assert cluster.name in json.dumps(json.loads((res / "report" / "report.json").read_text()))

    # Outputs match a local run of the same config (same synthetic data): shard contents and fold plans.
    local_cfg = {**cfg, "site": {**cfg["site"], "name": "local"}}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local_cfg, sort_keys=False))
    local_res = Path(cfg["results"]) / "local"
    targets = [f"{local_res}/folds/{study}.json" for study in cfg["studies"]]
    local = subprocess.run(
        [
            "timeout",
            "-k",
            "10",
            "300",
            str(VENV_BIN / "snakemake"),
            "-s",
            str(SNAKEFILE),
            "--configfile",
            str(tmp_path / "local.yaml"),
            "--cores",
            "2",
            "--directory",
            str(tmp_path),
            *targets,
        ],
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
    )
    assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
    for shard in sorted(res.glob("shards/*/*.h5")):
        other = local_res / shard.relative_to(res)
        slurm_arrays, local_arrays = _arrays(shard), _arrays(other)
        for name in slurm_arrays:
            np.testing.assert_array_equal(slurm_arrays[name], local_arrays[name], err_msg=f"{shard.name}:{name}")
    for study in cfg["studies"]:
        slurm_plan = json.loads((res / "folds" / f"{study}.json").read_text())
        local_plan = json.loads((local_res / "folds" / f"{study}.json").read_text())
        assert slurm_plan["outer"] == local_plan["outer"]

    # A cancelled training job leaves none of its outputs behind, and a rerun completes it.
    run_dir = res / "runs" / "hsi_demo" / "outer0" / "inner0"
    target = str(run_dir / "record.json")
    train_log = res / "logs" / "train" / "hsi_demo" / "outer0_inner0.log"
    train_log.unlink()
    # A fresh job is cancelled (the finished run's checkpoint would make the rerun a pure resume).
    (run_dir / "checkpoint.pt").unlink()
    cmd = [
        "timeout",
        "-k",
        "15",
        "300",
        str(VENV_BIN / "snakemake"),
        "--profile",
        str(PROFILE),
        *FAST_POLL,
        "--retries",
        "0",
        "-s",
        str(SNAKEFILE),
        "--configfile",
        str(tmp_path / "config.yaml"),
        "--directory",
        str(tmp_path),
        "--forcerun",
        "train",
        "--",
        target,
    ]
    with subprocess.Popen(
        cmd, cwd=tmp_path, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as cancelled_run:
        cancelled_id = _cancel_running_train_job(cluster, cancelled_run, train_log)
        out, _ = cancelled_run.communicate(timeout=300)
    assert cancelled_run.returncode not in (0, 124), out[-3000:]
    assert "CANCELLED" in out
    assert cluster.slurm("sacct", "-c", "-j", cancelled_id, "-n", "-P", "-o", "State").split() == ["CANCELLED"]
    for name in ("record.json", "model.pt", "curves.csv"):
        assert not (run_dir / name).exists(), f"{name} left behind by the cancelled job"
    assert not list(run_dir.glob(".*.tmp-*")), "temporary files left behind by the cancelled job"

    rerun = run_snakemake(
        cluster, tmp_path, ["-s", str(SNAKEFILE), "--configfile", str(tmp_path / "config.yaml"), "--", target], 300
    )
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "ok" and record["launch"]["launcher"] == "srun"
    assert record["launch"]["slurm_job_id"] not in (None, cancelled_id)

    # A training job's log under SLURM shows a progress line at the configured interval (progress.interval_s):
    # one 2-rank job (srun inside sbatch, as the DAG's train jobs), long enough for several intervals.
    _assert_progress_lines_in_slurm_log(cluster, cfg, res, tmp_path)


PROGRESS_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train hsi_demo/outer0/inner0: (\d+)/(\d+) steps \(\d+%\), "
    r"[\d.]+ steps/s, elapsed ([\d.:]+)s?, ETA [\d.:]+s? \[epoch \d+/\d+"
)


def _seconds(text: str) -> float:
    """'12.3' (seconds) or 'h:mm:ss', as medflow.core.progress.duration writes them."""
    if ":" not in text:
        return float(text)
    h, m, s = (int(part) for part in text.split(":"))
    return 3600.0 * h + 60.0 * m + s


def _assert_progress_lines_in_slurm_log(cluster: Cluster, cfg: dict, res: Path, tmp_path: Path) -> None:
    interval = 0.5
    job_cfg = copy.deepcopy(cfg)
    job_cfg["progress"] = {"mode": "auto", "interval_s": interval}  # auto: a log is no terminal → lines
    job_cfg["studies"]["hsi_demo"]["train"]["epochs"] = 120  # ~720 steps: several seconds even on an idle machine
    config = tmp_path / "progress.yaml"
    config.write_text(yaml.safe_dump(job_cfg, sort_keys=False))
    log, out_dir = tmp_path / "progress-train.log", tmp_path / "progress-run"
    train = (
        f"srun --mpi=pmix -n 2 medflow train --config {config} --study hsi_demo --index {res}/index/hsi_demo.json"
        f" --folds {res}/folds/hsi_demo.json --outer 0 --inner 0 --out-dir {out_dir}"
    )
    submit = [f"{cluster.dir}/bin/sbatch", "--wait", "-n", "2", "-c", "1", "-t", "10", "--mem-per-cpu", "2000"]
    proc = subprocess.run(
        [*submit, f"--output={log}", f"--wrap={train}"], env=cluster.env(), capture_output=True, text=True, timeout=400
    )
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + text[-3000:]
    record = json.loads((out_dir / "record.json").read_text())
    assert record["launch"]["launcher"] == "srun" and record["launch"]["slurm_job_id"] in cluster.known_job_ids()
    matches = [PROGRESS_LINE.match(line) for line in text.splitlines()]
    lines = [m for m in matches if m]
    assert len(lines) >= 3, text[-3000:]  # several intervals, rank 0 only (two ranks would double them)
    elapsed = [_seconds(m[3]) for m in lines]
    precision = 0.1 if ":" not in lines[-1][3] else 1.0  # elapsed is printed to 0.1 s, from a minute on to 1 s
    assert all(b - a >= interval - precision for a, b in zip(elapsed, elapsed[1:])), elapsed
    done = [int(m[1]) for m in lines]
    assert done == sorted(done) and all(int(m[2]) == int(lines[0][2]) for m in lines)
    assert re.search(r"train hsi_demo/outer0/inner0: done \d+/\d+ steps", text), text[-2000:]

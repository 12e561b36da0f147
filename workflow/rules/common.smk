# Shared definitions: the effective config, the site's results directory, the cohorts' images, fold ids,
# launchers. No side effects: nothing here writes a file (a dry run writes nothing; the effective config
# file is written by the Snakefile's onstart handler, only when jobs really run).
import os
import shlex
import sys
from functools import cache
from pathlib import Path

import yaml

import medflow.core.config
import medflow.core.errors
import medflow.core.fsio
import medflow.core.lock
import medflow.core.manifest
import medflow.core.provenance
import medflow.extract.batches
import medflow.extract.job
import medflow.train.splits



def stop(exc: Exception) -> None:
    """Bad config or input found while building the DAG: one line, exit 2 (as every medflow command)."""
    print(f"medflow: error: {exc}", file=sys.stderr)
    sys.exit(2)


# The one validation of this process: unknown keys and wrong types stop the run before any job, naming
# the key; defaults (inside $refs too) are filled exactly as every `medflow` command fills them. The
# config files are re-read strictly (YAML would let a duplicated key silently win).
try:
    for _file in getattr(workflow, "configfiles", []) or []:
        medflow.core.config.read_yaml(_file)
    medflow.core.config.validate(config, "config")
    medflow.core.config.check_studies(config)
except medflow.core.errors.InputError as _exc:
    stop(_exc)

SITE = medflow.core.provenance.site_name(config)
RES = f"{config['results']}/{SITE}"
CONFIG_FILE = f"{RES}/config.yaml"
CONTAINER = config["container"] or None
COHORTS = config["cohorts"]
STUDIES = config["studies"]

# Manifests that a rule of this workflow writes (the demo, workflow/rules/demo.smk): path → planned rows,
# so the DAG can be built before they exist. Every other manifest is read from disk.
PLANNED_MANIFESTS = {}


def write_effective_config() -> None:
    """What every rule passes to `medflow --config`: the validated config with its defaults. Called by
    the Snakefile's onstart handler (never in a dry run); rewritten only when its content changed."""
    text = yaml.safe_dump(config, sort_keys=False)
    if not os.path.exists(CONFIG_FILE) or open(CONFIG_FILE).read() != text:
        medflow.core.fsio.write_text(CONFIG_FILE, text)


_RESULTS_LOCK = []  # the lock this run holds (at most one)


def hold_results_lock() -> None:
    """Called by the Snakefile's onstart handler (never in a dry run): one run per results directory,
    across working directories and hosts (medflow.core.lock); a second run stops here, naming the holder."""
    try:
        _RESULTS_LOCK.append(medflow.core.lock.acquire(RES, "snakemake " + " ".join(sys.argv[1:])))
    except medflow.core.lock.LockHeld as exc:
        print(f"medflow: error: {exc}", file=sys.stderr)
        sys.exit(2)


def release_results_lock() -> None:
    while _RESULTS_LOCK:
        _RESULTS_LOCK.pop().release()


@cache
def extraction_hash(kind: str, cohort: str) -> str:
    """Hash of the config sections that shape a shard (medflow.extract.job.config_hash)."""
    return medflow.extract.job.config_hash(config, kind, cohort)


def section_hash(*sections: str) -> str:
    return medflow.core.config.section_hash(config, *sections)


def cohorts_of(kind: str) -> list[str]:
    return [name for name, spec in COHORTS.items() if spec["kind"] == kind]


@cache
def cohort_entries(cohort: str) -> tuple:
    """The cohort's manifest rows (planned ones for a manifest this workflow writes)."""
    manifest = COHORTS[cohort]["manifest"]
    planned = {os.path.normpath(path): rows for path, rows in PLANNED_MANIFESTS.items()}
    if os.path.normpath(manifest) in planned:
        return tuple(planned[os.path.normpath(manifest)])
    return tuple(medflow.core.manifest.read_manifest(manifest))


@cache
def _entries_by_id(cohort: str) -> dict:
    return {e.image_id: e for e in cohort_entries(cohort)}


def cohort_entry(cohort: str, image_id: str):
    """One manifest row (a dict lookup: a scan per job made 30,000-image DAGs quadratic)."""
    entry = _entries_by_id(cohort).get(image_id)
    if entry is None:
        raise ValueError(f"no image {image_id!r} in cohort {cohort!r}")
    return entry


def images_per_job(kind: str) -> int:
    return int(config[kind]["images_per_job"])


@cache
def cohort_batches(cohort: str) -> dict:
    """Batch name → manifest rows, for kinds with images_per_job > 1 (medflow.extract.batches)."""
    return medflow.extract.batches.split(cohort_entries(cohort), images_per_job(COHORTS[cohort]["kind"]))


def batch_entries(cohort: str, batch: str) -> tuple:
    batches = cohort_batches(cohort)
    if batch not in batches:
        raise ValueError(f"no batch {batch!r} in cohort {cohort!r} ({len(batches)} batches)")
    return batches[batch]


def extraction_records(cohort: str) -> list[str]:
    """What the index reads: one record per image, or one batch record per batch of images."""
    if images_per_job(COHORTS[cohort]["kind"]) > 1:
        return [f"{RES}/shards/{cohort}/batches/{name}.json" for name in cohort_batches(cohort)]
    return [f"{RES}/shards/{cohort}/{e.image_id}.record.json" for e in cohort_entries(cohort)]


def outer_folds(study: str) -> list[int]:
    """Outer fold ids: k for k-fold, one per patient for leave-one-patient-out."""
    if config["folds"]["strategy"] == "lopo":
        return list(range(len({e.patient_id for e in cohort_entries(STUDIES[study]["cohort"])})))
    return list(range(config["folds"]["outer"]))


def inner_folds() -> list[int]:
    return list(range(config["folds"]["inner"]))


def check_study_plans() -> None:
    """Called once every rule file is included (the demo's planned manifests known): every study's fold
    plan must be possible for its cohort's number of patients — found now, not after extraction."""
    try:
        for study, spec in STUDIES.items():
            patients = {e.patient_id for e in cohort_entries(spec["cohort"])}
            medflow.train.splits.check_patients(len(patients), config["folds"], spec["cohort"])
    except medflow.core.errors.InputError as exc:
        stop(exc)


def under_slurm_executor() -> bool:
    """Whether this Snakemake submits jobs to SLURM, or runs one of them inside its allocation: the
    jobstep's own Snakemake, and the one it starts to run the job (local executor, remote mode)."""
    plugin = workflow.executor_plugin
    if plugin is not None and plugin.name in ("slurm", "slurm-jobstep"):
        return True
    return workflow.remote_exec and "SLURM_JOB_ID" in os.environ


def mpi_launcher(wildcards=None) -> str:
    """The ``mpi`` resource of a job with several ranks: ``launch.srun`` under the SLURM executor (srun
    starts one rank per task of the allocation), else ``launch.mpiexec`` with medflow's flags. A callable,
    so it is evaluated per job once the executor is known; a job of one rank has no ``mpi`` resource at
    all (the SLURM plugin refuses MPI jobs of one task)."""
    if under_slurm_executor():
        return config["launch"]["srun"]
    return " ".join([shlex.quote(config["launch"]["mpiexec"]), *medflow.core.provenance.mpiexec_flags()])


wildcard_constraints:
    image_id=r"[A-Za-z0-9_.-]+",
    outer=r"\d+",
    inner=r"\d+",

# Shared definitions: the effective config, the site's results directory, the cohort plan, launchers.
import os
import shlex
import sys
from pathlib import Path

import medflow.cohort
import medflow.config
import medflow.fsio
import medflow.provenance

# Same defaults as every `medflow` call (schema defaults inside $refs included).
medflow.config.validate(config, "config")

# Jobs call the `medflow` of the environment that runs Snakemake.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

SITE = medflow.provenance.site_name(config)
RES = f"{config['results']}/{SITE}"
CONFIG_FILE = f"{RES}/config.yaml"
CONTAINER = config["container"] or None


def _write_effective_config() -> None:
    """Every rule passes this file to `medflow --config`; rewritten only when the content changed."""
    import yaml

    text = yaml.safe_dump(config, sort_keys=False)
    path = Path(CONFIG_FILE)
    if not path.exists() or path.read_text() != text:
        medflow.fsio.write_text(path, text)


_write_effective_config()


def section_hash(*sections: str) -> str:
    return medflow.config.section_hash(config, *sections)


COHORTS = config["cohorts"]
STUDIES = config["studies"]
for _study, _spec in STUDIES.items():
    if _spec["cohort"] not in COHORTS:
        raise ValueError(f"config: studies.{_study}.cohort {_spec['cohort']!r} is not a cohort {sorted(COHORTS)}")
USES_SYNTH = any(spec.get("manifest", "synth") == "synth" for spec in COHORTS.values())


def cohorts_of(kind: str) -> list[str]:
    return [name for name, spec in COHORTS.items() if spec["kind"] == kind]


_ENTRIES = {name: medflow.cohort.entries(config, name) for name in COHORTS}


def cohort_entry(cohort: str, image_id: str):
    for e in _ENTRIES[cohort]:
        if e.image_id == image_id:
            return e
    raise ValueError(f"no image {image_id!r} in cohort {cohort!r}")


def extraction_records(cohort: str) -> list[str]:
    return [f"{RES}/shards/{cohort}/{e.image_id}.record.json" for e in _ENTRIES[cohort]]


def outer_folds(study: str) -> list[int]:
    """Outer fold ids: k for k-fold, one per patient for leave-one-patient-out."""
    if config["folds"]["strategy"] == "lopo":
        return list(range(len({e.patient_id for e in _ENTRIES[STUDIES[study]["cohort"]]})))
    return list(range(config["folds"]["outer"]))


def inner_folds() -> list[int]:
    return list(range(config["folds"]["inner"]))


def mpi_launcher() -> str:
    """Local launcher; the SLURM profile overrides resources.mpi with srun."""
    return " ".join([shlex.quote(config["launch"]["mpiexec"]), *medflow.provenance.mpiexec_flags()])


wildcard_constraints:
    image_id=r"[A-Za-z0-9_.-]+",
    outer=r"\d+",
    inner=r"\d+",

# Stain normalisation reference per WSI cohort (wsi.stain.method ≠ none): `medflow fit-stain` writes
# results/<site>/stain/<cohort>.json; extraction reads it when wsi.stain.apply is extraction, training always
# (it checks the shards and records the normaliser in the model file).
import medflow.extract.wsi.stain_reference

_STAIN = config["wsi"]["stain"]
STAIN_ON = _STAIN["method"] != "none"


def stain_reference_files(cohort: str, stage: str) -> list[str]:
    """[the cohort's stain reference] for a job of ``stage`` (extraction | train) that reads it, else []."""
    if not STAIN_ON or COHORTS[cohort]["kind"] != "wsi":
        return []
    if stage == "extraction" and _STAIN["apply"] != "extraction":
        return []
    return [f"{RES}/stain/{cohort}.json"]


def stain_flag(cohort: str, stage: str) -> str:
    """`--stain <reference>` for the command of such a job, else ""."""
    return " ".join(f"--stain {path}" for path in stain_reference_files(cohort, stage))


def stain_stage_on(stage: str) -> bool:
    """Whether jobs of ``stage`` (extraction | train) read a stain reference in this config."""
    return STAIN_ON and (stage == "train" or _STAIN["apply"] == "extraction")


def stain_params(stage: str, cohort_of) -> dict:
    """The rule's ``stain`` param (`--stain <reference>`) when ``stage`` reads one, else none at all: with
    stain normalisation off, a rule's params and shell stay as they were, so nothing reruns."""
    return {"stain": lambda wc: stain_flag(cohort_of(wc), stage)} if stain_stage_on(stage) else {}


def stain_shell(stage: str) -> str:
    return " {params.stain}" if stain_stage_on(stage) else ""


def stain_fit_inputs(wc) -> list[str]:
    """What a reference is fitted on: the region's slide, or every slide (and mask) of the cohort."""
    if _STAIN["reference"]["source"] == "region":  # not set: fit-stain names the missing key
        return [path for path in [_STAIN["reference"]["region"]["slide"]] if path]
    return [path for entry in cohort_entries(wc.cohort) for path in (entry.image, entry.mask) if path]


if STAIN_ON and cohorts_of("wsi"):

    rule fit_stain:
        input:
            stain_fit_inputs,
        output:
            f"{RES}/stain/{{cohort}}.json",
        wildcard_constraints:
            cohort="|".join(cohorts_of("wsi")),
        params:
            config_hash=lambda wc: section_hash(*medflow.extract.wsi.stain_reference.config_sections(wc.cohort)),
        log:
            f"{RES}/logs/fit_stain/{{cohort}}.log",
        container: CONTAINER
        threads: 1
        resources:
            cpus_per_task=1,
            mem_mb=4000,
            runtime=120,
        shell:
            "medflow fit-stain --config {CONFIG_FILE} --cohort {wildcards.cohort} --out {output} > {log} 2>&1"

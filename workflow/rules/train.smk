# One data-parallel training job per (study, outer, inner) fold: N ranks under mpiexec (local) or srun (SLURM),
# on launch.nodes nodes with the same number of ranks on each (medflow.train.geometry: the SLURM shape).
# Outputs are update(): Snakemake neither deletes them before a rerun nor keeps a failed job's (it restores
# the previous ones), and the job replaces them atomically only when it succeeds — a failing rerun never
# destroys good results (the same for every job that writes a record). checkpoint.pt is not an output: a
# requeued or rerun job resumes from it when its identity (config, fold, patients, shard digests) matches.
# Nor are the TensorBoard event files (tracking.tensorboard): a resumed job trims and continues them
# (medflow.train.tensorboard_log).
# One rank runs without a launcher (the SLURM plugin rejects MPI jobs of one task). srun no longer passes the
# job's --cpus-per-task on to its steps, hence SRUN_CPUS_PER_TASK (mpiexec ignores it).
import medflow.train.geometry

_LAUNCH = config["launch"]
_SHAPE = medflow.train.geometry.slurm_resources(_LAUNCH)
if _LAUNCH["ranks"] > 1:
    _MPI = {"mpi": mpi_launcher}
    _LAUNCHER = f"SRUN_CPUS_PER_TASK={{resources.cpus_per_task}} {{resources.mpi}} -n {_LAUNCH['ranks']} "
else:
    _MPI, _LAUNCHER = {}, ""


rule train:
    input:
        index=study_index,
        folds=f"{RES}/folds/{{study}}.json",
        stain=lambda wc: stain_reference_files(STUDIES[wc.study]["cohort"], "train"),
    output:
        record=update(f"{RES}/runs/{{study}}/outer{{outer}}/inner{{inner}}/record.json"),
        model=update(f"{RES}/runs/{{study}}/outer{{outer}}/inner{{inner}}/model.pt"),
        curves=report(
            update(f"{RES}/runs/{{study}}/outer{{outer}}/inner{{inner}}/curves.csv"),
            caption="../report/curves.rst",
            category="Learning curves",
            subcategory="{study}",
            labels={"study": "{study}", "outer": "{outer}", "inner": "{inner}"},
        ),
    wildcard_constraints:
        study="|".join(STUDIES),
    params:
        out_dir=lambda wc: f"{RES}/runs/{wc.study}/outer{wc.outer}/inner{wc.inner}",
        config_hash=lambda wc: section_hash(f"studies.{wc.study}", "launch", "folds"),
        **stain_params("train", lambda wc: STUDIES[wc.study]["cohort"]),
    log:
        f"{RES}/logs/train/{{study}}/outer{{outer}}_inner{{inner}}.log",
    container: CONTAINER
    threads: _LAUNCH["ranks"] * _LAUNCH["threads_per_rank"]
    resources:
        mem_mb_per_cpu=3000,
        runtime=240,
        **_SHAPE,
        **_MPI,
    shell:
        _LAUNCHER + "medflow train --config {CONFIG_FILE} --study {wildcards.study}"
        " --index {input.index} --folds {input.folds} --outer {wildcards.outer} --inner {wildcards.inner}"
        " --out-dir {params.out_dir}" + stain_shell("train") + " > {log} 2>&1"

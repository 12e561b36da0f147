# The synthetic demo cohort, at the head of the DAG (only when a cohort uses `manifest: synth`).
import medflow.synth

if USES_SYNTH:

    rule synth:
        output:
            medflow.synth.planned_files(config),
        params:
            config_hash=section_hash("synth", "seed"),
        log:
            f"{RES}/logs/synth.log",
        container: CONTAINER
        resources:
            cpus_per_task=1,
            mem_mb=4000,
            runtime=30,
        shell:
            "medflow synth --config {CONFIG_FILE} > {log} 2>&1"

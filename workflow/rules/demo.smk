# The synthetic demo cohort at the head of the DAG, when the config has a `synth` section (config.yaml's
# demo). It plans the demo's manifests so the DAG is known before `medflow synth` has written anything.
# This file and `medflow synth` are the only places that use medflow.demo.
if "synth" in config:
    import medflow.demo.cohort

    PLANNED_MANIFESTS.update(medflow.demo.cohort.planned_manifests(config))

    rule synth:
        output:
            medflow.demo.cohort.planned_files(config),
        params:
            config_hash=section_hash("synth", "seed"),
        log:
            f"{RES}/logs/synth.log",
        container: CONTAINER
        threads: 2
        resources:
            cpus_per_task=2,
            mem_mb=4000,
            runtime=30,
        shell:
            "medflow synth --config {CONFIG_FILE} --workers {threads} > {log} 2>&1"

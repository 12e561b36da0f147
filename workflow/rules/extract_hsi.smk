# One job per HSI image: patches into one HDF5 shard + an extraction record (docs/architecture.md).
# Skip-if-up-to-date, --force and on_error: medflow.extract.job. With hsi.on_error=skip a bad image
# yields a "failed" record and no shard, so only the record is declared.
_HSI_COHORTS = cohorts_of("hsi")

if _HSI_COHORTS:

    rule extract_hsi:
        input:
            lambda wc: cohort_entry(wc.cohort, wc.image_id).files(),
        output:
            record=update(f"{RES}/shards/{{cohort}}/{{image_id}}.record.json"),
        wildcard_constraints:
            cohort="|".join(_HSI_COHORTS),
        params:
            shard=lambda wc: f"{RES}/shards/{wc.cohort}/{wc.image_id}.h5",
            config_hash=lambda wc: extraction_hash("hsi", wc.cohort),
        log:
            f"{RES}/logs/extract_hsi/{{cohort}}/{{image_id}}.log",
        container: CONTAINER
        threads: 1
        resources:
            cpus_per_task=1,
            mem_mb=3000,
            runtime=30,
        shell:
            "medflow extract-hsi --config {CONFIG_FILE} --cohort {wildcards.cohort} --image-id {wildcards.image_id}"
            " --out {params.shard} --record {output.record} > {log} 2>&1"

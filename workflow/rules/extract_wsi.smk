# One job per WSI image: patches into one HDF5 shard + an extraction record (docs/architecture.md).
# Skip-if-up-to-date, --force and on_error: medflow.extract.job. With wsi.on_error=skip a bad image
# yields a "failed" record and no shard, so only the record is declared.
_WSI_COHORTS = cohorts_of("wsi")

if _WSI_COHORTS:

    rule extract_wsi:
        input:
            lambda wc: cohort_entry(wc.cohort, wc.image_id).files() + stain_reference_files(wc.cohort, "extraction"),
        output:
            record=update(f"{RES}/shards/{{cohort}}/{{image_id}}.record.json"),
        wildcard_constraints:
            cohort="|".join(_WSI_COHORTS),
        params:
            shard=lambda wc: f"{RES}/shards/{wc.cohort}/{wc.image_id}.h5",
            config_hash=lambda wc: extraction_hash("wsi", wc.cohort),
            **stain_params("extraction", lambda wc: wc.cohort),
        log:
            f"{RES}/logs/extract_wsi/{{cohort}}/{{image_id}}.log",
        container: CONTAINER
        threads: config["wsi"]["workers"]
        resources:
            cpus_per_task=config["wsi"]["workers"],
            mem_mb=4000,
            runtime=120,
        shell:
            "medflow extract-wsi --config {CONFIG_FILE} --cohort {wildcards.cohort} --image-id {wildcards.image_id}"
            " --out {params.shard} --record {output.record}" + stain_shell("extraction") + " > {log} 2>&1"

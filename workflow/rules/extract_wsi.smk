# One job per WSI image: patches into one HDF5 shard + an extraction record (docs/architecture.md).
# Skip-if-up-to-date, --force and on_error: medflow.extract.job. With wsi.on_error=skip a bad image
# yields a "failed" record and no shard, so only the record is declared.
# With wsi.images_per_job = n > 1 one job extracts a batch of n images (`medflow extract-batch`, same per-image
# contract and outputs) and declares only its batch record, which lists the images' records for the index.
_WSI_COHORTS = cohorts_of("wsi")

if _WSI_COHORTS and images_per_job("wsi") == 1:

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

elif _WSI_COHORTS:

    rule extract_wsi:
        input:
            lambda wc: [f for e in batch_entries(wc.cohort, wc.batch) for f in e.files()]
            + stain_reference_files(wc.cohort, "extraction"),
        output:
            batch=update(f"{RES}/shards/{{cohort}}/batches/{{batch}}.json"),
        wildcard_constraints:
            cohort="|".join(_WSI_COHORTS),
            batch=medflow.extract.batches.NAME_PATTERN,
        params:
            out_dir=lambda wc: f"{RES}/shards/{wc.cohort}",
            images=lambda wc: ",".join(e.image_id for e in batch_entries(wc.cohort, wc.batch)),
            config_hash=lambda wc: extraction_hash("wsi", wc.cohort),
            **stain_params("extraction", lambda wc: wc.cohort),
        log:
            f"{RES}/logs/extract_wsi/{{cohort}}/{{batch}}.log",
        container: CONTAINER
        threads: config["wsi"]["workers"]
        resources:
            cpus_per_task=config["wsi"]["workers"],
            mem_mb=4000,
            runtime=120 + 10 * (images_per_job("wsi") - 1),
        shell:
            "medflow extract-batch --config {CONFIG_FILE} --cohort {wildcards.cohort} --images {params.images}"
            " --out-dir {params.out_dir} --record {output.batch}" + stain_shell("extraction") + " > {log} 2>&1"

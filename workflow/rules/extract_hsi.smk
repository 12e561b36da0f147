# One job per HSI image: patches into one HDF5 shard + an extraction record (docs/architecture.md).
# Skip-if-up-to-date, --force and on_error: medflow.extract.job. With hsi.on_error=skip a bad image
# yields a "failed" record and no shard, so only the record is declared.
# With hsi.images_per_job = n > 1 one job extracts a batch of n images (`medflow extract-batch`, same per-image
# contract and outputs) and declares only its batch record, which lists the images' records for the index.
_HSI_COHORTS = cohorts_of("hsi")

if _HSI_COHORTS and images_per_job("hsi") == 1:

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

elif _HSI_COHORTS:

    rule extract_hsi:
        input:
            lambda wc: [f for e in batch_entries(wc.cohort, wc.batch) for f in e.files()],
        output:
            batch=update(f"{RES}/shards/{{cohort}}/batches/{{batch}}.json"),
        wildcard_constraints:
            cohort="|".join(_HSI_COHORTS),
            batch=medflow.extract.batches.NAME_PATTERN,
        params:
            out_dir=lambda wc: f"{RES}/shards/{wc.cohort}",
            images=lambda wc: ",".join(e.image_id for e in batch_entries(wc.cohort, wc.batch)),
            config_hash=lambda wc: extraction_hash("hsi", wc.cohort),
        log:
            f"{RES}/logs/extract_hsi/{{cohort}}/{{batch}}.log",
        container: CONTAINER
        threads: 1
        resources:
            cpus_per_task=1,
            mem_mb=3000,
            runtime=30 + 5 * (images_per_job("hsi") - 1),
        shell:
            "medflow extract-batch --config {CONFIG_FILE} --cohort {wildcards.cohort} --images {params.images}"
            " --out-dir {params.out_dir} --record {output.batch} > {log} 2>&1"

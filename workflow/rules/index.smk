# The cohort index: one file listing every shard (and every image that failed, with on_error=skip).


rule index:
    input:
        lambda wc: extraction_records(wc.cohort),
    output:
        update(f"{RES}/index/{{cohort}}.json"),
    wildcard_constraints:
        cohort="|".join(COHORTS),
    log:
        f"{RES}/logs/index/{{cohort}}.log",
    container: CONTAINER
    resources:
        cpus_per_task=1,
        mem_mb=2000,
        runtime=20,
    shell:
        "medflow index --config {CONFIG_FILE} --cohort {wildcards.cohort} --out {output} {input} > {log} 2>&1"

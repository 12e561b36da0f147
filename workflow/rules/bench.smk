# Node-throughput benchmark for site admins: `snakemake --profile slurm benchmark`.
_BENCH_RANKS = config["bench"]["max_ranks"]


rule bench:
    output:
        f"{RES}/bench/bench.json",
    log:
        f"{RES}/logs/bench.log",
    container: CONTAINER
    threads: max(2, _BENCH_RANKS)
    resources:
        tasks=1,
        cpus_per_task=max(2, _BENCH_RANKS),
        mem_mb=8000,
        runtime=60,
    shell:
        "medflow bench --config {CONFIG_FILE} --out {output} > {log} 2>&1"


rule benchmark:
    input:
        rules.bench.output,

# Node-throughput benchmark for site admins: `snakemake --profile slurm benchmark`. With bench.nodes > 1 the
# job spans that many nodes (one task each); the node-local measurements run on the first, the cross-node
# allreduce on all of them (medflow.bench.workers, `bench.srun` inside the allocation). The `mpi` resource
# makes the SLURM jobstep run the command in the batch script itself, not in a one-node `srun -n1` step
# whose environment would confine the inner srun to that node ("Only allocated 1 nodes asked for 2").
_BENCH_RANKS = config["bench"]["max_ranks"]
_BENCH_NODES = config["bench"]["nodes"]
_BENCH_MPI = {"mpi": config["bench"]["srun"]} if _BENCH_NODES > 1 else {}


rule bench:
    output:
        report(f"{RES}/bench/bench.json", caption="../report/bench.rst", category="Benchmark"),
    log:
        f"{RES}/logs/bench.log",
    container: CONTAINER
    threads: max(2, _BENCH_RANKS)
    resources:
        nodes=_BENCH_NODES,
        tasks=_BENCH_NODES,
        cpus_per_task=max(2, _BENCH_RANKS),
        mem_mb=8000,
        runtime=60,
        **_BENCH_MPI,
    shell:
        "medflow bench --config {CONFIG_FILE} --out {output} > {log} 2>&1"


# The reference check is its own job: a failing check must not delete the measurements.
rule bench_check:
    input:
        f"{RES}/bench/bench.json",
    output:
        f"{RES}/bench/check.txt",
    log:
        f"{RES}/logs/bench_check.log",
    container: CONTAINER
    resources:
        cpus_per_task=1,
        mem_mb=1000,
        runtime=10,
    shell:
        "medflow bench --config {CONFIG_FILE} --check --from-results {input} > {output} 2> {log}"


rule benchmark:
    input:
        rules.bench.output,
        **({"check": rules.bench_check.output} if SITE in config["bench"]["references"] else {}),

# Per outer fold: pick the best inner model on validation, test it on the held-out patients.


rule select:
    input:
        index=study_index,
        folds=f"{RES}/folds/{{study}}.json",
        inner=lambda wc: expand(f"{RES}/runs/{wc.study}/outer{wc.outer}/inner{{inner}}/record.json", inner=inner_folds()),
    output:
        record=update(f"{RES}/runs/{{study}}/outer{{outer}}/record.json"),
        model=update(f"{RES}/runs/{{study}}/outer{{outer}}/model.pt"),
        predictions=update(f"{RES}/runs/{{study}}/outer{{outer}}/predictions.npz"),
    wildcard_constraints:
        study="|".join(STUDIES),
    params:
        out_dir=lambda wc: f"{RES}/runs/{wc.study}/outer{wc.outer}",
        inner_dirs=lambda wc, input: " ".join(str(Path(p).parent) for p in input.inner),
    log:
        f"{RES}/logs/select/{{study}}/outer{{outer}}.log",
    container: CONTAINER
    resources:
        cpus_per_task=1,
        mem_mb=4000,
        runtime=60,
    shell:
        "medflow select --config {CONFIG_FILE} --study {wildcards.study} --index {input.index} --folds {input.folds}"
        " --outer {wildcards.outer} --inner-dirs {params.inner_dirs} --out-dir {params.out_dir} > {log} 2>&1"

# Patient-level nested cross-validation plan of a study (grouped by patient, stratified/balanced). A checkpoint:
# the per-slide rules of WSI studies (predict_wsi.smk) learn each outer fold's test slides from the plan.


def study_index(wc) -> str:
    return f"{RES}/index/{STUDIES[wc.study]['cohort']}.json"


checkpoint plan_folds:
    input:
        study_index,
    output:
        f"{RES}/folds/{{study}}.json",
    wildcard_constraints:
        study="|".join(STUDIES),
    params:
        config_hash=section_hash("folds", "seed"),
    log:
        f"{RES}/logs/plan_folds/{{study}}.log",
    container: CONTAINER
    resources:
        cpus_per_task=1,
        mem_mb=2000,
        runtime=20,
    shell:
        "medflow plan-folds --config {CONFIG_FILE} --study {wildcards.study} --index {input}"
        " --out {output} > {log} 2>&1"

# HSI studies: classification maps of the outer test images with the selected model of that outer fold.
_HSI_STUDIES = [s for s, spec in STUDIES.items() if COHORTS[spec["cohort"]]["kind"] == "hsi"]

if _HSI_STUDIES:

    rule predict_hsi:
        input:
            index=study_index,
            folds=f"{RES}/folds/{{study}}.json",
            model=f"{RES}/runs/{{study}}/outer{{outer}}/model.pt",
        output:
            record=update(f"{RES}/runs/{{study}}/outer{{outer}}/maps/record.json"),
        wildcard_constraints:
            study="|".join(_HSI_STUDIES),
        params:
            out_dir=lambda wc: f"{RES}/runs/{wc.study}/outer{wc.outer}/maps",
            cohort=lambda wc: STUDIES[wc.study]["cohort"],
        log:
            f"{RES}/logs/predict_hsi/{{study}}/outer{{outer}}.log",
        container: CONTAINER
        resources:
            cpus_per_task=1,
            mem_mb=4000,
            runtime=60,
        shell:
            "medflow predict-hsi --config {CONFIG_FILE} --study {wildcards.study} --model {input.model}"
            " --cohort {params.cohort} --folds {input.folds} --outer {wildcards.outer}"
            " --out-dir {params.out_dir} > {log} 2>&1"

# select.refit: per outer fold, retrain the selected configuration on the whole outer training set (for as
# many epochs as produced the selected inner model), then test it on the outer fold's held-out patients.
# The same launcher and resources as `train` (workflow/rules/train.smk).
if config["select"]["refit"]:

    rule refit:
        input:
            index=study_index,
            folds=f"{RES}/folds/{{study}}.json",
            selection=f"{RES}/runs/{{study}}/outer{{outer}}/record.json",
            stain=lambda wc: stain_reference_files(STUDIES[wc.study]["cohort"], "train"),
        output:
            record=update(f"{RES}/runs/{{study}}/outer{{outer}}/refit/record.json"),
            model=update(f"{RES}/runs/{{study}}/outer{{outer}}/refit/model.pt"),
            curves=update(f"{RES}/runs/{{study}}/outer{{outer}}/refit/curves.csv"),
        wildcard_constraints:
            study="|".join(STUDIES),
        params:
            out_dir=lambda wc: f"{RES}/runs/{wc.study}/outer{wc.outer}/refit",
            config_hash=lambda wc: section_hash(f"studies.{wc.study}", "launch", "folds"),
            **stain_params("train", lambda wc: STUDIES[wc.study]["cohort"]),
        log:
            f"{RES}/logs/refit/{{study}}/outer{{outer}}.log",
        container: CONTAINER
        threads: _LAUNCH["ranks"] * _LAUNCH["threads_per_rank"]
        resources:
            mem_mb_per_cpu=3000,
            runtime=240,
            **_SHAPE,
            **_MPI,
        shell:
            _LAUNCHER + "medflow train --config {CONFIG_FILE} --study {wildcards.study}"
            " --index {input.index} --folds {input.folds} --outer {wildcards.outer} --selection {input.selection}"
            " --out-dir {params.out_dir}" + stain_shell("train") + " > {log} 2>&1"

    rule test_refit:
        input:
            index=study_index,
            folds=f"{RES}/folds/{{study}}.json",
            model=f"{RES}/runs/{{study}}/outer{{outer}}/refit/model.pt",
        output:
            record=update(f"{RES}/runs/{{study}}/outer{{outer}}/refit/test/record.json"),
            predictions=update(f"{RES}/runs/{{study}}/outer{{outer}}/refit/test/predictions.npz"),
        wildcard_constraints:
            study="|".join(STUDIES),
        params:
            out_dir=lambda wc: f"{RES}/runs/{wc.study}/outer{wc.outer}/refit/test",
        log:
            f"{RES}/logs/test_refit/{{study}}/outer{{outer}}.log",
        container: CONTAINER
        resources:
            cpus_per_task=1,
            mem_mb=4000,
            runtime=60,
        shell:
            "medflow test --config {CONFIG_FILE} --study {wildcards.study} --index {input.index}"
            " --folds {input.folds} --outer {wildcards.outer} --model {input.model} --out-dir {params.out_dir}"
            " > {log} 2>&1"

# WSI studies: whole-slide heatmaps of every test slide of each outer fold with that fold's selected model
# (one job per slide), the fold's slide-level metrics and FROC, and Grad-CAM grids of its test patches.
# The test slides of a fold are known once the fold plan exists (checkpoint plan_folds, folds.smk).
_WSI_STUDIES = [s for s, spec in STUDIES.items() if COHORTS[spec["cohort"]]["kind"] == "wsi"]
_PW = config["predict_wsi"]
if _PW["ranks"] > 1:
    _PW_MPI = {"mpi": mpi_launcher}
    _PW_LAUNCHER = "SRUN_CPUS_PER_TASK={resources.cpus_per_task} {resources.mpi} -n {resources.tasks} "
else:
    _PW_MPI, _PW_LAUNCHER = {}, ""
_PW_GPU = {"gpu": _PW["ranks"]} if config["launch"]["gpus_per_node"] > 0 else {}  # one GPU per rank


def wsi_test_slides(study: str, outer: int) -> list[str]:
    """Image ids of the outer fold's test patients, among the slides the cohort index holds."""
    plan = medflow.core.fsio.read_json(checkpoints.plan_folds.get(study=study).output[0])
    index = medflow.core.fsio.read_json(f"{RES}/index/{STUDIES[study]['cohort']}.json")
    test = set(next(o for o in plan["outer"] if int(o["index"]) == outer)["test_patients"])
    return [s["image_id"] for s in index["shards"] if s["patient_id"] in test]


def wsi_results(study: str) -> list[str]:
    """The per-fold records of a WSI study that the summary reads."""
    files = [f"{RES}/runs/{study}/outer{o}/wsi/record.json" for o in outer_folds(study)]
    if config["gradcam"]["per_group"] > 0:
        files += [f"{RES}/runs/{study}/outer{o}/gradcam/record.json" for o in outer_folds(study)]
    return files


if _WSI_STUDIES:

    rule predict_wsi:
        input:
            lambda wc: cohort_entry(STUDIES[wc.study]["cohort"], wc.image_id).files(),
            model=f"{RES}/runs/{{study}}/outer{{outer}}/model.pt",
        output:
            record=update(f"{RES}/runs/{{study}}/outer{{outer}}/wsi/{{image_id}}.record.json"),
            npz=update(f"{RES}/runs/{{study}}/outer{{outer}}/wsi/{{image_id}}.npz"),
            png=update(f"{RES}/runs/{{study}}/outer{{outer}}/wsi/{{image_id}}.png"),
            geojson=update(f"{RES}/runs/{{study}}/outer{{outer}}/wsi/{{image_id}}.geojson"),
            csv=update(f"{RES}/runs/{{study}}/outer{{outer}}/wsi/{{image_id}}.csv"),
        wildcard_constraints:
            study="|".join(_WSI_STUDIES),
        params:
            out_dir=lambda wc: f"{RES}/runs/{wc.study}/outer{wc.outer}/wsi",
            cohort=lambda wc: STUDIES[wc.study]["cohort"],
        log:
            f"{RES}/logs/predict_wsi/{{study}}/outer{{outer}}_{{image_id}}.log",
        container: CONTAINER
        threads: _PW["ranks"] * config["launch"]["threads_per_rank"]
        resources:
            tasks=_PW["ranks"],
            cpus_per_task=config["launch"]["threads_per_rank"] + _PW["workers"] - 1,
            mem_mb=6000,
            runtime=120,
            **_PW_MPI,
            **_PW_GPU,
        shell:
            _PW_LAUNCHER + "medflow predict-wsi --config {CONFIG_FILE} --model {input.model} --cohort {params.cohort}"
            " --image-ids {wildcards.image_id} --study {wildcards.study} --outer {wildcards.outer}"
            " --out-dir {params.out_dir} > {log} 2>&1"

    rule slide_metrics:
        input:
            lambda wc: expand(
                f"{RES}/runs/{wc.study}/outer{wc.outer}/wsi/{{image_id}}.record.json",
                image_id=wsi_test_slides(wc.study, int(wc.outer)),
            ),
        output:
            record=update(f"{RES}/runs/{{study}}/outer{{outer}}/wsi/record.json"),
        wildcard_constraints:
            study="|".join(_WSI_STUDIES),
        log:
            f"{RES}/logs/slide_metrics/{{study}}/outer{{outer}}.log",
        container: CONTAINER
        resources:
            cpus_per_task=1,
            mem_mb=2000,
            runtime=20,
        shell:
            "medflow slide-metrics --config {CONFIG_FILE} --study {wildcards.study} --outer {wildcards.outer}"
            " --records {input} --out {output.record} > {log} 2>&1"

    rule grad_cam:
        input:
            index=study_index,
            model=f"{RES}/runs/{{study}}/outer{{outer}}/model.pt",
            predictions=f"{RES}/runs/{{study}}/outer{{outer}}/predictions.npz",
        output:
            record=update(f"{RES}/runs/{{study}}/outer{{outer}}/gradcam/record.json"),
            png=update(f"{RES}/runs/{{study}}/outer{{outer}}/gradcam/gradcam.png"),
        wildcard_constraints:
            study="|".join(_WSI_STUDIES),
        params:
            out_dir=lambda wc: f"{RES}/runs/{wc.study}/outer{wc.outer}/gradcam",
        log:
            f"{RES}/logs/grad_cam/{{study}}/outer{{outer}}.log",
        container: CONTAINER
        resources:
            cpus_per_task=1,
            mem_mb=4000,
            runtime=30,
        shell:
            "medflow grad-cam --config {CONFIG_FILE} --study {wildcards.study} --outer {wildcards.outer}"
            " --model {input.model} --predictions {input.predictions} --index {input.index}"
            " --out-dir {params.out_dir} > {log} 2>&1"

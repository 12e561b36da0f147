# Gather every job record of this site, then the report (this site + any extra sites in report.sites).

# `snakemake --report`: each figure of the report directory gets a category by its name prefix (and the
# study as subcategory), so the learning curves sit next to the train rule's curves.csv tables. A stage
# that adds figures adds its prefix here and a branch in workflow/report/figures.rst.
FIGURE_CATEGORIES = {
    "curves_": "Learning curves",
    "confusion_": "Confusion matrices",
    "map_": "Classification maps",
    "heatmap_": "Heatmaps",
    "gradcam_": "Grad-CAM",
    "qc/": "Slide QC",
}


def figure_category(wc) -> str:
    return next((name for prefix, name in FIGURE_CATEGORIES.items() if wc.figure.startswith(prefix)), "Figures")


def figure_subcategory(wc):
    """The study of a learning-curve or confusion figure (`<prefix><study>.png`), else none."""
    for prefix in ("curves_", "confusion_"):
        if wc.figure.startswith(prefix):
            return wc.figure[len(prefix) :]
    return None


def all_run_records(wc=None) -> list[str]:
    files = []
    for study in STUDIES:
        for outer in outer_folds(study):
            files.append(f"{RES}/runs/{study}/outer{outer}/record.json")
            files += [f"{RES}/runs/{study}/outer{outer}/inner{inner}/record.json" for inner in inner_folds()]
            if study in _HSI_STUDIES:
                files.append(f"{RES}/runs/{study}/outer{outer}/maps/record.json")
            if config["select"]["refit"]:
                files.append(f"{RES}/runs/{study}/outer{outer}/refit/test/record.json")
        if study in _WSI_STUDIES:
            files += wsi_results(study)
    files += [f"{RES}/index/{cohort}.json" for cohort in COHORTS]
    files += [f"{RES}/folds/{study}.json" for study in STUDIES]
    return files


# The audit of everything above (medflow.report.verify); problems are recorded, and the report states them.
rule verify:
    input:
        all_run_records,
    output:
        f"{RES}/verify.json",
    params:
        rehash="" if config["verify"]["rehash"] else "--no-rehash",
    log:
        f"{RES}/logs/verify.log",
    container: CONTAINER
    resources:
        cpus_per_task=1,
        mem_mb=2000,
        runtime=60,
    shell:
        "medflow verify {RES} --config {CONFIG_FILE} --out {output} --record-only {params.rehash} > {log} 2>&1"


rule summarize:
    input:
        all_run_records,
        f"{RES}/verify.json",
    output:
        report(f"{RES}/summary.json", caption="../report/summary.rst", category="Records"),
    log:
        f"{RES}/logs/summarize.log",
    container: CONTAINER
    resources:
        cpus_per_task=1,
        mem_mb=2000,
        runtime=20,
    shell:
        "medflow summarize --config {CONFIG_FILE} --site-dir {RES} --out {output} > {log} 2>&1"


rule report:
    input:
        summary=f"{RES}/summary.json",
    output:
        html=report(f"{RES}/report/report.html", caption="../report/report.rst", category="Report"),
        md=f"{RES}/report/report.md",
        json=f"{RES}/report/report.json",
        **{name: report(f"{RES}/report/{name}.csv", caption=f"../report/{name}.rst", category="Tables")
           for name in ("preprocessing", "training", "nested_cv", "stages", "energy")},
        figures=report(directory(f"{RES}/report/figures"), patterns=["{figure}.png"],
                       caption="../report/figures.rst", category=figure_category,
                       subcategory=figure_subcategory, labels={"figure": "{figure}"}),
    params:
        out_dir=f"{RES}/report",
        sites=" ".join(config["report"]["sites"]),
    log:
        f"{RES}/logs/report.log",
    container: CONTAINER
    resources:
        cpus_per_task=1,
        mem_mb=4000,
        runtime=20,
    shell:
        "medflow report --config {CONFIG_FILE} --out-dir {params.out_dir} {RES} {params.sites} > {log} 2>&1"

# medflow: raw slides / hyperspectral images → sharded HDF5 → nested-CV data-parallel training → per-site report.
#   snakemake --profile workflow/profiles/local        (local, the embedded demo config)
#   snakemake --profile slurm                          (SLURM; see docs/slurm.md)
#   snakemake --profile slurm benchmark                (node-throughput benchmark of a site)
import os
import sys

from snakemake.utils import min_version

min_version("9.0")


# The embedded default (the demo study). A --configfile replaces it as a whole, so a site's config never
# inherits the demo cohorts and studies; --config KEY=VALUE overrides single keys on top of either.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


# Jobs call the `medflow` of the environment that runs Snakemake.
os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/stain.smk"
include: "workflow/rules/extract_wsi.smk"
include: "workflow/rules/extract_hsi.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/folds.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/refit.smk"
include: "workflow/rules/predict_hsi.smk"
include: "workflow/rules/predict_wsi.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/bench.smk"


check_study_plans()


onstart:
    hold_results_lock()
    write_effective_config()


onsuccess:
    release_results_lock()


onerror:
    release_results_lock()


rule all:
    default_target: True
    input:
        f"{RES}/report/report.html",
        f"{RES}/report/report.md",

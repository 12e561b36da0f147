# medflow: raw slides / hyperspectral images → sharded HDF5 → nested-CV data-parallel training → per-site report.
#   snakemake -c2                      (local, the embedded demo config)
#   snakemake --profile slurm          (SLURM; see docs/slurm.md)
#   snakemake --profile slurm benchmark   (node-throughput benchmark of a site)
import os

from snakemake.utils import min_version, validate

min_version("9.0")


# The embedded default (the demo study). A --configfile replaces it as a whole, so a site's config never
# inherits the demo cohorts and studies; --config KEY=VALUE overrides single keys on top of either.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


# Rejects unknown keys and wrong types before any job runs, naming the key.
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/extract_wsi.smk"
include: "workflow/rules/extract_hsi.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/folds.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/predict_hsi.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/bench.smk"


rule all:
    default_target: True
    input:
        f"{RES}/report/report.html",
        f"{RES}/report/report.md",

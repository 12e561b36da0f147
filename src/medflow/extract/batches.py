"""Batches of a cohort's images for extraction jobs (``<kind>.images_per_job``): names and membership.

A cohort of 30,000 slides must not become 30,000 SLURM jobs (sites cap ``MaxSubmitJobs``, each array
task counting as one job) nor 30,000 Snakemake jobs (``snakemake -n`` costs ~1.4 ms per job). With
``images_per_job: n`` the manifest rows are cut, in manifest order, into consecutive batches of n; one
job extracts a batch through the per-image contract (`medflow.extract.job`: one shard and one record per
image, each atomic) and writes a batch record listing them (`medflow.extract.batch_job`). Batch names
are fixed-width (``b000000``…) so they sort and stay stable as a cohort grows at its end. Pure Python:
the Snakefile imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

BATCH_FORMAT = "medflow-extract-batch/1"
NAME_PATTERN = r"b\d{6}"


def batch_name(index: int) -> str:
    return f"b{index:06d}"


def split(items: Sequence[T], per_job: int) -> dict[str, tuple[T, ...]]:
    """``{batch name: items}`` in order, ``per_job`` items per batch (the last one may hold fewer)."""
    if per_job < 1:
        raise ValueError(f"images_per_job must be >= 1, got {per_job}")
    return {batch_name(i // per_job): tuple(items[i : i + per_job]) for i in range(0, len(items), per_job)}


def jobs_needed(images: int, per_job: int) -> int:
    return -(-images // per_job)

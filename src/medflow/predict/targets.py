"""Which images a prediction command maps: named ones, or the test patients' images of an outer fold."""

from __future__ import annotations

import argparse

from ..core.errors import InputError
from ..core.manifest import ImageEntry
from ..core.manifest import entries as manifest_entries
from ..core.manifest import entry as manifest_entry
from ..train.splits import fold_patients, load_plan


def named_or_outer_test(cfg: dict, args: argparse.Namespace, noun: str) -> list[ImageEntry]:
    """Manifest entries of ``--image-ids``, else those of outer fold ``--outer``'s test patients in
    ``--folds`` (``noun`` names the images in the error when the fold has none)."""
    if args.image_ids:
        return [manifest_entry(cfg, args.cohort, image_id) for image_id in args.image_ids]
    if args.outer is None:
        raise InputError(args.folds, "--folds needs --outer to pick the test patients")
    try:
        test = set(fold_patients(load_plan(args.folds), args.outer, None)["test"])
    except InputError as exc:
        raise InputError(args.folds, exc.problem) from None
    items = [e for e in manifest_entries(cfg, args.cohort) if e.patient_id in test]
    if not items:
        raise InputError(args.folds, f"outer fold {args.outer} has no test {noun} in cohort {args.cohort!r}")
    return items

"""`medflow <command>`: one subcommand per workflow stage; each rule's shell is one call.

A command table: each command module exposes ``add_arguments(parser)`` and ``run(args) -> int | None``
and is imported only when its command runs, so `medflow synth` does not pay for importing torch
(measured on 2 cores: `medflow.train.fold` 2.9–3.3 s, `medflow.demo.cohort` 0.35–0.57 s).
Bad input (`InputError`) is one line ``medflow <cmd>: error: <file>: <problem>`` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from types import FrameType

from . import __version__
from .core.errors import InputError

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("medflow.demo.cohort", "write the synthetic demo cohort (WSI pyramids + ASAP XML, HSI mosaics)"),
    "fit-stain": ("medflow.extract.wsi.stain_reference", "fit a WSI cohort's stain normalisation reference"),
    "extract-wsi": ("medflow.extract.wsi.job", "extract labelled patches of one slide into an HDF5 shard"),
    "extract-hsi": ("medflow.extract.hsi.job", "calibrate/demosaic/correct/normalise one HSI image, extract patches"),
    "extract-batch": ("medflow.extract.batch_job", "extract a batch of images (images_per_job): a shard + record each"),
    "index": ("medflow.extract.index", "build the cohort index from extraction records"),
    "plan-folds": ("medflow.train.splits", "patient-level nested cross-validation fold plan"),
    "train": ("medflow.train.fold", "train one (outer, inner) fold, data-parallel (Horovod or DDP)"),
    "select": ("medflow.train.select", "pick the best inner model of an outer fold and test it"),
    "test": ("medflow.train.test", "test a model (e.g. the refit one) on the test patients of an outer fold"),
    "predict-hsi": ("medflow.predict.hsi", "classify every pixel of HSI cubes into maps"),
    "predict-wsi": ("medflow.predict.wsi", "whole-slide heatmaps, GeoJSON regions, detections, slide scores"),
    "slide-metrics": ("medflow.predict.slide_metrics", "slide-level AUC, sensitivity/specificity and FROC of a fold"),
    "grad-cam": ("medflow.predict.explain", "Grad-CAM grids of an outer fold's test patches"),
    "verify": ("medflow.report.verify", "audit a site's results: shard digests, provenance, splits, completeness"),
    "summarize": ("medflow.report.summary", "gather all job records of a site into summary.json"),
    "report": ("medflow.report.build", "per-site timing and accuracy report (Markdown, HTML, JSON, CSV)"),
    "bench": ("medflow.bench.run", "node-throughput benchmark and reference check"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="medflow",
        description="HPC batch workflow for medical-imaging deep learning.",
        epilog=f"commands:\n{lines}\n\n`medflow <command> --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medflow {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.error(f"unknown command {command!r}")
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"medflow {command}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    _exit_on_sigterm()
    try:
        return int(module.run(args) or 0)
    except InputError as exc:
        print(f"medflow {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _exit_on_sigterm() -> None:
    """scancel/timeouts send SIGTERM first: exit through Python so `finally` blocks (fsio.atomic_path,
    ShardWriter) remove their temporary files instead of leaving them behind."""

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

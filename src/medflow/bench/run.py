"""`medflow bench`: node-throughput benchmark of the medflow stages, and a check against site references.

Measurement groups (each an independent function, run for about ``bench.seconds``; ``--quick`` shortens them):
``wsi``, ``hsi``, ``hdf5`` (node-local: `medflow.bench.local`), ``train`` and ``allreduce`` (ranks under
the launcher: `medflow.bench.workers`; across the nodes of the allocation too with ``bench.nodes`` > 1).
With both ``train`` and ``allreduce``, ``predict.<model>.efficiency.n<N>`` is the α–β model's N-node
scaling efficiency of each model (`medflow.bench.prediction`). Results: one JSON per node (format ``medflow-bench/1``) with the
site identity, software versions and a flat ``metrics`` map. ``--check`` compares each metric named in
``bench.references[<site>]`` with its ReFrame-style band (`medflow.bench.check`) and exits 3 naming
every metric outside its band (or not measured).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core import config as config_mod
from ..core import fsio, provenance
from ..core import progress as progress_mod
from ..core.errors import InputError
from ..core.records import now_iso
from .check import CHECK_FAILED, check, report_check, site_references, unit_of
from .local import measure_hdf5, measure_hsi, measure_wsi
from .prediction import predictions
from .timing import Unavailable
from .workers import measure_allreduce, measure_train, worker_allreduce, worker_train

BENCH_FORMAT = "medflow-bench/1"
GROUPS = ("wsi", "hsi", "hdf5", "train", "allreduce")


def run_bench(
    cfg: dict, cfg_path: Path, groups: list[str], quick: bool, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the selected measurement groups; a group that cannot run here is listed under ``skipped``."""
    seconds = min(float(cfg["bench"]["seconds"]), 1.0) if quick else float(cfg["bench"]["seconds"])
    started, t0 = now_iso(), time.perf_counter()
    result: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "site": provenance.site_info(cfg),
        "software": provenance.software(),
        "launch": provenance.launch_info(),
        "config_hash": config_mod.section_hash(cfg, "bench", "wsi", "hsi", "shards", "launch", "studies"),
        "seed": cfg["seed"],
        "quick": quick,
        "seconds_per_measurement": seconds,
        "groups": groups,
        "started": started,
        "metrics": {},
        "units": {},
        "details": {},
        "skipped": {},
        "timings_s": {},
    }
    report = progress_mod.reporter(cfg, "bench", len(groups), "groups")
    with tempfile.TemporaryDirectory(prefix="medflow-bench-") as tmp, report:
        scratch = Path(tmp)
        for group in groups:
            report.note(f"measuring {group}")
            g0 = time.perf_counter()
            try:
                out = _MEASURE[group](cfg, seconds, scratch, quick, cfg_path)
            except Unavailable as exc:
                result["skipped"][group] = str(exc)
                progress(f"bench {group}: skipped ({exc})")
                continue
            finally:
                result["timings_s"][group] = time.perf_counter() - g0
                report.advance(1)
            result["metrics"].update(out["metrics"])
            result["details"][group] = out["details"]
            if out.get("skipped"):
                result["skipped"].update({f"{group}.{k}": v for k, v in out["skipped"].items()})
            for name, value in out["metrics"].items():
                progress(f"bench {name} = {value:.4g} {unit_of(name)}")
    predicted = predictions(result, cfg)
    if predicted is not None:
        result["metrics"].update(predicted["metrics"])
        result["details"]["predict"] = predicted["details"]
        for name, value in predicted["metrics"].items():
            progress(f"bench {name} = {value:.4g} {unit_of(name)}")
    result["units"] = {name: unit_of(name) for name in result["metrics"]}
    result["finished"], result["wall_s"] = now_iso(), time.perf_counter() - t0
    return result


_MEASURE: dict[str, Callable[..., dict[str, Any]]] = {
    "wsi": lambda cfg, s, d, q, p: measure_wsi(cfg, s, d, q),
    "hsi": lambda cfg, s, d, q, p: measure_hsi(cfg, s, d, q),
    "hdf5": lambda cfg, s, d, q, p: measure_hdf5(cfg, s, d, q),
    "train": measure_train,
    "allreduce": measure_allreduce,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument(
        "--out",
        help="results JSON (results/<site>/bench/<host>.json); an existing directory → "
        "<dir>/<host>.json; required unless --from-results",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help=f"compare with bench.references[<site>]; exit {CHECK_FAILED} naming each metric outside its band",
    )
    p.add_argument("--quick", action="store_true", help="≤ 1 s per measurement and small inputs (smoke test)")
    p.add_argument("--only", help=f"comma-separated measurement groups ({','.join(GROUPS)}); default bench.measure")
    p.add_argument("--from-results", metavar="JSON", help="check an existing results file instead of measuring")
    progress_mod.add_quiet_argument(p)
    p.add_argument("--worker", choices=["train", "allreduce"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, help=argparse.SUPPRESS)


def _groups(args: argparse.Namespace, cfg: dict) -> list[str]:
    groups = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else list(cfg["bench"]["measure"])
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise InputError(None, f"--only: unknown measurement group(s) {unknown}; choose from {list(GROUPS)}")
    return groups


def _out_path(out: str) -> Path:
    path = Path(out)
    if path.is_dir() or out.endswith(os.sep):
        return path / f"{provenance.short_host()}.json"
    return path


def run(args: argparse.Namespace) -> int:
    cfg = progress_mod.apply_quiet(config_mod.load(args.config), args.quiet)
    if args.worker == "train":
        worker_train(cfg, args.model, float(args.seconds or cfg["bench"]["seconds"]), Path(args.out), args.ranks)
        return 0
    if args.worker == "allreduce":
        worker_allreduce(cfg, float(args.seconds or cfg["bench"]["seconds"]), Path(args.out), args.ranks)
        return 0
    if not args.out and not args.from_results:
        raise InputError(None, "--out is required (unless --from-results checks a saved run)")
    site = provenance.site_name(cfg)
    references = site_references(cfg, site, args.config) if args.check else {}
    if args.from_results:
        result = fsio.read_json_document(args.from_results, "bench results file", BENCH_FORMAT)
    else:
        out = _out_path(args.out)
        result = run_bench(cfg, Path(args.config).resolve(), _groups(args, cfg), args.quick)
        if args.check:
            result["check"] = {"site": site, "verdicts": check(result, references)}
        fsio.write_json(out, result)
        print(
            f"bench {out}: {len(result['metrics'])} metrics in {result['wall_s']:.1f} s"
            + (f"; skipped {sorted(result['skipped'])}" if result["skipped"] else "")
        )
    if args.check:
        return report_check(check(result, references), site)
    return 0

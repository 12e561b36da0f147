"""Reference check of `medflow bench` results: ReFrame-style bands per metric and site, and units."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..core.errors import InputError

CHECK_FAILED = 3
UNITS = {
    "patches_per_s": "patches/s",
    "images_per_s": "images/s",
    "mpx_per_s": "megapixels/s",
    "read_mb_per_s": "MB/s",
    "ms_per_patch": "ms/patch",
    "img_per_s": "images/s",
    "img_per_s_per_device": "images/s per device",
    "scaling_efficiency": "fraction",
    "algbw_gb_per_s": "GB/s",
    "busbw_gb_per_s": "GB/s",
    "latency_ms": "ms",
    "alpha_us": "µs",
    "efficiency": "fraction",
}


def unit_of(metric: str) -> str:
    parts = metric.split(".")
    for part in reversed(parts):
        if part in UNITS:
            return UNITS[part]
    return ""


def check(result: dict[str, Any], references: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per referenced metric: within ``[value×(1+lower), value×(1+upper)]`` (upper None = no cap)."""
    verdicts = []
    for metric, ref in sorted(references.items()):
        value = float(ref["value"])
        lower = ref.get("lower", -0.2)
        upper = ref.get("upper")
        lo = value * (1 + float(lower)) if lower is not None else float("-inf")
        hi = value * (1 + float(upper)) if upper is not None else float("inf")
        lo, hi = min(lo, hi), max(lo, hi)  # negative reference values flip the band
        measured = result.get("metrics", {}).get(metric)
        ok = measured is not None and lo <= float(measured) <= hi
        verdicts.append(
            {
                "metric": metric,
                "measured": measured,
                "reference": value,
                "lower": lo,
                "upper": hi,
                "ok": ok,
                "reason": ""
                if ok
                else (
                    "not measured"
                    if measured is None
                    else "below reference band"
                    if measured < lo
                    else "above reference band"
                ),
            }
        )
    return verdicts


def site_references(cfg: dict, site: str, path: str | Path) -> dict[str, dict[str, Any]]:
    refs = cfg["bench"]["references"]
    if site not in refs:
        raise InputError(path, f"no bench.references for site {site!r} (sites with references: {sorted(refs)})")
    return refs[site]


def report_check(verdicts: list[dict[str, Any]], site: str) -> int:
    for v in verdicts:
        measured = "not measured" if v["measured"] is None else f"{v['measured']:.4g}"
        band = f"[{v['lower']:.4g}, {v['upper']:.4g}]"
        line = f"{'PASS' if v['ok'] else 'FAIL'} {v['metric']}: {measured} {unit_of(v['metric'])} (reference {v['reference']:.4g}, band {band})"
        print(line if v["ok"] else f"{line}: {v['reason']}", file=sys.stdout if v["ok"] else sys.stderr)
    failed = [v["metric"] for v in verdicts if not v["ok"]]
    if failed:
        print(f"medflow bench: check failed for site {site}: {', '.join(failed)}", file=sys.stderr)
        return CHECK_FAILED
    print(f"medflow bench: all {len(verdicts)} referenced metrics of site {site} within their bands")
    return 0

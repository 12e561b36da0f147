"""Finding a site's job records: extraction records under ``shards/``, fold jobs under ``runs/``.

Every record is returned with ``_path`` and, where the path says it, its study and fold numbers.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..core import fsio
from ..core.errors import InputError

_OUTER = re.compile(r"^outer(\d+)$")
_INNER = re.compile(r"^inner(\d+)$")


def _read_record(path: Path) -> dict[str, Any]:
    rec = fsio.read_json_document(path, "job record")
    rec["_path"] = path
    return rec


def collect_records(site_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """All job records under ``site_dir``, by job type, each with ``_path`` (and fold ids from the path).
    Refit training jobs (``runs/<study>/outer<i>/refit/``) are grouped as "refit", apart from the inner runs."""
    site_dir = Path(site_dir)
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(site_dir.glob("shards/*/*.record.json")):
        rec = _read_record(path)
        rec.setdefault("cohort", path.parent.name)
        found[rec.get("job") or "extract"].append(rec)
    for path in sorted(site_dir.glob("runs/*/outer*/inner*/record.json")):
        rec = _read_record(path)
        rec.setdefault("study", path.parents[2].name)
        rec.setdefault("outer", _fold_number(_OUTER, path.parents[1].name))
        rec.setdefault("inner", _fold_number(_INNER, path.parent.name))
        found[rec.get("job") or "train"].append(rec)
    for path in sorted(site_dir.glob("runs/*/outer*/record.json")):
        rec = _read_record(path)
        rec.setdefault("study", path.parents[1].name)
        rec.setdefault("outer", _fold_number(_OUTER, path.parent.name))
        found[rec.get("job") or "select"].append(rec)
    for path in sorted(site_dir.glob("runs/*/outer*/refit/record.json")):  # select.refit: job "train" there
        rec = _read_record(path)
        rec.setdefault("study", path.parents[2].name)
        rec.setdefault("outer", _fold_number(_OUTER, path.parents[1].name))
        found["refit"].append(rec)
    for path in sorted(site_dir.glob("runs/*/outer*/refit/test/record.json")):
        rec = _read_record(path)
        rec.setdefault("study", path.parents[3].name)
        rec.setdefault("outer", _fold_number(_OUTER, path.parents[2].name))
        found[rec.get("job") or "test"].append(rec)
    for path in sorted(site_dir.glob("runs/*/outer*/maps/record.json")):
        rec = _read_record(path)
        rec.setdefault("study", path.parents[2].name)
        rec.setdefault("outer", _fold_number(_OUTER, path.parents[1].name))
        found[rec.get("job") or "predict-hsi"].append(rec)
    for pattern, job in (
        ("runs/*/outer*/wsi/*.record.json", "predict-wsi"),
        ("runs/*/outer*/wsi/record.json", "slide-metrics"),
        ("runs/*/outer*/gradcam/record.json", "grad-cam"),
    ):
        for path in sorted(site_dir.glob(pattern)):
            rec = _read_record(path)
            outer_dir = path.parents[1]
            rec.setdefault("study", outer_dir.parent.name)
            rec.setdefault("outer", _fold_number(_OUTER, outer_dir.name))
            found[rec.get("job") or job].append(rec)
    return dict(found)


def _fold_number(pattern: re.Pattern, name: str) -> int | None:
    m = pattern.match(name)
    return int(m.group(1)) if m else None


def read_curves(path: Path) -> dict[str, list[float | None]]:
    """curves.csv → {column: [values]} (empty cells become None)."""
    columns: dict[str, list[float | None]] = defaultdict(list)
    try:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                for key, text in row.items():
                    try:
                        columns[key].append(float(text) if text not in (None, "") else None)
                    except ValueError:
                        columns[key].append(None)
    except FileNotFoundError:
        return {}
    except csv.Error as exc:
        raise InputError(path, f"malformed curves CSV ({exc})") from None
    return dict(columns)

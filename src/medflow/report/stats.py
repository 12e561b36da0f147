"""Numeric helpers for summaries: records may hold nulls, strings or NaN where a value is undefined."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from ..core import metrics


def finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def mean_std(values: Iterable[Any]) -> dict[str, Any]:
    """{"mean", "std" (sample, ddof=1), "n"} over the numeric values (records may hold nulls)."""
    return metrics.mean_std(finite(values))


def total(values: Iterable[Any]) -> float:
    return float(sum(finite(values)))


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def parse_time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except (TypeError, ValueError):
        return None

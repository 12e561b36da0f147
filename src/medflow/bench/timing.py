"""Timing helpers of `medflow bench`: repeat a step for a target duration; mark a measurement unavailable."""

from __future__ import annotations

import time
from collections.abc import Callable


class Unavailable(Exception):
    """A measurement cannot run on this node (missing launcher, module, GPU...): recorded as skipped."""


def repeat_for(
    seconds: float, step: Callable[[], float], min_reps: int = 1, warmup: int = 1
) -> tuple[int, float, float]:
    """Run ``step`` (returning its work units) ``warmup`` times untimed, then until ``seconds`` have
    passed (at least ``min_reps`` times). Returns (repetitions, work units, elapsed seconds)."""
    for _ in range(warmup):
        step()
    reps, work, t0 = 0, 0.0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < seconds:
        work += step()
        reps += 1
    return reps, work, time.perf_counter() - t0

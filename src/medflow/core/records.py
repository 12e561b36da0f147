"""Job records: the one JSON document every job writes, and what reports read (never logs)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import fsio, provenance


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class JobRecord(dict):
    """A dict with helpers to time stages. Write with ``save``; the file is replaced atomically.

    One clock (``time.perf_counter``) measures the wall time (from ``clock_start``, default: now) and
    every stage. Stages must not overlap; ``finish`` adds ``timings_s.other`` = wall − the scalar
    stages, so the stages of a record sum to its ``wall_s``.
    """

    def __init__(
        self,
        job: str,
        cfg: dict | None,
        sections: tuple[str, ...] = (),
        *,
        clock_start: float | None = None,
        **fields: Any,
    ):
        cfg = cfg or {}
        super().__init__(
            job=job,
            status="running",
            site=provenance.site_info(cfg),
            software=provenance.software(),
            launch=provenance.launch_info(),
            seed=cfg.get("seed"),
            config_hash=config_mod.section_hash(cfg, *sections) if cfg else None,
            started=now_iso(),
            finished=None,
            wall_s=None,
            timings_s={},
            throughput={},
        )
        self.update(fields)
        self._t0 = time.perf_counter() if clock_start is None else clock_start

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Accumulate the wall time of a stage into ``timings_s[stage]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self["timings_s"][stage] = self["timings_s"].get(stage, 0.0) + time.perf_counter() - t0

    def finish(self, status: str = "ok") -> JobRecord:
        self["status"] = status
        self["finished"] = now_iso()
        self["wall_s"] = time.perf_counter() - self._t0
        timings = self["timings_s"]
        timings.pop("other", None)
        staged = sum(v for v in timings.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
        timings["other"] = max(0.0, self["wall_s"] - staged)
        return self

    def save(self, path: str | Path) -> None:
        fsio.write_json(path, dict(self))


def load(path: str | Path) -> dict:
    return fsio.read_json(path)

"""Progress a person can read, the same for every long command (extraction, training, prediction, bench).

``reporter(cfg, label, total, unit)`` picks the output from ``progress.mode``:

- ``auto`` (default): a tqdm bar when the stream (stderr) is a terminal, else ``lines``;
- ``bar``: always the tqdm bar;
- ``lines``: one line at the first update after every ``progress.interval_s`` seconds, made for logs
  (SLURM, Snakemake ``log:`` files)::

      2026-11-29 18:55:01 train hsi_demo/outer0/inner1: 120/480 steps (25%), 35.2 steps/s, elapsed 3.4s, ETA 10.2s [epoch 2/8]

  and a closing line (total, mean rate, elapsed) when at least one line was printed;
- ``off``: nothing. ``--quiet`` on a long command sets this mode for that call (`apply_quiet`).

Updates are cheap (a counter and a clock read), so per-step calls cost nothing measurable. Lines are
printed on updates, not by a timer thread: extraction forks reader processes, and a thread holding
the stream lock at a fork could deadlock the child.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TextIO

MODES = ("auto", "bar", "lines", "off")
DEFAULTS: dict[str, Any] = {"mode": "auto", "interval_s": 30.0}


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """``--quiet``/``-q`` of every long command."""
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress output (neither bar nor periodic lines)"
    )


def apply_quiet(cfg: dict, quiet: bool) -> dict:
    """``--quiet`` → ``progress.mode: off`` for this call (no stage hashes the progress section)."""
    if quiet:
        cfg["progress"] = {**DEFAULTS, **(cfg.get("progress") or {}), "mode": "off"}
    return cfg


def settings(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULTS, **((cfg or {}).get("progress") or {})}


def duration(seconds: float) -> str:
    """``12.3s`` under a minute, else ``h:mm:ss``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _number(value: float) -> str:
    """Counts as integers; fractions (e.g. images partly done) with one decimal."""
    return str(int(round(value))) if abs(value - round(value)) < 1e-6 else f"{value:.1f}"


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


class Reporter:
    """The ``off`` mode, and the interface of the others: counts, prints nothing."""

    def __init__(self, label: str, total: float | None, unit: str, initial: float = 0):
        self.label, self.total, self.unit = label, total, unit
        self.done: float = initial
        self.detail = ""

    def advance(self, n: float = 1) -> None:
        self.done += n

    def note(self, detail: str) -> None:
        """A short status shown with the numbers (e.g. ``epoch 2/8``)."""
        self.detail = detail

    def close(self) -> None:
        pass

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class LineReporter(Reporter):
    """One line per ``interval_s`` (at the first update after it), for logs."""

    def __init__(
        self,
        label: str,
        total: float | None,
        unit: str,
        initial: float = 0,
        *,
        interval_s: float,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(label, total, unit, initial)
        self.interval_s, self.stream, self._clock = float(interval_s), stream, clock
        self._initial = initial
        self._t0 = self._last = clock()
        self.lines = 0
        self._closed = False

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self._emit(now)

    def line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self._t0, 0.0)
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        if self.total:
            parts = [f"{_number(self.done)}/{_number(self.total)} {self.unit} ({100.0 * self.done / self.total:.0f}%)"]
        else:
            parts = [f"{_number(self.done)} {self.unit}"]
        parts.append(f"{_rate(rate)} {self.unit}/s")
        parts.append(f"elapsed {duration(elapsed)}")
        if final:
            parts[0] = "done " + parts[0]
        elif self.total and rate > 0:
            parts.append(f"ETA {duration(max(self.total - self.done, 0) / rate)}")
        detail = f" [{self.detail}]" if self.detail else ""
        return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.label}: {', '.join(parts)}{detail}"

    def _emit(self, now: float, final: bool = False) -> None:
        try:
            print(self.line(now, final), file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stream never fails the job
            return
        self.lines += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.lines:
            self._emit(self._clock(), final=True)


class BarReporter(Reporter):
    """A tqdm bar (terminals)."""

    def __init__(self, label: str, total: float | None, unit: str, initial: float = 0, *, stream: TextIO):
        from tqdm import tqdm  # only where a bar is drawn

        super().__init__(label, total, unit, initial)
        self._bar = tqdm(
            total=total, initial=initial, desc=label, unit=unit, file=stream, dynamic_ncols=True, mininterval=0.5
        )

    def advance(self, n: float = 1) -> None:
        self.done += n
        self._bar.update(n)

    def note(self, detail: str) -> None:
        if detail != self.detail:
            self.detail = detail
            self._bar.set_postfix_str(detail, refresh=False)

    def close(self) -> None:
        self._bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def reporter(
    cfg: Mapping[str, Any] | None,
    label: str,
    total: float | None,
    unit: str = "it",
    *,
    initial: float = 0,
    enabled: bool = True,
    stream: TextIO | None = None,
) -> Reporter:
    """The reporter ``progress.mode`` asks for (``enabled=False``: off, e.g. ranks other than 0)."""
    opts = settings(cfg)
    mode = opts["mode"] or "off"  # YAML reads an unquoted `off` as false
    out = stream if stream is not None else sys.stderr
    if not enabled or mode == "off":
        return Reporter(label, total, unit, initial)
    if mode == "auto":
        mode = "bar" if _is_terminal(out) else "lines"
    if mode == "bar":
        return BarReporter(label, total, unit, initial, stream=out)
    return LineReporter(label, total, unit, initial, interval_s=float(opts["interval_s"]), stream=out)

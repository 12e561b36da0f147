"""medflow.core.progress: a bar on a terminal, a line every interval in logs, nothing when quiet."""

from __future__ import annotations

import argparse
import io
import re

import pytest

from medflow.core import config as config_mod
from medflow.core import progress

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d job x: (?P<done>[\d.]+)/(?P<total>\d+) patches \((?P<pct>\d+)%\), "
    r"(?P<rate>[\d.]+) patches/s, elapsed (?P<elapsed>[\d.]+)s, ETA (?P<eta>[\d.]+)s$"
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(cfg: dict | None = None, **kw) -> tuple[progress.LineReporter, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    rep = progress.LineReporter("job x", 100, "patches", interval_s=10, stream=out, clock=clock, **kw)
    return rep, out, clock


def test_lines_every_interval_with_done_total_rate_and_eta():
    rep, out, clock = _lines()
    for _ in range(20):  # 20 patches in 4 s: less than the interval, no line yet
        clock.now += 0.2
        rep.advance()
    assert out.getvalue() == ""
    clock.now += 6.0  # 10 s since the start
    rep.advance(5)
    (line,) = out.getvalue().splitlines()
    m = LINE.match(line)
    assert m, line
    assert (m["done"], m["total"], m["pct"]) == ("25", "100", "25")
    assert float(m["rate"]) == pytest.approx(2.5) and float(m["elapsed"]) == pytest.approx(10.0)
    assert float(m["eta"]) == pytest.approx(75 / 2.5)
    clock.now += 9.9
    rep.advance()  # 9.9 s after the last line: none
    clock.now += 0.1
    rep.advance()  # 10 s: the second line
    assert len(out.getvalue().splitlines()) == 2
    rep.close()
    last = out.getvalue().splitlines()[-1]
    assert "done 27/100 patches" in last and "ETA" not in last
    rep.close()  # idempotent
    assert len(out.getvalue().splitlines()) == 3


def test_resumed_work_counts_toward_done_but_not_the_rate():
    rep, out, clock = _lines(initial=50)
    clock.now += 10
    rep.advance(10)
    m = LINE.match(out.getvalue().strip())
    assert m and m["done"] == "60" and float(m["rate"]) == pytest.approx(1.0) and float(m["eta"]) == pytest.approx(40)


def test_short_job_prints_nothing_and_detail_is_shown():
    rep, out, clock = _lines()
    rep.advance(100)
    rep.close()
    assert out.getvalue() == ""  # shorter than one interval: the job's own summary line is enough
    rep, out, clock = _lines()
    rep.note("epoch 2/8")
    clock.now += 10
    rep.advance()
    assert out.getvalue().rstrip().endswith("[epoch 2/8]")


def test_interval_zero_prints_every_update_and_fractions_read_well():
    out = io.StringIO()
    rep = progress.reporter({"progress": {"mode": "lines", "interval_s": 0}}, "maps", 3, "images", stream=out)
    for _ in range(6):
        rep.advance(0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and ": 0.5/3 images (17%)" in lines[0] and ": 3/3 images (100%)" in lines[-1]


def test_modes_off_quiet_auto(tmp_path):
    cfg = config_mod.validate({"progress": {"mode": "lines", "interval_s": 0}})
    term, log = Terminal(), io.StringIO()
    assert isinstance(progress.reporter(cfg, "x", 5, stream=log), progress.LineReporter)
    assert isinstance(progress.reporter({"progress": {"mode": "auto"}}, "x", 5, stream=log), progress.LineReporter)
    bar = progress.reporter({}, "bar job", 5, "steps", stream=term)  # default auto on a terminal: tqdm
    assert isinstance(bar, progress.BarReporter)
    for _ in range(5):
        bar.advance()
    bar.close()
    assert "bar job" in term.getvalue() and "5/5" in term.getvalue() and "\r" in term.getvalue()
    quiet = progress.apply_quiet(cfg, True)
    for stream in (term, log):
        before = stream.getvalue()
        rep = progress.reporter(quiet, "x", 5, stream=stream)
        rep.advance(5)
        rep.close()
        assert stream.getvalue() == before and rep.done == 5
    off = progress.reporter(cfg, "x", 5, stream=log, enabled=False)  # e.g. ranks other than 0
    off.advance()
    assert type(off) is progress.Reporter
    # YAML reads an unquoted `off` as false: accepted and means off.
    assert (
        type(progress.reporter(config_mod.validate({"progress": {"mode": False}}), "x", 1, stream=log))
        is progress.Reporter
    )
    with pytest.raises(Exception, match="progress.mode"):
        config_mod.validate({"progress": {"mode": "loud"}})


def test_quiet_flag_and_durations():
    parser = argparse.ArgumentParser()
    progress.add_quiet_argument(parser)
    assert parser.parse_args(["--quiet"]).quiet and parser.parse_args(["-q"]).quiet
    assert not parser.parse_args([]).quiet
    assert progress.duration(3.04) == "3.0s" and progress.duration(59.94) == "59.9s"
    assert progress.duration(61) == "0:01:01" and progress.duration(3 * 3600 + 62) == "3:01:02"

"""Shared fixtures. Tests that need ../shared/data skip cleanly when it is absent (a user's clone)."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from medflow.core import config as config_mod
from medflow.core.provenance import mpiexec_flags

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
VENV_BIN = Path(sys.executable).parent
FAULTS = ROOT / "tests" / "faults"


def fault_env(**faults: str) -> dict[str, str]:
    """Environment that injects ``faults`` (see tests/faults/sitecustomize.py) into medflow commands."""
    path = os.pathsep.join([str(FAULTS), str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, **faults}


@contextlib.contextmanager
def removed_unless_failed(request: pytest.FixtureRequest, path: Path) -> Iterator[Path]:
    """Yield ``path`` and remove it at teardown unless a test failed meanwhile: what
    tmp_path_retention_policy = "failed" does for tmp_path, for module fixtures holding a whole workflow run (GB)."""
    failures = request.session.testsfailed
    yield path
    if request.session.testsfailed == failures:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real SVS, SalinasA, CAMELYON17 XML); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def default_cfg(tmp_path: Path) -> dict:
    """The embedded default config, validated with defaults filled, writing under tmp_path."""
    with open(ROOT / "config.yaml") as fh:
        cfg = yaml.safe_load(fh)
    cfg = copy.deepcopy(cfg)
    cfg["results"] = str(tmp_path / "results")
    move_demo(cfg, tmp_path / "data" / "demo")
    cfg["site"]["name"] = "testsite"
    return config_mod.validate(cfg)


def move_demo(cfg: dict, out: Path) -> dict:
    """Point the demo (synth.out) and the cohorts that use its manifests at ``out``."""
    old = Path(cfg["synth"]["out"])
    cfg["synth"]["out"] = str(out)
    for spec in cfg["cohorts"].values():
        manifest = Path(spec["manifest"])
        if manifest.parent.parent == old:
            spec["manifest"] = str(out / manifest.relative_to(old))
    return cfg


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in recursively (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def default_config_with(overrides: dict) -> dict:
    """The embedded default config.yaml with ``overrides`` merged in (a complete --configfile)."""
    return deep_merge(yaml.safe_load((ROOT / "config.yaml").read_text()), overrides)


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mpi_launcher() -> list[str]:
    """mpiexec with the flags medflow's local launches use (medflow.provenance.mpiexec_flags)."""
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        pytest.skip("no MPI launcher installed")
    return [exe, *mpiexec_flags()]

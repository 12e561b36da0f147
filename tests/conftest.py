"""Shared fixtures. Tests that need ../shared/data skip cleanly when it is absent (a user's clone)."""
from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real SVS, SalinasA, CAMELYON17 XML); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def default_cfg(tmp_path: Path) -> dict:
    """The embedded default config, validated with defaults filled, writing under tmp_path."""
    from medflow import config as config_mod

    with open(ROOT / "config.yaml") as fh:
        cfg = yaml.safe_load(fh)
    cfg = copy.deepcopy(cfg)
    cfg["results"] = str(tmp_path / "results")
    cfg["synth"]["out"] = str(tmp_path / "data" / "demo")
    cfg["site"]["name"] = "testsite"
    return config_mod.validate(cfg)


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
    from medflow.provenance import mpiexec_flags

    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        pytest.skip("no MPI launcher installed")
    return [exe, *mpiexec_flags()]

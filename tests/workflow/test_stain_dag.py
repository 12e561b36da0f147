"""The Snakemake DAG with stain normalisation (dry runs of the real Snakefile: which jobs read the reference)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, VENV_BIN

E2E_CONFIG = ROOT / "tests" / "e2e" / "config.yaml"


def _dry_run(tmp: Path, stain: dict | None) -> list[str]:
    """The shell commands of a dry run of the e2e config (with ``wsi.stain`` when given)."""
    cfg = yaml.safe_load(E2E_CONFIG.read_text())
    if stain is not None:
        cfg["wsi"]["stain"] = stain
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        str(VENV_BIN / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(tmp),
        "--configfile",
        str(tmp / "config.yaml"),
    ]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([*cmd, "-n", "-p", "--cores", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return re.findall(r"medflow [a-z-]+ .*", proc.stdout)


def _by_command(commands: list[str], name: str) -> list[str]:
    return [c for c in commands if c.startswith(f"medflow {name} ")]


def test_without_stain_normalisation_no_job_reads_a_reference(tmp_path: Path) -> None:
    commands = _dry_run(tmp_path, None)
    assert not _by_command(commands, "fit-stain") and not any("--stain" in c for c in commands)
    assert _by_command(commands, "extract-wsi") and _by_command(commands, "train")


@pytest.mark.parametrize("apply", ["extraction", "load"])
def test_stain_reference_feeds_extraction_or_only_training(tmp_path: Path, apply: str) -> None:
    commands = _dry_run(tmp_path, {"method": "macenko", "apply": apply})
    reference = "results/laptop/stain/wsi_demo.json"
    assert _by_command(commands, "fit-stain") == [
        f"medflow fit-stain --config results/laptop/config.yaml --cohort wsi_demo --out {reference} "
        "> results/laptop/logs/fit_stain/wsi_demo.log 2>&1"
    ]
    extract = _by_command(commands, "extract-wsi")
    assert extract and all((f"--stain {reference}" in c) == (apply == "extraction") for c in extract)
    assert not any("--stain" in c for c in _by_command(commands, "extract-hsi"))
    train = _by_command(commands, "train")
    wsi_train = [c for c in train if "--study wsi_demo" in c]
    assert wsi_train and all(f"--stain {reference}" in c for c in wsi_train)
    assert all("--stain" not in c for c in train if "--study hsi_demo" in c)

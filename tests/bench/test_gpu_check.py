"""benchmarks/gpu_check.sh (the GPU readiness script) where no GPU is: its shell parses, and its dry run
(--cpu: no install, the python parts on the CPU) goes through every step and writes its results."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT, VENV_BIN

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_script_parses_and_documents_itself():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "--cpu" in usage.stdout and "ResNet-50" in usage.stdout
    assert subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True).returncode == 2


@pytest.mark.slow
def test_cpu_dry_run_goes_through_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--cpu", "--python", str(VENV_BIN / "python")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()[1:])
    assert steps["install"].startswith("skipped") and steps["nvidia-smi"].startswith("skipped")
    assert steps["cuda-tests"] == "ok" and steps["resnet50"] == "ok", steps
    assert steps["horovod-cuda"].startswith("skipped")
    assert "skipped" in (out / "cuda-tests.log").read_text()  # no CUDA here: the subset skips, and says so
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["device"] == "cpu" and set(result["feeds"]) == {"synthetic", "loader", "loader_prefetch"}
    for name, feed in result["feeds"].items():
        assert feed["img_per_s"] > 0 and feed["steps"] >= 3, name
    assert result["feeds"]["loader"]["fraction_of_synthetic"] > 0
    assert "gpu_check.sh on" in (out / "summary.txt").read_text()

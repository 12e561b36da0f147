"""Results a study can trust, end to end through the real Snakemake DAG: no stale checkpoint after the data
changed, a swapped shard stops training and `medflow verify` names it, one run per results directory,
and kill -9 at random points of extraction and training leaves no temporary and changes no result."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, VENV_BIN, removed_unless_failed

pytestmark = [pytest.mark.slow]

SITE = "trust"
# WSI only, small and quick: 4 patients × 1 slide, 64² patches, 2 outer × 2 inner folds, 1 rank, refit on.
CONFIG = {
    "seed": 5,
    "results": "results",
    "site": {"name": SITE},
    "synth": {
        "out": "data/demo",
        "wsi": {"patients": 4, "max_slides_per_patient": 1, "width": 1024, "height": 768},
        "hsi": {"patients": 2, "mosaic_height": 60, "mosaic_width": 60},
    },
    "cohorts": {"wsi_demo": {"kind": "wsi", "manifest": "data/demo/wsi/manifest.csv"}},
    "wsi": {"mpp": 0.5, "patch_size": 64, "sampling": {"mode": "random", "per_class": 8}},
    "folds": {"outer": 2, "inner": 2},
    "studies": {
        "wsi_demo": {
            "cohort": "wsi_demo",
            "model": {"name": "resnet18", "input_size": 32},
            "train": {"epochs": 2, "batch_size": 8},
        }
    },
    "launch": {"backend": "horovod", "ranks": 1},
}


def snakemake(
    workdir: Path, *args: str, config: Path | None = None, timeout: int = 900, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [
        str(VENV_BIN / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(config or workdir / "config.yaml"),
        "--cores",
        "2",
        *args,
    ]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def medflow(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a medflow command; `cwd` is the workflow directory where a config's relative paths resolve."""
    return subprocess.run([str(VENV_BIN / "medflow"), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, request) -> Iterator[Path]:
    """A complete run of the small WSI study; tests work on copies of it."""
    work = tmp_path_factory.mktemp("trust")
    (work / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    proc = snakemake(work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with removed_unless_failed(request, work):
        yield work


def copy_of(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    work = tmp_path / "work"
    shutil.copytree(finished, work, symlinks=True)  # copy2: mtimes kept, so Snakemake sees an up-to-date DAG
    return work, work / "results" / SITE


def fold_records(res: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(res)): json.loads(p.read_text()) for p in sorted(res.glob("runs/*/outer*/inner*/record.json"))
    }


def model_digest(path: Path) -> str:
    state = torch.load(path, weights_only=True)["state_dict"]
    return "".join(f"{k}:{hash(v.numpy().tobytes())}" for k, v in sorted(state.items()))


def test_changed_annotation_retrains_from_scratch_where_its_patient_was_used(finished, tmp_path):
    work, res = copy_of(finished, tmp_path)
    before = fold_records(res)
    models_before = {k: model_digest(res / Path(k).parent / "model.pt") for k in before}
    xml = work / "data" / "demo" / "wsi" / "wsi_p00_s0.xml"
    # Move the tumour outline by 60 px: the slide's labels change, so its shard and every fold using it.
    xml.write_text(_shift_x(xml.read_text(), 60.0))
    plan = (res / "folds" / "wsi_demo.json").read_text()
    proc = snakemake(work)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert json.loads((res / "folds" / "wsi_demo.json").read_text())["outer"] == json.loads(plan)["outer"]
    after = fold_records(res)
    changed_patient = "wsi_p00"
    for key, rec in after.items():
        uses = changed_patient in rec["patients"]["train"] + rec["patients"]["val"]
        digest = model_digest(res / Path(key).parent / "model.pt")
        if uses:  # never resumed from the stale checkpoint: trained from scratch on the new shard
            assert rec["checkpoint"]["resumed_from_epoch"] is None, key
            assert "data" in rec["checkpoint"]["ignored"], rec["checkpoint"]
            assert rec["inputs"]["data_digest"] != before[key]["inputs"]["data_digest"]
            if changed_patient in rec["patients"]["train"]:  # (a validation patient does not change weights)
                assert digest != models_before[key], key
        else:  # its data did not change: the finished checkpoint stands, the model is the same
            assert rec["inputs"]["data_digest"] == before[key]["inputs"]["data_digest"]
            assert digest == models_before[key], key
    assert medflow("verify", str(res)).returncode == 0


def _shift_x(asap_xml: str, dx: float) -> str:
    return re.sub(r'X="([\d.]+)"', lambda m: f'X="{max(0.0, float(m.group(1)) - dx):.1f}"', asap_xml)


def test_swapped_shard_stops_training_and_verify_names_it(finished, tmp_path):
    work, res = copy_of(finished, tmp_path)
    shards = res / "shards" / "wsi_demo"
    victim = shards / "wsi_p01_s0.h5"
    shutil.copyfile(shards / "wsi_p02_s0.h5", victim)  # another patient's shard over this one
    uses_victim = [
        r.parent
        for r in res.glob("runs/*/outer*/inner*/record.json")
        if "wsi_p01" in sum(json.loads(r.read_text())["patients"].values(), [])
    ]
    assert uses_victim
    outputs = {p: p.read_bytes() for d in uses_victim for p in d.iterdir() if p.name != "checkpoint.pt"}
    proc = snakemake(work, "--forcerun", "train")
    assert proc.returncode != 0
    logs = "\n".join(p.read_text() for p in (res / "logs" / "train").rglob("*.log"))
    assert f"{victim}: " in logs or f"{victim.name}: " in logs
    assert "content changed since it was indexed" in logs and "Traceback" not in logs
    assert {p: p.read_bytes() for p in outputs} == outputs  # the failed jobs' earlier good outputs are untouched
    verify = medflow("verify", str(res))
    assert verify.returncode == 3
    assert f"shards/wsi_demo/{victim.name}: content differs from the index" in verify.stderr


def test_slide_results_from_another_folds_model_are_named_by_verify(finished, tmp_path):
    """A slide of outer fold 0 predicted again with outer fold 1's model, the fold's slide metrics redone
    from it: every command succeeds, and `medflow verify` says which slide came from which model."""
    work, res = copy_of(finished, tmp_path)
    assert medflow("verify", str(res)).returncode == 0
    wsi_dir = res / "runs" / "wsi_demo" / "outer0" / "wsi"
    records = sorted(wsi_dir.glob("*.record.json"))
    image_id = records[0].name.removesuffix(".record.json")
    cfg = str(res / "config.yaml")
    other = res / "runs" / "wsi_demo" / "outer1" / "model.pt"
    proc = medflow("predict-wsi", "--config", cfg, "--model", str(other), "--cohort", "wsi_demo",
                   "--image-ids", image_id, "--out-dir", str(wsi_dir), "--quiet", cwd=work)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = medflow("slide-metrics", "--config", cfg, "--study", "wsi_demo", "--outer", "0",
                   "--records", *map(str, records), "--out", str(wsi_dir / "record.json"), cwd=work)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    verify = medflow("verify", str(res))
    assert verify.returncode == 3
    assert f"slide {image_id} was predicted by another model than the fold's selected one" in verify.stderr


def test_a_second_run_on_the_same_results_directory_is_refused(finished, tmp_path):
    results = tmp_path / "shared-results"
    cfg = {**CONFIG, "results": str(results)}
    one, two = tmp_path / "one", tmp_path / "two"
    for work in (one, two):
        work.mkdir()
        (work / "config.yaml").write_text(yaml.safe_dump(cfg))
        shutil.copytree(finished / "data", work / "data")
    first = snakemake(one, "--forceall", wait=False)
    lock = results / SITE / ".medflow.lock" / "owner.json"
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert lock.exists(), "the first run never took the lock"
    try:
        second = snakemake(two, "--forceall")
        assert second.returncode == 2
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith("medflow: error: ") and "another medflow run holds" in message
        assert f"pid {json.loads(lock.read_text())['pid']}" in message and str(one) in message
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.wait(timeout=60)
    # A lock whose holder died is stale: the next run takes it over and completes.
    third = snakemake(two)
    assert third.returncode == 0, third.stderr[-4000:]
    assert "taking over the stale lock" in third.stdout + third.stderr
    assert not (results / SITE / ".medflow.lock").exists()  # released at the end


# ---- kill -9 at random points -------------------------------------------------------------------
def _kill_at(cmd: list[str], delay: float, env: dict[str, str] | None = None) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    time.sleep(delay)
    proc.kill()
    return proc.wait(timeout=60)


def _datasets(shard: Path) -> dict[str, np.ndarray]:
    with h5py.File(shard, "r") as h5:
        return {name: h5[name][()] for name in ("patches", "coords", "labels")}


def _no_temporaries(directory: Path) -> None:
    assert not list(directory.rglob(".*.tmp-*")), sorted(map(str, directory.rglob(".*.tmp-*")))


def test_kill_9_during_extraction_then_rerun(finished, tmp_path):
    cfg_path = finished / "results" / SITE / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["wsi"]["sampling"]["per_class"] = 60  # a longer job, so kills land inside it
    cfg["synth"]["out"] = str(finished / "data" / "demo")
    cfg["cohorts"]["wsi_demo"]["manifest"] = str(finished / "data" / "demo" / "wsi" / "manifest.csv")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))

    def cmd(out: Path) -> list[str]:
        return [
            str(VENV_BIN / "medflow"),
            "extract-wsi",
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--cohort",
            "wsi_demo",
            "--image-id",
            "wsi_p01_s0",
            "--out",
            str(out / "s.h5"),
            "--record",
            str(out / "s.record.json"),
        ]

    clean = tmp_path / "clean"
    t0 = time.perf_counter()
    assert subprocess.run(cmd(clean), capture_output=True).returncode == 0
    duration = time.perf_counter() - t0
    rng = np.random.default_rng(11)
    for i, fraction in enumerate(rng.uniform(0.2, 0.95, size=3)):
        out = tmp_path / f"killed{i}"
        _kill_at(cmd(out), duration * fraction)
        assert subprocess.run(cmd(out), capture_output=True).returncode == 0
        _no_temporaries(out)
        for name, array in _datasets(clean / "s.h5").items():
            np.testing.assert_array_equal(
                _datasets(out / "s.h5")[name], array, err_msg=f"kill at {fraction:.2f}: {name}"
            )


def test_kill_9_during_training_then_rerun(finished, tmp_path):
    res = finished / "results" / SITE
    cfg_path = res / "config.yaml"

    def cmd(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "medflow.cli",
            "train",
            "--config",
            str(cfg_path),
            "--study",
            "wsi_demo",
            "--index",
            str(res / "index" / "wsi_demo.json"),
            "--folds",
            str(res / "folds" / "wsi_demo.json"),
            "--outer",
            "0",
            "--inner",
            "1",
            "--out-dir",
            str(out),
        ]

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    clean = tmp_path / "clean"
    t0 = time.perf_counter()
    assert subprocess.run(cmd(clean), capture_output=True, env=env).returncode == 0
    duration = time.perf_counter() - t0
    rng = np.random.default_rng(12)
    for i, fraction in enumerate(rng.uniform(0.3, 0.95, size=3)):
        out = tmp_path / f"killed{i}"
        _kill_at(cmd(out), duration * fraction, env)
        rerun = subprocess.run(cmd(out), capture_output=True, text=True, env=env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        _no_temporaries(out)
        assert model_digest(out / "model.pt") == model_digest(clean / "model.pt"), f"kill at {fraction:.2f}"

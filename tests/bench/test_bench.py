"""medflow bench: real quick measurements, and --check against ReFrame-style reference bands."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import write_config
from medflow import cli
from medflow.bench import check as bench


def _cfg_with(cfg: dict, tmp: Path, name: str, references: dict | None = None, **bench_keys) -> Path:
    cfg = copy.deepcopy(cfg)
    cfg["bench"].update(seconds=0.3, **bench_keys)
    if references is not None:
        cfg["bench"]["references"] = {"testsite": references}
    return write_config(cfg, tmp / name)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[Path, dict, dict]:
    """One real quick run (HSI chain + HDF5 loader reads) with --check and a reference set far above
    the HSI rate: the run must write its results and exit 3 naming the metric."""
    from conftest import ROOT
    from medflow.core import config as config_mod

    tmp = tmp_path_factory.mktemp("bench")
    cfg = config_mod.load(ROOT / "config.yaml")
    cfg["site"]["name"] = "testsite"
    cfg["results"] = str(tmp / "results")
    cfg_path = _cfg_with(cfg, tmp, "high.yaml", {"hsi.images_per_s": {"value": 1e9, "lower": -0.2, "upper": 0.5}})
    out = tmp / "results" / "testsite" / "bench"
    out.mkdir(parents=True)
    code = cli.main(["bench", "--config", str(cfg_path), "--out", str(out), "--quick", "--only", "hsi,hdf5", "--check"])
    files = list(out.glob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    return files[0], result, {"code": code, "cfg": cfg, "tmp": tmp}


def test_results_file(measured):
    path, result, _ = measured
    assert result["format"] == "medflow-bench/1"
    assert path.name == f"{result['site']['host']}.json"
    assert result["site"]["name"] == "testsite" and result["software"]["torch"]
    m = result["metrics"]
    assert set(m) == {"hsi.images_per_s", "hsi.mpx_per_s", "hdf5.read_mb_per_s", "hdf5.ms_per_patch"}
    assert all(v > 0 for v in m.values())
    d = result["details"]["hdf5"]
    # MB/s and ms/patch describe the same timed reads
    assert m["hdf5.read_mb_per_s"] == pytest.approx(d["patches"] * d["patch_bytes"] / d["seconds"] / 1e6)
    assert m["hdf5.ms_per_patch"] == pytest.approx(1000 * d["seconds"] / d["patches"])
    h, w = result["details"]["hsi"]["mosaic"]
    assert m["hsi.mpx_per_s"] == pytest.approx(m["hsi.images_per_s"] * h * w / 1e6)
    assert result["units"]["hdf5.ms_per_patch"] == "ms/patch"


def test_check_fails_above_measured(measured, capsys):
    _, result, ctx = measured
    assert ctx["code"] == bench.CHECK_FAILED
    verdict = result["check"]["verdicts"][0]
    assert verdict["metric"] == "hsi.images_per_s" and not verdict["ok"] and verdict["reason"] == "below reference band"


def test_check_passes_inside_band(measured, capsys):
    path, result, ctx = measured
    m = result["metrics"]
    refs = {
        "hsi.images_per_s": {"value": m["hsi.images_per_s"] * 1.1, "lower": -0.2, "upper": 0.2},
        "hdf5.ms_per_patch": {"value": m["hdf5.ms_per_patch"], "lower": -0.05, "upper": 0.05},
    }
    cfg_path = _cfg_with(ctx["cfg"], ctx["tmp"], "inside.yaml", refs)
    code = cli.main(["bench", "--config", str(cfg_path), "--check", "--from-results", str(path)])
    assert code == 0
    assert "within their bands" in capsys.readouterr().out


def test_check_names_each_failing_metric(measured, capsys):
    path, result, ctx = measured
    m = result["metrics"]
    refs = {
        "hdf5.read_mb_per_s": {"value": m["hdf5.read_mb_per_s"] * 2, "lower": -0.2},  # measured below band
        "hdf5.ms_per_patch": {"value": m["hdf5.ms_per_patch"] / 3, "upper": 0.5},  # measured above band
        "hsi.images_per_s": {"value": m["hsi.images_per_s"], "lower": -0.01, "upper": None},
        "train.resnet18.img_per_s.r1": {"value": 10.0},
    }  # not measured
    cfg_path = _cfg_with(ctx["cfg"], ctx["tmp"], "mixed.yaml", refs)
    code = cli.main(["bench", "--config", str(cfg_path), "--out", str(path), "--check", "--from-results", str(path)])
    err = capsys.readouterr().err
    assert code == bench.CHECK_FAILED
    last = err.strip().splitlines()[-1]
    for name in ("hdf5.read_mb_per_s", "hdf5.ms_per_patch", "train.resnet18.img_per_s.r1"):
        assert name in last
    assert "hsi.images_per_s" not in last
    assert "above reference band" in err and "not measured" in err


def test_bad_input(measured, tmp_path):
    _, _, ctx = measured
    cfg_path = _cfg_with(ctx["cfg"], tmp_path, "norefs.yaml")
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--config", str(cfg_path), "--out", str(out), "--only", "gpu"]) == 2
    assert cli.main(["bench", "--config", str(cfg_path), "--out", str(out), "--check", "--only", "hdf5"]) == 2
    assert not out.exists()


def test_check_band_arithmetic():
    result = {"metrics": {"a": 80.0, "b": 79.9, "c": 1000.0}}
    refs = {
        "a": {"value": 100.0, "lower": -0.2, "upper": None},
        "b": {"value": 100.0, "lower": -0.2, "upper": None},
        "c": {"value": 100.0, "lower": -0.2, "upper": 0.1},
    }
    verdicts = {v["metric"]: v for v in bench.check(result, refs)}
    assert verdicts["a"]["ok"] and not verdicts["b"]["ok"] and not verdicts["c"]["ok"]
    assert verdicts["c"]["upper"] == pytest.approx(110.0)


@pytest.mark.slow
@pytest.mark.mpi
def test_training_scaling_and_allreduce(measured, tmp_path):
    """Real 1- and 2-rank training throughput (mpiexec) and the 2-rank allreduce."""
    pytest.importorskip("torch")
    from conftest import mpi_launcher

    mpi_launcher()  # skips without an MPI launcher
    _, _, ctx = measured
    cfg_path = _cfg_with(ctx["cfg"], tmp_path, "train.yaml", models=["conv2dnet"], max_ranks=2, allreduce_mb=2.0)
    out = tmp_path / "train.json"
    assert (
        cli.main(["bench", "--config", str(cfg_path), "--out", str(out), "--quick", "--only", "train,allreduce"]) == 0
    )
    result = json.loads(out.read_text())
    assert not result["skipped"], result["skipped"]
    m = result["metrics"]
    r1, r2 = result["details"]["train"]["conv2dnet"]["r1"], result["details"]["train"]["conv2dnet"]["r2"]
    assert (r1["ranks"], r2["ranks"]) == (1, 2)
    assert m["train.conv2dnet.img_per_s.r2"] == pytest.approx(r2["steps"] * r2["batch_per_rank"] * 2 / r2["seconds"])
    assert m["train.conv2dnet.scaling_efficiency.r2"] == pytest.approx(
        m["train.conv2dnet.img_per_s.r2"] / (2 * m["train.conv2dnet.img_per_s.r1"])
    )
    assert m["allreduce.algbw_gb_per_s"] > 0 and result["details"]["allreduce"]["ranks"] == 2
    assert result["details"]["allreduce"]["bytes"] == int(2.0e6 / 4) * 4


def test_progress_over_measurement_groups(tmp_path, capsys):
    from conftest import ROOT
    from medflow.bench.run import run_bench
    from medflow.core import config as config_mod

    cfg = config_mod.load(ROOT / "config.yaml")
    cfg["progress"] = {"mode": "lines", "interval_s": 0}
    result = run_bench(cfg, ROOT / "config.yaml", ["hsi"], quick=True, progress=lambda message: None)
    assert result["metrics"]["hsi.images_per_s"] > 0
    err = capsys.readouterr().err
    assert "bench: 1/1 groups (100%)" in err and "[measuring hsi]" in err and "bench: done 1/1 groups" in err

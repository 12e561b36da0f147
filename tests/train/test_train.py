"""medflow train / select: data-parallel training jobs (real mpiexec, Horovod and DDP), resume, selection."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, fault_env, mpi_launcher, write_config
from medflow import cli
from medflow.bench.inputs import write_synthetic_cohort
from medflow.core import config as config_mod
from medflow.core import fsio
from medflow.core.index import load_index
from medflow.train import dist, models
from medflow.train import select as select_mod
from medflow.train.checkpoint import Progress
from medflow.train.evaluate import rank_slice
from medflow.train.optim import lr_at, scaled_lr
from medflow.train.splits import make_plan
from medflow.train.trainer import recalibrate_batchnorm

MEDFLOW = [sys.executable, "-m", "medflow.cli"]
PATCH = (7, 7, 6)


def _patches(rng: np.random.Generator, n: int) -> np.ndarray:
    """First half of every image is class 0, second half class 1: class 1 is brighter in 2 bands."""
    x = rng.standard_normal((n, *PATCH)).astype(np.float32)
    x[n // 2 :, :, :, :2] += 0.6
    return x.astype(np.float16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """6 patients × 1 image × 48 patches (HSI-like float16 7×7×6), fold plan 3 outer × 2 inner."""
    root = tmp_path_factory.mktemp("train")
    images = {f"img{p}": (f"P{p}", [0] * 24 + [1] * 24) for p in range(6)}
    index = write_synthetic_cohort(
        root / "data",
        images,
        ["normal", "tumour"],
        patch_shape=PATCH,
        dtype="float16",
        chunk_patches=16,
        cohort="syn",
        kind="hsi",
        make_patches=_patches,
    )
    with open(ROOT / "config.yaml") as fh:
        cfg = yaml.safe_load(fh)
    cfg["results"] = str(root / "results")
    cfg["site"]["name"] = "testsite"
    cfg["cohorts"] = {
        "syn": {"kind": "hsi", "manifest": str(root / "data" / "manifest.csv")}
    }  # not read: the index is given
    cfg["studies"] = {
        "syn": {
            "cohort": "syn",
            "model": {"name": "conv2dnet", "head_layers": [16], "dropout": 0.3},
            "train": {
                "epochs": 4,
                "batch_size": 8,
                "lr": 0.003,
                "augment": "dihedral",
                "scheduler": "cosine",
                "warmup_epochs": 1,
            },
        }
    }
    cfg["launch"] = {"backend": "ddp", "ranks": 2, "threads_per_rank": 1}
    cfg = config_mod.validate(cfg)
    plan = make_plan(load_index(index), cfg, "syn")
    fsio.write_json(root / "folds.json", plan)
    paths = {"root": root, "index": index, "folds": str(root / "folds.json"), "cfg": cfg}
    for backend in ("ddp", "horovod"):
        c = copy.deepcopy(cfg)
        c["launch"]["backend"] = backend
        paths[f"config_{backend}"] = str(write_config(c, root / f"config_{backend}.yaml"))
    return paths


def _args(cohort: dict, out_dir: Path, inner: int | None = 1, backend: str = "ddp") -> list[str]:
    args = [
        "train",
        "--config",
        cohort[f"config_{backend}"],
        "--study",
        "syn",
        "--index",
        cohort["index"],
        "--folds",
        cohort["folds"],
        "--outer",
        "0",
        "--out-dir",
        str(out_dir),
    ]
    return args + (["--inner", str(inner)] if inner is not None else [])


def _run_cli(argv: list[str], n_ranks: int = 0, env: dict | None = None, timeout: int = 240):
    cmd = ([*mpi_launcher(), "-n", str(n_ranks)] if n_ranks else []) + MEDFLOW + argv
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _assert_learned(out_dir: Path) -> dict:
    rec = json.loads((out_dir / "record.json").read_text())
    assert rec["status"] == "ok"
    curves = np.genfromtxt(out_dir / "curves.csv", delimiter=",", names=True)
    assert curves["train_loss"][-1] < curves["train_loss"][0]
    assert rec["metrics"]["val"]["oacc"] > 0.7  # two balanced classes: chance is 0.5
    assert rec["replicas"]["identical"] and len(rec["replicas"]["state_sha256"]) == rec["launch"]["ranks"]
    return rec


# ---- pure functions ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1, 0)),
        (
            {
                "OMPI_COMM_WORLD_RANK": "3",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "SLURM_PROCID": "0",
                "SLURM_STEP_ID": "0",
                "SLURM_NTASKS": "8",
            },
            (3, 4, 1),
        ),  # mpiexec inside sbatch
        (
            {
                "SLURM_PROCID": "5",
                "SLURM_STEP_ID": "2",
                "SLURM_STEP_NUM_TASKS": "6",
                "SLURM_LOCALID": "1",
                "SLURM_NTASKS": "12",
            },
            (5, 6, 1),
        ),  # srun step
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, (0, 1, 0)),  # batch script, no srun
    ],
)
def test_launcher_ranks_from_environment(env, expected):
    assert dist.launcher_ranks(env) == expected


def test_mpi_yields_only_when_node_is_oversubscribed(monkeypatch):
    monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")  # 4 ranks × (1 thread + Horovod's) = 8 cores
    assert not dist.yield_when_oversubscribed(1) and "OMPI_MCA_mpi_yield_when_idle" not in os.environ
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8")
    assert dist.yield_when_oversubscribed(1) and os.environ["OMPI_MCA_mpi_yield_when_idle"] == "1"
    monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", "0")  # the user's explicit choice wins
    dist.yield_when_oversubscribed(1)
    assert os.environ["OMPI_MCA_mpi_yield_when_idle"] == "0"


def test_lr_scaling_warmup_and_schedules():
    assert scaled_lr(0.1, 4, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 4, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 4, "none") == pytest.approx(0.1)
    tc = {"warmup_epochs": 2, "scheduler": "step", "epochs": 10, "step_size": 3, "gamma": 0.5, "restart_epochs": 4}
    assert lr_at(0.0, tc, 0.4, 0.1) == pytest.approx(0.1)
    assert lr_at(1.0, tc, 0.4, 0.1) == pytest.approx(0.25)
    assert lr_at(2.0, tc, 0.4, 0.1) == pytest.approx(0.4)
    assert lr_at(5.0, tc, 0.4, 0.1) == pytest.approx(0.2)
    cos = {**tc, "scheduler": "cosine", "warmup_epochs": 0}
    assert lr_at(5.0, cos, 0.4, 0.1) == pytest.approx(0.2)
    assert lr_at(10.0, cos, 0.4, 0.1) == pytest.approx(0.0, abs=1e-12)
    restart = {**tc, "scheduler": "cosine_restarts", "warmup_epochs": 0}
    assert lr_at(2.0, restart, 0.4, 0.1) == pytest.approx(0.2)
    assert lr_at(4.0, restart, 0.4, 0.1) == pytest.approx(0.4)


def test_early_stopping_on_validation_loss():
    p = Progress()
    losses = [1.0, 0.8, 0.9, 0.85, 0.7]
    best = [p.observe(e, v, patience=2) for e, v in enumerate(losses[:4])]
    assert best == [True, True, False, False] and p.stopped and p.best_epoch == 1 and p.epochs_done == 4
    q = Progress()
    assert all(q.observe(e, None, patience=1) for e in range(3)) and not q.stopped and q.best_epoch == 2


def test_rank_slices_partition_the_set():
    for n in (0, 1, 7, 64):
        for size in (1, 2, 3):
            parts = [rank_slice(n, r, size) for r in range(size)]
            assert np.array_equal(np.concatenate(parts), np.arange(n))


class _Batches:
    """A loader stand-in: ``batch(b)`` → (NHWC uint8, labels)."""

    def __init__(self, patches: np.ndarray, size: int):
        self.patches, self.size = patches, size

    def __len__(self) -> int:
        return -(-len(self.patches) // self.size)

    def batch(self, b: int):
        return self.patches[b * self.size : (b + 1) * self.size], None


def test_batchnorm_recalibration_is_the_exact_average_and_skips_frozen_layers():
    patches = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    model = models.build({"name": "resnet18"}, 2, 3, 32)
    seen: list[torch.Tensor] = []
    hook = model.net.conv1.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    assert recalibrate_batchnorm(model, _Batches(patches, 16), dist.Dist(), 1000) == 48
    hook.remove()
    assert torch.allclose(model.net.bn1.running_mean, torch.cat(seen).mean((0, 2, 3)), atol=1e-5)
    assert model.net.bn1.momentum == 0.1  # restored for training
    frozen = models.build({"name": "resnet18", "trainable_layers": 2}, 2, 3, 32)  # layer4[1] + head
    before = frozen.net.bn1.running_mean.clone()
    assert recalibrate_batchnorm(frozen, _Batches(patches, 16), dist.Dist(), 1000) == 48
    assert torch.equal(frozen.net.bn1.running_mean, before)  # frozen: pretrained statistics kept
    assert not torch.equal(frozen.net.layer4[1].bn2.running_mean, torch.zeros(512))
    assert recalibrate_batchnorm(model, _Batches(patches, 16), dist.Dist(), 20) == 32  # cap, whole batches


def test_choose_best_metric_ties_to_lowest_inner():
    cands = [{"inner": 0, "value": 0.8}, {"inner": 1, "value": 0.9}, {"inner": 2, "value": 0.9}]
    assert select_mod.choose(cands)["inner"] == 1
    assert select_mod.choose([{"inner": 0, "value": None}, {"inner": 1, "value": 0.1}])["inner"] == 1
    assert select_mod.choose([{"inner": 0, "value": float("nan")}, {"inner": 1, "value": None}])["inner"] == 0


# ---- single-process jobs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_run(cohort) -> Path:
    """An uninterrupted one-process run of outer 0 / inner 1 (in a subprocess: thread settings stay there)."""
    out = cohort["root"] / "single" / "inner1"
    res = _run_cli(_args(cohort, out))
    assert res.returncode == 0, res.stderr
    return out


def test_single_process_job_outputs(cohort, single_run):
    rec = _assert_learned(single_run)
    assert rec["launch"]["backend"] == "none" and rec["launch"]["ranks"] == 1
    for key in ("load_args", "prepare_train", "train", "prepare_test", "predict", "other"):
        assert rec["timings_s"][key] >= 0
    stages = [v for k, v in rec["timings_s"].items() if k != "epochs"]  # epochs: a breakdown of "train"
    assert sum(stages) == pytest.approx(rec["wall_s"], abs=1e-9)  # one clock from the start of `run`
    assert len(rec["timings_s"]["epochs"]) == rec["epochs_run"] == 4
    assert rec["throughput"]["train_img_per_s"] > 0 and rec["throughput"]["load_ms_per_patch"] > 0
    plan = json.loads(Path(cohort["folds"]).read_text())
    assert rec["patients"]["val"] == plan["outer"][0]["inner"][1]["val_patients"]
    assert rec["n_patches"]["val"] == 48 * len(rec["patients"]["val"])
    header = (single_run / "curves.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,train_acc,val_loss,val_acc,lr,epoch_s"
    model, meta = models.load_model(single_run / "model.pt")
    assert meta["class_names"] == ["normal", "tumour"] and meta["best_epoch"] == rec["best_epoch"]
    raw = torch.load(single_run / "checkpoint.pt", weights_only=True)  # the checkpoint is weights-only too
    assert raw["progress"]["epochs_done"] == 4


def test_killed_job_resumes_to_identical_weights(cohort, single_run, tmp_path):
    out = tmp_path / "inner1"
    killed = _run_cli(_args(cohort, out), env=fault_env(MEDFLOW_TEST_KILL_AFTER_EPOCH="1"))
    assert killed.returncode == -9
    assert (out / "checkpoint.pt").exists() and not (out / "record.json").exists()
    resumed = _run_cli(_args(cohort, out))
    assert resumed.returncode == 0, resumed.stderr
    rec = json.loads((out / "record.json").read_text())
    assert rec["resumed_from_epoch"] == 2 and rec["epochs_run"] == 4
    _assert_same_weights(out / "model.pt", single_run / "model.pt")
    assert (out / "curves.csv").read_text().count("\n") == 5


def test_rerun_of_finished_job_replaces_outputs_only_on_success(cohort, single_run, tmp_path):
    out = tmp_path / "job"
    shutil.copytree(single_run, out)  # the good outputs of an earlier run
    outputs = ("model.pt", "curves.csv", "record.json")  # checkpoint and TensorBoard events go on with the rerun
    before = {name: (out / name).read_bytes() for name in outputs}
    (out / "checkpoint.pt").unlink()  # so the rerun trains (and is killed) for real
    bad = _run_cli(["train", *_args(cohort, out)[1:-2], "--inner", "7"])
    assert bad.returncode == 2 and "inner fold 7" in bad.stderr
    killed = _run_cli(_args(cohort, out), env=fault_env(MEDFLOW_TEST_KILL_AFTER_EPOCH="0"))
    assert killed.returncode == -9 and (out / "checkpoint.pt").exists()
    after = {name: (out / name).read_bytes() for name in outputs}
    assert after == before  # a failed or killed rerun leaves them byte-identical
    assert not list(out.glob(".*.tmp-*"))


def test_unknown_study_is_one_line_input_error(cohort, tmp_path, capsys):
    argv = _args(cohort, tmp_path / "x")
    argv[argv.index("syn")] = "nope"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study 'nope'" in err
    assert not (tmp_path / "x").exists()


def test_select_picks_inner_model_and_tests_outer_fold(cohort, single_run, tmp_path):
    inner0 = tmp_path / "inner0"
    res = _run_cli(_args(cohort, inner0, inner=0))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "outer0"
    argv = [
        "select",
        "--config",
        cohort["config_ddp"],
        "--study",
        "syn",
        "--index",
        cohort["index"],
        "--folds",
        cohort["folds"],
        "--outer",
        "0",
        "--inner-dirs",
        str(inner0),
        str(single_run),
        "--out-dir",
        str(out),
    ]
    assert cli.main(argv) == 0
    rec = json.loads((out / "record.json").read_text())
    assert sum(rec["timings_s"].values()) == pytest.approx(rec["wall_s"], abs=1e-9)  # stages + other = wall
    assert rec["timings_s"]["load_args"] < rec["wall_s"]
    values = {c["inner"]: c["value"] for c in rec["candidates"]}
    expected = max(sorted(values), key=lambda i: (values[i], -i))
    assert rec["selected_inner"] == expected and rec["selection_metric"] == "oacc"
    plan = json.loads(Path(cohort["folds"]).read_text())
    assert rec["test_patients"] == plan["outer"][0]["test_patients"]
    pred = np.load(out / "predictions.npz")
    assert pred["y_prob"].shape == (48 * len(rec["test_patients"]), 2)
    assert set(pred["image_ids"]) == {f"img{p[1:]}" for p in rec["test_patients"]}
    assert rec["metrics"]["test"]["n"] == len(pred["y_true"]) and rec["metrics"]["test"]["oacc"] > 0.7
    assert abs(rec["metrics"]["test"]["oacc"] - float((pred["y_prob"].argmax(1) == pred["y_true"]).mean())) < 1e-12
    selected, meta = models.load_model(out / "model.pt")
    assert not selected.training and meta["selected_inner"] == rec["selected_inner"]
    source = inner0 if rec["selected_inner"] == 0 else single_run
    _assert_same_weights(out / "model.pt", source / "model.pt")


# ---- real 2-rank MPI jobs ----------------------------------------------------------------------------------
def _have_horovod() -> bool:
    return importlib.util.find_spec("horovod") is not None


BACKENDS = [
    "ddp",
    pytest.param("horovod", marks=pytest.mark.skipif(not _have_horovod(), reason="horovod not installed")),
]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_rank_job_learns_with_identical_replicas(cohort, tmp_path, backend):
    out = tmp_path / backend
    res = _run_cli(_args(cohort, out, backend=backend), n_ranks=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rec = _assert_learned(out)
    assert rec["launch"]["backend"] == backend and rec["launch"]["ranks"] == 2
    assert rec["launch"]["launcher"] == "mpiexec"
    assert rec["lr"]["peak"] == pytest.approx(2 * rec["lr"]["base"])  # linear LR scaling by world size
    # Resume: kill rank 0 after epoch 1, rerun, same final weights as the uninterrupted 2-rank run.
    resumed = tmp_path / f"{backend}-resumed"
    killed = _run_cli(
        _args(cohort, resumed, backend=backend), n_ranks=2, env=fault_env(MEDFLOW_TEST_KILL_AFTER_EPOCH="1")
    )
    assert killed.returncode != 0 and not (resumed / "record.json").exists()
    again = _run_cli(_args(cohort, resumed, backend=backend), n_ranks=2)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((resumed / "record.json").read_text())["resumed_from_epoch"] == 2
    _assert_same_weights(resumed / "model.pt", out / "model.pt")

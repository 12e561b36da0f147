"""Tracking of training jobs: TensorBoard event files (resume without duplicates), the MLflow run tree
(study → outer → inner, from concurrent jobs, against a local file store), progress lines, and that a
tracking server that is down never fails a job."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from conftest import ROOT, fault_env, write_config
from medflow.bench.inputs import write_synthetic_cohort
from medflow.core import config as config_mod
from medflow.core import fsio
from medflow.core.index import load_index
from medflow.train.splits import make_plan
from medflow.train.tensorboard_log import event_files, trim_events

MEDFLOW = [sys.executable, "-m", "medflow.cli"]
PATCH = (7, 7, 6)
EPOCHS = 4
EPOCH_TAGS = ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc")  # + perf/epoch_s (a timing)


def _patches(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, *PATCH)).astype(np.float32)
    x[n // 2 :, :, :, :2] += 0.6
    return x.astype(np.float16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """4 patients × 48 HSI-like patches, a 2 outer × 2 inner plan, conv2dnet for 4 epochs, 1 process."""
    root = tmp_path_factory.mktemp("tracking")
    images = {f"img{p}": (f"P{p}", [0] * 24 + [1] * 24) for p in range(4)}
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
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg.update(results=str(root / "results"), study_name="trackingtest")
    cfg["site"]["name"] = "testsite"
    cfg["cohorts"] = {"syn": {"kind": "hsi", "manifest": str(root / "data" / "manifest.csv")}}
    cfg["studies"] = {
        "syn": {"cohort": "syn", "model": {"name": "conv2dnet"}, "train": {"epochs": EPOCHS, "batch_size": 8}}
    }
    cfg["folds"] = {"strategy": "kfold", "outer": 2, "inner": 2, "balance": "stratified"}
    cfg["launch"] = {"backend": "ddp", "ranks": 1, "threads_per_rank": 1}
    cfg["progress"] = {"mode": "lines", "interval_s": 0}
    cfg["tracking"] = {"tensorboard": {"step_every": 2, "flush_s": 1}}
    cfg = config_mod.validate(cfg)
    fsio.write_json(root / "folds.json", make_plan(load_index(index), cfg, "syn"))
    return {"root": root, "index": index, "folds": str(root / "folds.json"), "cfg": cfg}


def _config(cohort: dict, name: str, **tracking) -> str:
    cfg = copy.deepcopy(cohort["cfg"])
    for key, value in tracking.items():
        cfg["tracking"][key].update(value)
    return str(write_config(cfg, cohort["root"] / name))


def _train(cohort: dict, config: str, out: Path, outer: int = 0, inner: int = 1, env=None, quiet=False):
    argv = ["train", "--config", config, "--study", "syn", "--index", cohort["index"], "--folds", cohort["folds"]]
    argv += ["--outer", str(outer), "--inner", str(inner), "--out-dir", str(out)] + (["--quiet"] if quiet else [])
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.Popen(
        MEDFLOW + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT
    )


def _done(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in a] == pytest.approx([v for _, v in b])


def _patches_seen(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoint.pt", weights_only=True)["progress"]["patches_seen"])


# ---- TensorBoard ---------------------------------------------------------------------------------------------
def test_trim_events_keeps_exactly_what_the_checkpoint_covers(tmp_path):
    for part in range(2):  # two writers: a first attempt and a resumed one
        with SummaryWriter(str(tmp_path)) as w:
            w.add_text("config", "x", 0)
            for epoch in range(3 * part, 3 * part + 3):
                w.add_scalar("train/loss", 1.0 / (epoch + 1), epoch)
                w.add_scalar("batch/loss", 2.0, 10 * (epoch + 1))
            w.add_scalar("model/val_oacc", 0.9, 5)
    assert len(event_files(tmp_path)) == 2
    assert trim_events(tmp_path, epochs_done=4, patches_seen=30) == {0, 1, 2, 3}
    (kept,) = event_files(tmp_path)
    acc = _events(tmp_path)
    assert [s for s, _ in _series(acc, "train/loss")] == [0, 1, 2, 3]
    assert [s for s, _ in _series(acc, "batch/loss")] == [10, 20, 30]
    assert acc.Tags()["scalars"] == ["train/loss", "batch/loss"] and acc.Tags()["tensors"] == []  # text, model/ gone
    assert trim_events(tmp_path, epochs_done=0, patches_seen=0) == set() and event_files(tmp_path) == []


@pytest.fixture(scope="module")
def uninterrupted(cohort) -> dict:
    out = cohort["root"] / "runs" / "syn" / "outer0" / "inner1"
    code, stdout, stderr = _done(_train(cohort, _config(cohort, "tb.yaml"), out))
    assert code == 0, stderr
    return {"dir": out, "stderr": stderr, "record": json.loads((out / "record.json").read_text())}


def test_every_series_hparams_config_and_progress_lines(uninterrupted):
    acc = _events(uninterrupted["dir"])
    scalars = set(acc.Tags()["scalars"])
    for tag in (*EPOCH_TAGS, "perf/epoch_s", "val/auc", "val/sensitivity", "perf/img_per_s", "perf/load_ms_per_patch"):
        assert [s for s, _ in _series(acc, tag)] == list(range(EPOCHS)), tag
    assert {"batch/loss", "batch/acc", "batch/lr", "batch/img_per_s", "model/val_oacc", "model/best_epoch"} <= scalars
    record = uninterrupted["record"]
    curves = (uninterrupted["dir"] / "curves.csv").read_text().splitlines()[1:]
    assert [v for _, v in _series(acc, "train/loss")] == pytest.approx([float(r.split(",")[1]) for r in curves])
    assert _series(acc, "model/val_oacc")[-1][1] == pytest.approx(record["metrics"]["val"]["oacc"])
    batch_steps = [s for s, _ in _series(acc, "batch/loss")]
    assert batch_steps == sorted(set(batch_steps)) and batch_steps[-1] == _patches_seen(uninterrupted["dir"])
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert set(acc.PluginTagToContent("hparams")) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    assert record["tracking"] == {"tensorboard": True, "mlflow": None}
    lines = [line for line in uninterrupted["stderr"].splitlines() if " train syn/outer0/inner1: " in line]
    assert lines and "steps (" in lines[0] and "ETA" in lines[0] and "done" in lines[-1]


def test_killed_and_resumed_job_has_each_point_once(cohort, uninterrupted, tmp_path):
    out = tmp_path / "syn" / "outer0" / "inner1"
    config = _config(cohort, "tb.yaml")
    code, _, _ = _done(_train(cohort, config, out, env=fault_env(MEDFLOW_TEST_KILL_AFTER_EPOCH="1"), quiet=True))
    assert code == -9 and not (out / "record.json").exists()
    code, _, stderr = _done(_train(cohort, config, out, quiet=True))
    assert code == 0, stderr
    assert stderr == ""  # --quiet
    resumed, whole = _events(out), _events(uninterrupted["dir"])
    for tag in EPOCH_TAGS:  # CPU training resumes bitwise: the same series, each epoch once
        _same(_series(resumed, tag), _series(whole, tag))
    assert [s for s, _ in _series(resumed, "perf/epoch_s")] == list(range(EPOCHS))
    steps = [s for s, _ in _series(resumed, "batch/loss")]
    assert steps == sorted(set(steps))  # no duplicate, nothing out of order
    resume_at = 2 * _patches_seen(uninterrupted["dir"]) // EPOCHS  # the checkpoint of epoch 1
    _same(
        [p for p in _series(resumed, "batch/loss") if p[0] > resume_at],
        [p for p in _series(whole, "batch/loss") if p[0] > resume_at],
    )
    assert set(steps) <= {s for s, _ in _series(whole, "batch/loss")}


# ---- MLflow ----------------------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_server_down_is_one_warning_not_a_failed_fold(cohort, tmp_path):
    config = _config(
        cohort, "down.yaml", tensorboard={"enabled": False}, mlflow={"uri": f"http://127.0.0.1:{_closed_port()}"}
    )
    code, _, stderr = _done(_train(cohort, config, tmp_path / "run", quiet=True))
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("medflow train: warning: MLflow")]
    assert len(warnings) == 1 and "goes on without it" in warnings[0], stderr
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "ok" and record["tracking"] == {"tensorboard": False, "mlflow": None}
    assert event_files(tmp_path / "run") == []


def _client(store: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


@pytest.mark.slow
def test_mlflow_run_tree_from_concurrent_jobs(cohort, tmp_path):
    """Four fold jobs start at once against one local file store; one of them resumes a killed attempt."""
    store = tmp_path / "mlruns"
    config = _config(cohort, "mlflow.yaml", mlflow={"uri": store.as_uri()})
    runs = tmp_path / "runs" / "syn"
    killed = _train(cohort, config, runs / "outer0" / "inner0", 0, 0, fault_env(MEDFLOW_TEST_KILL_AFTER_EPOCH="0"))
    assert _done(killed)[0] == -9
    jobs = {
        (o, i): _train(cohort, config, runs / f"outer{o}" / f"inner{i}", o, i, quiet=True)
        for o in (0, 1)
        for i in (0, 1)
    }
    for key, proc in jobs.items():
        code, _, stderr = _done(proc)
        assert code == 0 and "warning" not in stderr, (key, stderr)

    client = _client(store)
    exp = client.get_experiment_by_name("trackingtest")  # study_name
    active = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in active}
    assert sorted(by_name) == sorted(
        ["syn", "syn/outer0", "syn/outer1"] + [f"syn/outer{o}/inner{i}" for o in (0, 1) for i in (0, 1)]
    )
    assert len(active) == 7  # one study run, one run per outer fold, one per job: no duplicate parent
    parent = {name: r.data.tags.get("mlflow.parentRunId") for name, r in by_name.items()}
    assert parent["syn"] is None
    for o in (0, 1):
        assert parent[f"syn/outer{o}"] == by_name["syn"].info.run_id
        for i in (0, 1):
            run = by_name[f"syn/outer{o}/inner{i}"]
            assert parent[run.info.run_name] == by_name[f"syn/outer{o}"].info.run_id
            record = json.loads((runs / f"outer{o}" / f"inner{i}" / "record.json").read_text())
            assert record["tracking"]["mlflow"]["run_id"] == run.info.run_id
            assert run.info.status == "FINISHED"
            tags = run.data.tags
            assert tags["medflow.site"] == "testsite" and tags["medflow.host"] and "medflow.slurm_job_id" in tags
            assert tags["mlflow.source.git.commit"] == record["software"]["git"]
            assert tags["medflow.config_hash"] == record["config_hash"]
            params = run.data.params
            assert params["model.name"] == "conv2dnet" and params["train.epochs"] == str(EPOCHS)
            assert params["fold"] == f"inner{i}" and params["outer"] == str(o)
            for key in ("train/loss", "val/acc", "train/lr"):  # every epoch exactly once, the resumed run too
                history = client.get_metric_history(run.info.run_id, key)
                assert sorted(m.step for m in history) == list(range(EPOCHS)), (run.info.run_name, key)
            curves = [
                line.split(",") for line in (runs / f"outer{o}" / f"inner{i}" / "curves.csv").read_text().split()[1:]
            ]
            losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
            assert [v for _, v in losses] == pytest.approx([float(c[1]) for c in curves])
            assert run.data.metrics["model/val_oacc"] == pytest.approx(record["metrics"]["val"]["oacc"])
            assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["curves.csv", "model.pt"]
            local = Path(client.download_artifacts(run.info.run_id, "model.pt", str(tmp_path / f"dl{o}{i}")))
            assert local.read_bytes() == (runs / f"outer{o}" / f"inner{i}" / "model.pt").read_bytes()
    resumed = json.loads((runs / "outer0" / "inner0" / "record.json").read_text())
    assert resumed["resumed_from_epoch"] == 1


def test_converge_repairs_parents_that_raced(tmp_path):
    """What servers without a lock can leave behind: two outer runs of one key, jobs under either."""
    from medflow.train import mlflow_runs

    store = tmp_path / "mlruns"
    client = _client(store)
    spec = mlflow_runs.FoldRunSpec(
        uri="http://not-a-file-store",
        experiment="e",
        site="s",
        study="st",
        outer=0,
        fold="inner0",
        identity="x",
        resumed=False,
    )
    exp = mlflow_runs.ensure_experiment(client, "e")
    study = mlflow_runs.ensure_parent(client, exp, spec.study_key, "st", None, {})
    first = mlflow_runs.ensure_parent(client, exp, spec.outer_key, "st/outer0", study, {})
    raced = client.create_run(  # a concurrent job that did not see `first`
        exp, tags={mlflow_runs.KEY_TAG: mlflow_runs.key_id(spec.outer_key), "mlflow.parentRunId": study}
    ).info.run_id
    child = client.create_run(exp, tags={"mlflow.parentRunId": raced}).info.run_id
    other = client.create_run(exp, tags={"mlflow.parentRunId": raced}).info.run_id
    canonical = min(
        (client.get_run(r) for r in (first, raced)), key=lambda r: (r.info.start_time, r.info.run_id)
    ).info.run_id
    duplicate = raced if canonical == first else first
    assert mlflow_runs.converge(client, exp, spec, child) == (study, canonical)
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == canonical
    # the duplicate still has a child whose job has not finished: kept until that job converges too
    assert client.get_run(duplicate).info.lifecycle_stage == ("active" if duplicate == raced else "deleted")
    mlflow_runs.converge(client, exp, spec, other)
    assert client.get_run(other).data.tags["mlflow.parentRunId"] == canonical
    assert client.get_run(duplicate).info.lifecycle_stage == "deleted"
    assert [r.info.run_id for r in mlflow_runs.find_runs(client, exp, spec.outer_key)] == [canonical]


def test_a_failing_tracker_warns_once_and_the_job_goes_on(capsys):
    from medflow.train import tracking

    class Broken:
        aborted = 0

        def step(self, *args):
            raise RuntimeError("disk on fire")

        def _abort(self):
            Broken.aborted += 1

    guarded = tracking.Guarded(Broken())
    for _ in range(3):
        guarded.step(16, 0.5, 8.0, 1e-3)  # never raises
    record: dict = {}
    guarded.finish(record, Path("model.pt"))
    assert record["tracking"] == {"tensorboard": False, "mlflow": None}
    err = capsys.readouterr().err
    assert err.count("medflow train: warning: tracking failed (RuntimeError: disk on fire)") == 1
    assert Broken.aborted == 1  # event files closed, MLflow run ended once

"""Extraction in batches (``<kind>.images_per_job``): one job, one shard and one record per image, each atomic;
the same shards as one job per image; the index reads batch records; 30,000 slides plan ≤ 700 jobs."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import ROOT, VENV_BIN, write_config
from hsi_cohorts import make_mosaic_cohort
from medflow import cli
from medflow.bench.inputs import write_placeholder_cohort
from medflow.core import config as config_mod
from medflow.extract import batches, job
from medflow.extract.index import expand_batches


def test_split_names_and_sizes():
    got = batches.split(list(range(7)), 3)
    assert list(got) == ["b000000", "b000001", "b000002"]
    assert [len(v) for v in got.values()] == [3, 3, 1] and sum(got.values(), ()) == tuple(range(7))
    assert all(re.fullmatch(batches.NAME_PATTERN, name) for name in got)
    assert batches.jobs_needed(30_000, 50) == 600 and batches.jobs_needed(7, 3) == 3
    with pytest.raises(ValueError):
        batches.split([1], 0)


def test_images_per_job_never_changes_a_shards_config_hash(default_cfg):
    one = job.config_hash(default_cfg, "wsi", "wsi_demo")
    many = copy.deepcopy(default_cfg)
    many["wsi"]["images_per_job"] = 50
    assert job.config_hash(many, "wsi", "wsi_demo") == one
    # ...and equals the hash of the config as it was before the key existed (wsi.stain never counts:
    # a shard depends on the stain reference's digest, an input of its own).
    legacy = copy.deepcopy(default_cfg)
    del legacy["wsi"]["images_per_job"], legacy["wsi"]["stain"]
    assert config_mod.section_hash(legacy, *job.config_sections("wsi", "wsi_demo")) == one
    many["wsi"]["patch_size"] = 128  # what a shard holds still counts
    assert job.config_hash(many, "wsi", "wsi_demo") != one


@pytest.fixture
def hsi_batch(default_cfg, tmp_path):
    manifest = make_mosaic_cohort(tmp_path / "cohort", n_images=3)
    cfg = copy.deepcopy(default_cfg)
    cfg["cohorts"] = {"c": {"kind": "hsi", "manifest": str(manifest)}}
    cfg["hsi"].update(per_class=0, images_per_job=2)
    return cfg, write_config(cfg, tmp_path / "cfg.yaml"), tmp_path


def _batch(cfg_path: Path, out: Path, images: str, record: Path) -> int:
    argv = ["extract-batch", "--config", str(cfg_path), "--cohort", "c", "--images", images]
    return cli.main([*argv, "--out-dir", str(out), "--record", str(record)])


def _arrays(shard: Path) -> dict:
    with h5py.File(shard, "r") as h5:
        return {k: h5[k][()] for k in ("patches", "labels", "coords")} | {"hash": h5.attrs["config_hash"]}


def test_a_batch_writes_the_shards_and_records_of_one_job_per_image(hsi_batch):
    cfg, cfg_path, tmp = hsi_batch
    out, single = tmp / "shards", tmp / "single"
    assert _batch(cfg_path, out, "img0,img2", out / "batches" / "b000000.json") == 0
    batch = json.loads((out / "batches" / "b000000.json").read_text())
    assert batch["format"] == batches.BATCH_FORMAT and batch["status"] == "ok" and batch["n_images"] == 2
    assert [i["image_id"] for i in batch["images"]] == ["img0", "img2"]
    assert [i["record"] for i in batch["images"]] == ["../img0.record.json", "../img2.record.json"]
    assert not (out / "img1.h5").exists()
    for image_id in ("img0", "img2"):
        argv = ["extract-hsi", "--config", str(cfg_path), "--cohort", "c", "--image-id", image_id]
        rec = single / f"{image_id}.record.json"
        assert cli.main([*argv, "--out", str(single / f"{image_id}.h5"), "--record", str(rec)]) == 0
        a, b = _arrays(out / f"{image_id}.h5"), _arrays(single / f"{image_id}.h5")
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{image_id}:{key}")
        batch_rec, single_rec = json.loads((out / f"{image_id}.record.json").read_text()), json.loads(rec.read_text())
        assert batch_rec["job"] == single_rec["job"] == "extract-hsi"
        assert batch_rec["n_patches"] == single_rec["n_patches"] > 0
        assert batch_rec["config_hash"] == single_rec["config_hash"]
    # The index reads the batch record in place of the records it lists.
    assert expand_batches([str(out / "batches" / "b000000.json")]) == [
        out / "img0.record.json",
        out / "img2.record.json",
    ]
    index = tmp / "index.json"
    argv = ["index", "--config", str(cfg_path), "--cohort", "c", "--out", str(index)]
    assert cli.main([*argv, str(out / "batches" / "b000000.json")]) == 0
    assert sorted(s["image_id"] for s in json.loads(index.read_text())["shards"]) == ["img0", "img2"]
    # A record listed by a batch but gone: one line naming it, exit 2.
    (out / "img2.record.json").unlink()
    assert cli.main([*argv, str(out / "batches" / "b000000.json")]) == 2


def test_a_bad_image_stops_the_batch_and_keeps_the_finished_images(hsi_batch, capsys):
    cfg, cfg_path, tmp = hsi_batch
    out, record = tmp / "shards", tmp / "shards" / "batches" / "b000000.json"
    bad = Path(cfg["cohorts"]["c"]["manifest"]).parent / "img1" / "raw.npy"
    good = bad.read_bytes()
    bad.write_bytes(b"not an array")
    assert _batch(cfg_path, out, "img0,img1,img2", record) == 2  # on_error: fail
    assert "img1" in capsys.readouterr().err
    assert (out / "img0.h5").is_file() and (out / "img0.record.json").is_file()  # finished before the failure
    assert not (out / "img1.h5").exists() and not (out / "img2.h5").exists() and not record.exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    # The rerun (input fixed) reuses img0 as up to date and completes the batch.
    mtime = (out / "img0.h5").stat().st_mtime_ns
    bad.write_bytes(good)
    assert _batch(cfg_path, out, "img0,img1,img2", record) == 0
    assert (out / "img0.h5").stat().st_mtime_ns == mtime
    assert [i["status"] for i in json.loads(record.read_text())["images"]] == ["ok", "ok", "ok"]
    # on_error: skip: a failed record for the bad image, the batch completes.
    bad.write_bytes(b"not an array")
    cfg["hsi"]["on_error"] = "skip"
    write_config(cfg, cfg_path)
    assert _batch(cfg_path, out, "img0,img1,img2", record) == 0
    batch = json.loads(record.read_text())
    assert [i["status"] for i in batch["images"]] == ["ok", "failed", "ok"] and batch["n_failed"] == 1
    assert not (out / "img1.h5").exists()  # the earlier shard of img1 does not survive next to a failed record


def _dry_run(workdir: Path, config: Path) -> subprocess.CompletedProcess:
    cmd = [
        str(VENV_BIN / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "--configfile",
        str(config),
        "-n",
        "--cores",
        "1",
    ]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*cmd, "-d", str(workdir)], capture_output=True, text=True, timeout=600, env=env)


def job_counts(log: str) -> dict[str, int]:
    """Snakemake's job stats table of a dry run: rule → count."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", log, re.M)}


@pytest.mark.slow
def test_30000_slides_in_batches_of_50_plan_at_most_700_extraction_jobs(tmp_path):
    manifest = write_placeholder_cohort(tmp_path / "cohort", 30_000)
    cfg = {
        "results": str(tmp_path / "results"),
        "site": {"name": "dry"},
        "cohorts": {"big": {"kind": "wsi", "manifest": str(manifest)}},
        "studies": {"big": {"cohort": "big"}},
        "wsi": {"images_per_job": 50},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = _dry_run(tmp_path / "work", config)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["extract_wsi"] == 600 <= 700 and counts["index"] == 1
    assert counts["extract_wsi"] < 1000  # one SLURM array (MaxArraySize 1001 by default)
    assert not (tmp_path / "results").exists()  # a dry run writes nothing

"""Stain handling in training: HED jitter (medflow.train.stain_jitter), the loader's normalisation and
jitter, stain checks (medflow.train.stain_setup), and real train/select jobs with a load-time normaliser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, fault_env, write_config
from medflow.bench.inputs import write_synthetic_cohort
from medflow.core import config as config_mod
from medflow.core import fsio
from medflow.core.errors import InputError
from medflow.core.index import load_index
from medflow.extract.wsi import colour, stain
from medflow.extract.wsi.stain_reference import STAIN_FORMAT
from medflow.train import models, stain_setup
from medflow.train.inputs import FoldJob
from medflow.train.loader import EpochLoader
from medflow.train.patchset import PatchSet
from medflow.train.splits import make_plan
from medflow.train.stain_jitter import draw, hed_jitter

MEDFLOW = [sys.executable, "-m", "medflow.cli"]
REINHARD_TARGET = {"mean": [58.3, 41.3, -22.0], "std": [16.3, 9.0, 6.7]}  # PROCESS's target (Gertych et al.), CIE units


def _he_patches(rng: np.random.Generator, n: int, size: int = 16) -> np.ndarray:
    """Pinkish-purple noise: class 1 (second half) darker, so a small net can learn it."""
    base = np.array([200, 120, 180], np.float64)
    x = base + rng.normal(0, 18, (n, size, size, 3))
    x[n // 2 :] -= 45
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ---- HED jitter -------------------------------------------------------------------------------------
def test_jitter_draws_are_within_their_ranges() -> None:
    p = draw(np.random.default_rng(0), 1000, 0.2, 0.05)
    assert p.shape == (1000, 6) and p.dtype == np.float32
    assert 0.8 <= p[:, :3].min() and p[:, :3].max() <= 1.2 and np.abs(p[:, 3:]).max() <= 0.05
    assert p[:, :3].std() > 0.1  # spread over the range, per patch and stain


def test_hed_jitter_identity_and_a_pure_haematoxylin_scale() -> None:
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    identity = np.tile(np.array([1, 1, 1, 0, 0, 0], np.float32), (4, 1))
    np.testing.assert_array_equal(hed_jitter(batch, identity), batch)
    # A pure-haematoxylin image of amount s: intensity exp(ln(1e-6)·s·h) per channel (h: the H row).
    s = np.linspace(0.02, 0.3, 256)
    h = colour.RGB_FROM_HED[0]
    pure = np.rint(255 * np.exp(colour.HED_LOG_ADJUST * s[:, None] * h)).astype(np.uint8).reshape(1, 16, 16, 3)
    alpha_h = np.array([[1.3, 1, 1, 0.01, 0, 0]], np.float32)
    expected = 255 * np.exp(colour.HED_LOG_ADJUST * (1.3 * s[:, None] + 0.01) * h)
    got = hed_jitter(pure, alpha_h).reshape(-1, 3)
    # The input was rounded to uint8 first: the recovered amounts differ from s by that rounding only.
    assert np.abs(got - expected).max() <= 2.0 and np.abs(got - expected).mean() < 0.6


# ---- the loader ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rgb_cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rgb")
    images = {f"img{p}": (f"P{p}", [0] * 20 + [1] * 20) for p in range(6)}
    index = write_synthetic_cohort(
        root,
        images,
        ["normal", "tumour"],
        patch_shape=(16, 16, 3),
        chunk_patches=8,
        cohort="syn",
        make_patches=_he_patches,
    )
    return {"root": root, "index_path": index, "index": load_index(index)}


def _raw(pset: PatchSet) -> np.ndarray:
    parts = []
    for shard in pset.shards:
        with h5py.File(shard["path"], "r") as h5:
            parts.append(h5["patches"][:])
    return np.concatenate(parts)


def _batches(loader, epoch: int) -> list[np.ndarray]:
    loader.set_epoch(epoch)
    return [x.numpy().copy() for x, _ in loader]


def test_loader_jitter_is_seeded_per_epoch_and_applied_per_planned_patch(rgb_cohort) -> None:
    pset = PatchSet(rgb_cohort["index"], ["P0", "P1", "P2"])
    loader = EpochLoader(pset, batch_size=8, seed=3, augment="none", jitter=(0.1, 0.05))
    plain = EpochLoader(PatchSet(rgb_cohort["index"], ["P0", "P1", "P2"]), batch_size=8, seed=3, augment="none")
    first = _batches(loader, 0)
    np.testing.assert_array_equal(loader.rank_indices(), plain.rank_indices())  # the plan ignores jitter
    raw = _raw(pset)
    expected = hed_jitter(raw[loader.rank_indices()], loader._jitter)
    np.testing.assert_array_equal(np.concatenate(first), expected)
    assert not np.array_equal(np.concatenate(first), np.concatenate(_batches(plain, 0)))
    second = _batches(loader, 1)
    again = EpochLoader(PatchSet(rgb_cohort["index"], ["P0", "P1", "P2"]), batch_size=8, seed=3, jitter=(0.1, 0.05))
    for epoch, want in ((1, second), (0, first)):  # a fresh loader (a resumed job) at any epoch: the same
        for a, b in zip(_batches(again, epoch), want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))


def test_loader_workers_give_the_same_normalised_jittered_batches(rgb_cohort) -> None:
    norm = stain.make("reinhard", {}, REINHARD_TARGET)
    kw = {"batch_size": 8, "seed": 5, "augment": "dihedral", "stain": norm, "jitter": (0.05, 0.05)}
    single = EpochLoader(PatchSet(rgb_cohort["index"], ["P3", "P4"]), **kw)
    forked = EpochLoader(PatchSet(rgb_cohort["index"], ["P3", "P4"]), workers=2, **kw)
    for a, b in zip(_batches(single, 2), _batches(forked, 2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loader_normalises_every_batch_with_the_normaliser(rgb_cohort) -> None:
    pset = PatchSet(rgb_cohort["index"], ["P5"])
    norm = stain.make(
        "macenko", {}, {"stain_matrix": [[0.56, 0.22], [0.72, 0.80], [0.41, 0.56]], "max_concentrations": [1.9, 1.0]}
    )
    loader = EpochLoader(pset, batch_size=8, shuffle=False, stain=norm)
    got = np.concatenate(_batches(loader, 0))
    np.testing.assert_array_equal(got, norm.apply(_raw(pset)))
    assert loader.stats["stain_s"] > 0
    with pytest.raises(ValueError, match="uint8 RGB"):
        EpochLoader(_float_set(rgb_cohort["root"]), batch_size=4, stain=norm)


def _float_set(root: Path) -> PatchSet:
    index = write_synthetic_cohort(
        root / "float", {"f": ("F", [0, 1] * 4)}, ["a", "b"], patch_shape=(4, 4, 3), dtype="float32"
    )
    return PatchSet(load_index(index), ["F"])


# ---- checks of what shards hold -----------------------------------------------------------------------
def _fold_job(cfg: dict, index: dict, tmp: Path, study_train: dict | None = None) -> FoldJob:
    study = {"cohort": index["cohort"], "model": {"name": "resnet18"}, "train": study_train or {}}
    cfg = config_mod.validate({**cfg, "studies": {"syn": study}})
    patients = {"train": ["P0"], "val": ["P1"]}
    return FoldJob(cfg, "syn", cfg["studies"]["syn"], index, {}, 0, 0, patients, tmp, {"data_digest": "0" * 64})


def _reference(tmp: Path, norm: stain.StainNormaliser, cohort: str = "syn") -> Path:
    path = tmp / f"stain-{norm.digest}.json"
    fsio.write_json(
        path, {"format": STAIN_FORMAT, "job": "fit-stain", "status": "ok", "cohort": cohort, **norm.record()}
    )
    return path


def test_training_stain_setup_by_config(rgb_cohort, default_cfg, tmp_path) -> None:
    index = rgb_cohort["index"]
    cfg = {**default_cfg, "wsi": {**default_cfg["wsi"], "stain": {"method": "reinhard", "apply": "load"}}}
    cfg = config_mod.validate(cfg)
    norm = stain.make("reinhard", cfg["wsi"]["stain"]["reinhard"], REINHARD_TARGET)
    ref = _reference(tmp_path, norm)
    ts = stain_setup.for_training(_fold_job(cfg, index, tmp_path, {"hed_jitter": {}}), ref)
    assert ts.normaliser is not None and ts.normaliser.digest == norm.digest and ts.jitter == (0.05, 0.05)
    assert ts.record == norm.record(applied="load", reference=str(ref)) and ts.identity == f"load:{norm.digest}"
    with pytest.raises(InputError, match="give the cohort's stain reference"):
        stain_setup.for_training(_fold_job(cfg, index, tmp_path), None)
    # Applied at extraction: these raw shards are refused, naming the first shard.
    at_extraction = config_mod.validate(
        {**cfg, "wsi": {**cfg["wsi"], "stain": {**cfg["wsi"]["stain"], "apply": "extraction"}}}
    )
    with pytest.raises(InputError, match=f"{index['shards'][0]['path']}: patches are raw"):
        stain_setup.for_training(_fold_job(at_extraction, index, tmp_path), ref)
    # A reference of other parameters is stale.
    other = _reference(tmp_path, stain.make("reinhard", {"background": 255}, REINHARD_TARGET))
    with pytest.raises(InputError, match="rerun medflow fit-stain"):
        stain_setup.for_training(_fold_job(cfg, index, tmp_path), other)
    # Off: no reference may be given; jitter alone is fine.
    off = stain_setup.for_training(
        _fold_job(default_cfg, index, tmp_path, {"hed_jitter": {"scale": 0.2, "bias": 0.0}}), None
    )
    assert off.normaliser is None and off.record is None and off.jitter == (0.2, 0.0)
    with pytest.raises(InputError, match="wsi.stain.method is none"):
        stain_setup.for_training(_fold_job(default_cfg, index, tmp_path), ref)


def test_model_meta_tells_prediction_which_normaliser_to_apply(tmp_path) -> None:
    norm = stain.make("reinhard", {}, REINHARD_TARGET)
    assert stain_setup.for_slide_pixels({}, "m.pt") is None and stain_setup.for_shard_patches({}, "m.pt") is None
    at_load = {"stain": norm.record(applied="load", reference="r.json")}
    at_extraction = {"stain": norm.record(applied="extraction", reference="r.json")}
    assert stain_setup.for_slide_pixels(at_load, "m.pt").digest == norm.digest
    assert stain_setup.for_slide_pixels(at_extraction, "m.pt").digest == norm.digest  # slide tiles are raw
    assert stain_setup.for_shard_patches(at_load, "m.pt").digest == norm.digest
    assert stain_setup.for_shard_patches(at_extraction, "m.pt") is None  # shards are normalised already
    broken = {"stain": {**at_load["stain"], "digest": "0" * 16}}
    with pytest.raises(InputError, match="m.pt: stain normaliser digest"):
        stain_setup.for_slide_pixels(broken, "m.pt")


# ---- real train / select jobs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stain_job(rgb_cohort, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stainjob")
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg.update(results=str(root / "results"), site={"name": "testsite"})
    cfg["cohorts"] = {"syn": {"kind": "wsi", "manifest": str(root / "unused.csv")}}
    cfg["wsi"]["stain"] = {"method": "reinhard", "apply": "load"}
    cfg["studies"] = {
        "syn": {
            "cohort": "syn",
            "model": {"name": "conv2dnet"},  # small and quick; it takes any channel count
            "train": {"epochs": 3, "batch_size": 8, "lr": 0.003, "augment": "dihedral", "hed_jitter": {"scale": 0.1}},
        }
    }
    cfg["launch"] = {"backend": "ddp", "ranks": 1, "threads_per_rank": 1}
    cfg = config_mod.validate(cfg)
    fsio.write_json(root / "folds.json", make_plan(rgb_cohort["index"], cfg, "syn"))
    norm = stain.make("reinhard", cfg["wsi"]["stain"]["reinhard"], REINHARD_TARGET)
    return {
        "root": root,
        "config": str(write_config(cfg, root / "config.yaml")),
        "index": rgb_cohort["index_path"],
        "folds": str(root / "folds.json"),
        "stain": str(_reference(root, norm)),
        "norm": norm,
    }


def _run(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(MEDFLOW + argv, capture_output=True, text=True, timeout=300, env=full_env, cwd=ROOT)


def _train_args(job: dict, out: Path) -> list[str]:
    argv = ["train", "--config", job["config"], "--study", "syn", "--index", job["index"], "--folds", job["folds"]]
    return argv + ["--outer", "0", "--inner", "0", "--out-dir", str(out), "--stain", job["stain"]]


def test_train_with_load_time_normalisation_and_jitter_resumes_bitwise_and_select_applies_it(stain_job) -> None:
    root = stain_job["root"]
    done = _run(_train_args(stain_job, root / "inner0"))
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads((root / "inner0" / "record.json").read_text())
    norm = stain_job["norm"]
    assert rec["stain"]["digest"] == norm.digest and rec["stain"]["applied"] == "load"
    assert rec["stain"]["hed_jitter"] == [0.1, 0.05]
    _, meta = models.load_model(root / "inner0" / "model.pt")
    assert meta["stain"] == norm.record(applied="load", reference=stain_job["stain"])
    # Killed after epoch 0 and rerun: the same weights (the jitter of every epoch comes from the seed).
    resumed = root / "resumed"
    killed = _run(_train_args(stain_job, resumed), env=fault_env(MEDFLOW_TEST_KILL_AFTER_EPOCH="0"))
    assert killed.returncode == -9
    again = _run(_train_args(stain_job, resumed))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((resumed / "record.json").read_text())["resumed_from_epoch"] == 1
    a = torch.load(root / "inner0" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Select tests the model on normalised test patches and keeps the normaliser in its model file.
    out = root / "outer0"
    argv = ["select", "--config", stain_job["config"], "--study", "syn", "--index", stain_job["index"]]
    argv += ["--folds", stain_job["folds"], "--outer", "0", "--inner-dirs", str(root / "inner0"), "--out-dir", str(out)]
    sel = _run(argv)
    assert sel.returncode == 0, sel.stderr[-3000:]
    model, meta = models.load_model(out / "model.pt")
    assert meta["stain"]["digest"] == norm.digest
    pred = np.load(out / "predictions.npz")
    plan = json.loads(Path(stain_job["folds"]).read_text())
    pset = PatchSet(load_index(stain_job["index"]), plan["outer"][0]["test_patients"])
    with torch.no_grad():
        direct = models.predict_proba(model, torch.from_numpy(norm.apply(_raw(pset)))).numpy()
    np.testing.assert_allclose(pred["y_prob"], direct, atol=1e-5)
    with torch.no_grad():
        unnormalised = models.predict_proba(model, torch.from_numpy(_raw(pset))).numpy()
    assert np.abs(pred["y_prob"] - unnormalised).max() > 1e-3  # the normaliser really was applied

"""Fold plans: patient-disjoint for every (outer, inner) pair, stable under the same seed,
balanced/stratified objectives reach their targets, errors name the input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_config
from medflow import cli
from medflow.bench import inputs as data
from medflow.core.errors import InputError
from medflow.train import splits

CLASSES = ["normal", "stroma", "tumour"]


def fake_index(sizes: list[list[int]], images_per_patient: int = 1) -> dict:
    """An in-memory cohort index: patient i has patch counts sizes[i] per class (split over images)."""
    shards = []
    for p, counts in enumerate(sizes):
        for im in range(images_per_patient):
            part = {
                c: int(n) // images_per_patient + (im < int(n) % images_per_patient) for c, n in zip(CLASSES, counts)
            }
            shards.append(
                {
                    "patient_id": f"P{p:02d}",
                    "image_id": f"P{p:02d}_{im}",
                    "n": sum(part.values()),
                    "counts": part,
                    "sha256": f"{p}-{im}",
                    "path": f"/x/{p}_{im}.h5",
                }
            )
    return {"format": "medflow-index/1", "cohort": "demo", "class_names": CLASSES, "shards": shards}


def random_sizes(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 120, size=(n, 3)) * (rng.random((n, 3)) < 0.7)).tolist()


def cfg_for(
    strategy: str = "kfold", outer: int = 5, inner: int = 3, balance: str = "stratified", seed: int = 7
) -> dict:
    return {
        "seed": seed,
        "folds": {"strategy": strategy, "outer": outer, "inner": inner, "balance": balance},
        "studies": {"s": {"cohort": "demo"}},
    }


def assert_patient_disjoint(plan: dict) -> None:
    everyone = set(plan["patients"])
    tested = []
    for i, o in enumerate(plan["outer"]):
        outer_split = splits.fold_patients(plan, i, None)
        assert outer_split["val"] == []
        assert not set(outer_split["train"]) & set(outer_split["test"])
        assert set(outer_split["train"]) | set(outer_split["test"]) == everyone
        tested += outer_split["test"]
        vals = []
        for j in range(len(o["inner"])):
            f = splits.fold_patients(plan, i, j)
            tr, va, te = set(f["train"]), set(f["val"]), set(f["test"])
            assert tr and va and te
            assert not (tr & va) and not (tr & te) and not (va & te)
            assert tr | va == set(outer_split["train"])
            vals += f["val"]
        assert sorted(vals) == sorted(outer_split["train"])  # inner val folds partition the train set
    assert sorted(tested) == sorted(everyone)  # outer test folds partition the cohort


@pytest.mark.parametrize("balance", ["stratified", "balanced"])
@pytest.mark.parametrize("n_patients", [6, 13, 40])
def test_kfold_plan_disjoint_for_every_pair(balance: str, n_patients: int) -> None:
    plan = splits.make_plan(
        fake_index(random_sizes(n_patients, n_patients), 2),
        cfg_for(outer=5 if n_patients > 6 else 3, inner=2, balance=balance),
        "s",
    )
    assert plan["format"] == "medflow-folds/1" and plan["balance"] == balance
    assert len(plan["outer"]) == plan["k_outer"] and all(len(o["inner"]) == 2 for o in plan["outer"])
    assert_patient_disjoint(plan)
    assert sum(o["shares"]["patches"] for o in plan["outer"]) == pytest.approx(1.0, abs=1e-5)
    assert sum(o["shares"]["patients"] for o in plan["outer"]) == pytest.approx(1.0, abs=1e-5)


def test_lopo_plan() -> None:
    plan = splits.make_plan(fake_index(random_sizes(7, 1)), cfg_for("lopo", inner=3), "s")
    assert plan["strategy"] == "lopo" and plan["k_outer"] == 7
    assert [o["test_patients"] for o in plan["outer"]] == [[p] for p in plan["patients"]]
    assert_patient_disjoint(plan)


def test_same_seed_same_plan_other_seed_differs() -> None:
    index = fake_index(random_sizes(30, 3))
    a = json.dumps(splits.make_plan(index, cfg_for(seed=1), "s"))
    b = json.dumps(splits.make_plan(index, cfg_for(seed=1), "s"))
    c = json.dumps(splits.make_plan(index, cfg_for(seed=2), "s"))
    assert a == b
    assert a != c


def test_balanced_reaches_exact_partition_when_one_exists() -> None:
    """Sizes that admit a perfect 2-way split in patches and patients: balanced finds it."""
    sizes = [[n, 0, 0] for n in (50, 50, 40, 40, 30, 30, 20, 20, 10, 10)]
    plan = splits.make_plan(fake_index(sizes), cfg_for(outer=2, inner=2, balance="balanced"), "s")
    dev = plan["deviation"]["max_abs_outer"]
    assert dev["patches"] == 0 and dev["patients"] == 0


def test_stratified_balances_labels_better_than_chance() -> None:
    """Label-skewed patients: the stratified plan's per-label share deviation beats random splits."""
    rng = np.random.default_rng(5)
    sizes = [
        [int(rng.integers(50, 100)) if (p % 3) == c else int(rng.integers(0, 10)) for c in range(3)] for p in range(30)
    ]
    index = fake_index(sizes)
    plan = splits.make_plan(index, cfg_for(outer=5, inner=2), "s")
    ours = plan["deviation"]["max_abs_outer"]["labels"]
    patients, counts, _ = splits.patient_counts(index)
    random_devs = []
    for s in range(20):
        fold = np.random.default_rng(s).permutation(np.arange(30) % 5)
        share = np.stack([counts[fold == f].sum(0) for f in range(5)]) / counts.sum(0)
        random_devs.append(np.abs(share - 0.2).max())
    assert ours < 0.05 < np.median(random_devs)


def test_deviation_reported_per_fold() -> None:
    plan = splits.make_plan(fake_index(random_sizes(12, 4)), cfg_for(outer=3, inner=2, balance="balanced"), "s")
    dev = plan["deviation"]
    assert len(dev["outer"]) == 3 and len(dev["inner"]) == 3 and len(dev["inner"][0]) == 2
    o = plan["outer"][1]
    assert dev["outer"][1]["patches"] == pytest.approx(o["shares"]["patches"] - 1 / 3, abs=1e-5)
    assert set(dev["outer"][1]["labels"]) == set(CLASSES)


def test_too_few_patients_is_input_error() -> None:
    with pytest.raises(InputError, match="3 patients cannot fill 5 outer folds"):
        splits.make_plan(fake_index(random_sizes(3, 0)), cfg_for(outer=5), "s", source="idx.json")
    with pytest.raises(InputError, match="too few for 5 inner folds"):
        splits.make_plan(fake_index(random_sizes(6, 0)), cfg_for(outer=3, inner=5), "s")


def test_load_plan_rejects_overlapping_splits(tmp_path: Path) -> None:
    plan = splits.make_plan(fake_index(random_sizes(8, 2)), cfg_for(outer=4, inner=2), "s")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(plan))
    assert splits.load_plan(good) == plan
    leaked = json.loads(json.dumps(plan))
    leaked["outer"][0]["inner"][1]["train_patients"].append(leaked["outer"][0]["test_patients"][0])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(leaked))
    with pytest.raises(InputError, match="share patients") as err:
        splits.load_plan(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(InputError):
        splits.fold_patients(plan, 9, None)


def test_check_index_detects_a_stale_plan() -> None:
    index = fake_index(random_sizes(8, 2))
    plan = splits.make_plan(index, cfg_for(outer=4, inner=2), "s")
    splits.check_index(plan, index)
    index["shards"][0]["counts"]["tumour"] += 1  # a re-extracted slide
    with pytest.raises(InputError, match="different cohort index"):
        splits.check_index(plan, index, source="idx.json")


# ---- CLI on a real cohort index (shards written with ShardWriter) -------------------------------
@pytest.fixture(scope="module")
def index_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(0)
    images = {f"img{i}": (f"pat{i % 7}", rng.integers(0, 2, size=int(rng.integers(5, 30))).tolist()) for i in range(10)}
    return data.write_synthetic_cohort(
        tmp_path_factory.mktemp("c"), images, ["normal", "tumour"], patch_shape=(4, 4, 3), cohort="wsi_demo"
    )


def test_cli_plan_folds_byte_identical(default_cfg: dict, tmp_path: Path, index_path: str) -> None:
    cfg_path = write_config(default_cfg, tmp_path / "config.yaml")
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        rc = cli.main(
            ["plan-folds", "--config", str(cfg_path), "--study", "wsi_demo", "--index", index_path, "--out", str(out)]
        )
        assert rc == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    plan = splits.load_plan(outs[0])
    assert plan["k_outer"] == default_cfg["folds"]["outer"] and plan["seed"] == default_cfg["seed"]
    assert len(plan["patients"]) == 7
    assert_patient_disjoint(plan)


def test_cli_errors_exit_2_and_write_nothing(
    default_cfg: dict, tmp_path: Path, index_path: str, capsys: pytest.CaptureFixture
) -> None:
    default_cfg["folds"]["outer"] = 9
    cfg_path = write_config(default_cfg, tmp_path / "config.yaml")
    out = tmp_path / "plan.json"
    rc = cli.main(
        ["plan-folds", "--config", str(cfg_path), "--study", "wsi_demo", "--index", index_path, "--out", str(out)]
    )
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert index_path in err and "7 patients cannot fill 9 outer folds" in err
    rc = cli.main(
        ["plan-folds", "--config", str(cfg_path), "--study", "nope", "--index", index_path, "--out", str(out)]
    )
    assert rc == 2 and not out.exists()
    rc = cli.main(
        ["plan-folds", "--config", str(cfg_path), "--study", "hsi_demo", "--index", index_path, "--out", str(out)]
    )
    assert rc == 2 and "uses cohort" in capsys.readouterr().err
    assert list(tmp_path.glob("*.json")) == []

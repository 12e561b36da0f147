"""Config validation: the schema rejects typos naming the key, fills defaults, hashes only what a stage reads."""

from __future__ import annotations

import copy
import subprocess

import pytest
import yaml

from conftest import ROOT, VENV_BIN, write_config
from medflow import cli
from medflow.core import config as config_mod
from medflow.core.errors import InputError


def raw_default() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid_and_defaults_are_filled():
    cfg = config_mod.validate(raw_default())
    assert cfg["wsi"]["patch_size"] == 224
    assert cfg["wsi"]["quality"]["max_white"] == pytest.approx(0.6)  # nested default
    assert cfg["wsi"]["on_error"] == "fail"  # default behind a $ref
    assert cfg["studies"]["wsi_demo"]["train"]["scheduler"] == "none"  # default inside a study
    assert cfg["studies"]["hsi_demo"]["model"]["name"] == "conv2dnet"


@pytest.mark.parametrize("section, typo", [("wsi", "pach_size"), ("folds", "outter"), (None, "sed")])
def test_unknown_key_is_rejected_naming_it(section, typo):
    cfg = raw_default()
    (cfg[section] if section else cfg)[typo] = 1
    with pytest.raises(InputError) as err:
        config_mod.validate(cfg, "my.yaml")
    assert typo in str(err.value) and "my.yaml" in str(err.value)


def test_wrong_type_names_the_key_path():
    cfg = raw_default()
    cfg["studies"]["wsi_demo"]["train"]["epochs"] = "many"
    with pytest.raises(InputError, match=r"studies\.wsi_demo\.train\.epochs"):
        config_mod.validate(cfg)


def test_section_hash_tracks_only_its_sections():
    a = config_mod.validate(raw_default())
    b = copy.deepcopy(a)
    b["studies"]["wsi_demo"]["train"]["epochs"] += 1
    assert config_mod.section_hash(a, "wsi", "shards") == config_mod.section_hash(b, "wsi", "shards")
    assert config_mod.section_hash(a, "studies.wsi_demo") != config_mod.section_hash(b, "studies.wsi_demo")
    b["seed"] += 1
    assert config_mod.section_hash(a, "wsi") != config_mod.section_hash(b, "wsi")


def test_cli_reports_bad_config_in_one_line_and_exit_2(tmp_path, capsys):
    cfg = raw_default()
    cfg["wsi"]["pach_size"] = 224
    path = write_config(cfg, tmp_path / "bad.yaml")
    assert cli.main(["synth", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pach_size" in err[0] and str(path) in err[0]
    assert not (tmp_path / "data").exists()


def test_snakemake_stops_before_any_job_naming_the_key(tmp_path):
    cfg = raw_default()
    cfg["wsi"]["pach_size"] = 224
    path = write_config(cfg, tmp_path / "typo.yaml")
    proc = subprocess.run(
        [
            str(VENV_BIN / "snakemake"),
            "-s",
            str(ROOT / "Snakefile"),
            "-d",
            str(tmp_path),
            "--configfile",
            str(path),
            "-n",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "pach_size" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.h5"))


def test_dry_run_lists_every_job_of_the_default_dag(tmp_path):
    proc = subprocess.run(
        [str(VENV_BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "-n", "--quiet", "rules"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    cfg = config_mod.validate(raw_default())
    n_train = sum(cfg["folds"]["outer"] * cfg["folds"]["inner"] for _ in cfg["studies"])
    rows = {
        line.split()[0]: int(line.split()[1])
        for line in out.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    assert rows["train"] == n_train
    assert rows["select"] == cfg["folds"]["outer"] * len(cfg["studies"])
    assert rows["extract_hsi"] == cfg["synth"]["hsi"]["patients"]
    for rule in ("synth", "extract_wsi", "index", "plan_folds", "predict_hsi", "summarize", "report", "all"):
        assert rows.get(rule, 0) >= 1, rule

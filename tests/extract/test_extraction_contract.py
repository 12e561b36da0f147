"""The extraction-job contract (medflow.extract.job), run for both kinds through their real CLI commands:
up-to-date skip, --force, input and config changes, a record rebuilt from its shard, on_error fail/skip
with identical semantics (a stale shard never survives next to a failed record), nothing partial."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_config
from hsi_cohorts import make_mosaic_cohort
from medflow import cli
from medflow.bench.inputs import write_slide
from medflow.core import config as config_mod
from medflow.core.manifest import write_manifest


@dataclass
class Kind:
    """One cohort of one image of a kind, and how to run, perturb and break its extraction."""

    name: str
    cfg: dict
    cfg_path: Path
    out: Path
    change_input: Callable[[], None]  # edit an input file so that its content changes
    break_input: Callable[[], None]  # make an input bad (a one-line InputError)
    section_key: tuple[str, str]  # a key of the kind's own config section, and a value to set

    @property
    def shard(self) -> Path:
        return self.out / "img0.h5"

    @property
    def record(self) -> Path:
        return self.out / "img0.record.json"

    def run(self, *extra: str) -> int:
        write_config(self.cfg, self.cfg_path)
        return cli.main(
            [
                f"extract-{self.name}",
                "--config",
                str(self.cfg_path),
                "--cohort",
                "c",
                "--image-id",
                "img0",
                "--out",
                str(self.shard),
                "--record",
                str(self.record),
                *extra,
            ]
        )


def _wsi(cfg: dict, tmp: Path) -> Kind:
    entry = write_slide(tmp, np.random.default_rng(5), 1536, 0.5)
    manifest = tmp / "manifest.csv"
    rows = [entry.__class__(image_id="img0", patient_id="p0", image=entry.image, annotation=entry.annotation)]
    write_manifest(manifest, rows)
    cfg["cohorts"] = {"c": {"kind": "wsi", "manifest": str(manifest)}}
    cfg["studies"] = {}
    cfg["wsi"].update(mpp=0.5, patch_size=64, sampling={"mode": "random", "per_class": 6})

    def change() -> None:
        xml = Path(entry.annotation)  # move one vertex by 3 px
        xml.write_text(re.sub(r'X="([\d.]+)"', lambda m: f'X="{float(m.group(1)) - 3:.1f}"', xml.read_text(), count=1))

    def corrupt() -> None:
        Path(entry.image).write_bytes(b"not a slide" * 100)

    return Kind(
        "wsi",
        config_mod.validate(cfg),
        tmp / "cfg.yaml",
        tmp / "out",
        change,
        corrupt,
        ("sampling", {"mode": "random", "per_class": 5}),
    )


def _hsi(cfg: dict, tmp: Path) -> Kind:
    manifest = make_mosaic_cohort(tmp / "data", n_images=1)
    cfg["cohorts"] = {"c": {"kind": "hsi", "manifest": str(manifest)}}
    cfg["studies"] = {}
    cfg["hsi"].update(per_class=10)
    gt = tmp / "data" / "img0" / "gt.png"

    def change() -> None:
        labels = np.asarray(Image.open(gt)).copy()
        labels[0, 0] = 1
        Image.fromarray(labels).save(gt)

    def empty() -> None:
        Image.fromarray(np.zeros_like(np.asarray(Image.open(gt)))).save(gt)

    return Kind("hsi", config_mod.validate(cfg), tmp / "cfg.yaml", tmp / "out", change, empty, ("per_class", 12))


@pytest.fixture(params=["wsi", "hsi"])
def kind(request: pytest.FixtureRequest, default_cfg: dict, tmp_path: Path) -> Kind:
    return {"wsi": _wsi, "hsi": _hsi}[request.param](copy.deepcopy(default_cfg), tmp_path)


def _stamp(path: Path) -> int:
    return path.stat().st_mtime_ns


def _files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_up_to_date_shard_is_reused_until_force(kind: Kind, capsys: pytest.CaptureFixture) -> None:
    assert kind.run() == 0
    stamp = _stamp(kind.shard)
    assert kind.run() == 0
    assert "up to date" in capsys.readouterr().out and _stamp(kind.shard) == stamp
    assert kind.run("--force") == 0
    assert _stamp(kind.shard) != stamp
    record = json.loads(kind.record.read_text())
    assert record["status"] == "ok" and record["n_patches"] == sum(record["counts"].values()) > 0
    assert set(record["inputs"]["files"]) >= {"image", "annotation"}


def test_changed_input_or_own_config_section_reextracts(kind: Kind) -> None:
    assert kind.run() == 0
    stamp = _stamp(kind.shard)
    other, key, value = ("hsi", "patch", 9) if kind.name == "wsi" else ("wsi", "patch_size", 32)
    kind.cfg[other][key] = value
    assert kind.run() == 0 and _stamp(kind.shard) == stamp  # another kind's section: still up to date
    kind.change_input()
    assert kind.run() == 0 and _stamp(kind.shard) != stamp  # an input file changed
    stamp = _stamp(kind.shard)
    key, value = kind.section_key
    kind.cfg[kind.name][key] = value
    assert kind.run() == 0 and _stamp(kind.shard) != stamp  # its own config section changed


def test_record_lost_after_the_shard_is_rebuilt_from_it(kind: Kind) -> None:
    assert kind.run() == 0
    stamp, first = _stamp(kind.shard), json.loads(kind.record.read_text())
    kind.record.unlink()  # killed between shard and record
    assert kind.run() == 0 and _stamp(kind.shard) == stamp
    rebuilt = json.loads(kind.record.read_text())
    assert rebuilt["resumed"] is True and rebuilt["counts"] == first["counts"]


def test_on_error_fail_writes_nothing_and_keeps_nothing_partial(kind: Kind, capsys: pytest.CaptureFixture) -> None:
    kind.break_input()
    assert kind.run() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow extract-{kind.name}: error: ") and "\n" not in err
    assert _files(kind.out) == []


def test_on_error_skip_removes_a_stale_shard_and_records_the_failure(kind: Kind) -> None:
    assert kind.run() == 0 and kind.shard.exists()
    kind.break_input()
    kind.cfg[kind.name]["on_error"] = "skip"
    assert kind.run() == 0
    assert _files(kind.out) == ["img0.record.json"]  # the earlier shard did not survive
    record = json.loads(kind.record.read_text())
    assert record["status"] == "failed" and record["shard"] is None and record["error"]

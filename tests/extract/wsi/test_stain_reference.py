"""Stain normalisation on the real SVS files: agreement with torchstain, `medflow fit-stain`, extraction."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest

from conftest import write_config
from medflow import cli
from medflow.core import config as config_mod
from medflow.core.errors import InputError
from medflow.core.manifest import entry as manifest_entry
from medflow.core.shards import read_attrs
from medflow.extract.wsi import job as wsi_job
from medflow.extract.wsi import stain, stain_reference
from medflow.extract.wsi.pyramid import write_pyramid_tiff
from medflow.extract.wsi.quality import quality_ok
from medflow.train.stain_setup import check_shards, shard_stain

CMU = "cmu1_small_region/CMU-1-Small-Region.svs"
TCGA = "tcga_cr7395_svs/tcga-cr-7395-01a-01-ts1.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"  # PROVENANCE.txt
TISSUE_REGION = {"x": 1000, "y": 1800, "width": 800, "height": 800}  # CMU: epidermis and dermis
BLANK_REGION = {"x": 40, "y": 2400, "width": 300, "height": 300}  # CMU: glass only


def _tissue_patches(path: Path, n: int, seed: int, size: int = 224) -> np.ndarray:
    """n random level-0 patches with tissue (extraction's quality rule), from a seeded draw."""
    slide = openslide.OpenSlide(str(path))
    rng = np.random.default_rng(seed)
    width, height = slide.dimensions
    out: list[np.ndarray] = []
    while len(out) < n:
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        patch = np.asarray(slide.read_region((x, y), 0, (size, size)))[..., :3]
        if quality_ok(patch[None], {"max_white": 0.5, "max_black": 0.1, "min_sharpness": 0})[0]:
            out.append(patch)
    return np.stack(out)


def _region(path: Path, region: dict) -> np.ndarray:
    slide = openslide.OpenSlide(str(path))
    return np.asarray(slide.read_region((region["x"], region["y"]), 0, (region["width"], region["height"])))[..., :3]


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_reinhard_and_macenko_match_torchstain_on_real_patches(shared_data: Path, method: str) -> None:
    """Same target and, per pixel, the same result up to the final rounding: torchstain truncates to
    uint8 (ours rounds) and its Macenko recomposes Io·exp(-OD) without the -1 of the OD inverse, so
    the difference is 0 or +1 (Reinhard) / 0 or -1 (Macenko) and about half a level on average."""
    normalizers = pytest.importorskip("torchstain.numpy.normalizers")
    reference = _region(shared_data / CMU, TISSUE_REGION)
    patches = np.concatenate([_tissue_patches(shared_data / CMU, 12, 1), _tissue_patches(shared_data / TCGA, 12, 2)])
    params = {"background": 255} if method == "reinhard" else {}  # torchstain's Reinhard uses every pixel
    target = stain.fit(method, params, reference.reshape(-1, 3))
    ours = stain.make(method, params, target).apply(patches).astype(np.int16)
    if method == "reinhard":
        ref_impl = normalizers.NumpyReinhardNormalizer()
        ref_impl.fit(reference)
        np.testing.assert_allclose(target["mean"], ref_impl.target_means, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(target["std"], ref_impl.target_stds, rtol=1e-5)
        theirs = np.stack([ref_impl.normalize(p) for p in patches])
        allowed = {0, 1}
    else:
        ref_impl = normalizers.NumpyMacenkoNormalizer()
        ref_impl.fit(reference)
        np.testing.assert_allclose(target["stain_matrix"], ref_impl.HERef, atol=1e-5)
        np.testing.assert_allclose(target["max_concentrations"], ref_impl.maxCRef, rtol=1e-5)
        theirs = np.stack([ref_impl.normalize(p, stains=False)[0] for p in patches])
        allowed = {-1, 0}
    diff = ours - theirs
    assert set(np.unique(diff).tolist()) <= allowed
    assert 0.4 < abs(diff.mean()) < 0.6


# ---- medflow fit-stain --------------------------------------------------------------------------------
def _config(
    base: dict, tmp: Path, rows: list[tuple[str, str, Path, str]], name: str = "config", **stain_cfg: object
) -> Path:
    """``tmp/<name>.yaml``: one cohort 'c' (rows: image_id, patient_id, slide, mpp; manifest in ``tmp``)
    and the given wsi.stain settings."""
    cfg = copy.deepcopy(base)
    tmp.mkdir(parents=True, exist_ok=True)
    lines = ["image_id,patient_id,image,mpp"] + [f"{i},{p},{s},{m}" for i, p, s, m in rows]
    (tmp / "manifest.csv").write_text("\n".join(lines) + "\n")
    cfg["cohorts"] = {"c": {"kind": "wsi", "manifest": str(tmp / "manifest.csv")}}
    cfg["studies"] = {}
    cfg["wsi"]["stain"] = copy.deepcopy(stain_cfg)
    cfg["wsi"]["sampling"]["per_class"] = 12
    config_mod.validate(cfg)
    return write_config(cfg, tmp / f"{name}.yaml")


def _fit(config: Path, out: Path) -> int:
    return cli.main(["fit-stain", "--config", str(config), "--cohort", "c", "--out", str(out)])


def test_fit_stain_region_writes_the_reference_with_its_provenance(shared_data, default_cfg, tmp_path) -> None:
    region = {"slide": str(shared_data / CMU), **TISSUE_REGION}
    config = _config(
        default_cfg,
        tmp_path,
        [("cmu", "P1", shared_data / CMU, "")],
        method="macenko",
        reference={"source": "region", "region": region},
    )
    out = tmp_path / "stain" / "c.json"
    assert _fit(config, out) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "medflow-stain/1" and doc["job"] == "fit-stain" and doc["status"] == "ok"
    assert doc["method"] == "macenko" and doc["params"] == {"io": 240.0, "alpha": 1.0, "beta": 0.15, "percentile": 99.0}
    assert doc["digest"] == stain.digest_of(doc["method"], doc["params"], doc["target"])
    assert doc["inputs"]["files"]["region_slide"]["sha256"] == CMU_SHA256
    cfg = config_mod.load(config)
    assert doc["seed"] == cfg["seed"]
    assert doc["config_hash"] == config_mod.section_hash(cfg, *stain_reference.config_sections("c"))
    assert doc["reference"]["source"] == "region" and abs(doc["reference"]["mpp"] - cfg["wsi"]["mpp"]) < 0.03
    # Read at wsi.mpp (1.0 µm/px from a 0.499 µm/px slide: Lanczos-resampled to about half size).
    assert abs(doc["reference"]["pixels"] - (800 * 0.499 / cfg["wsi"]["mpp"]) ** 2) < 0.02 * 400**2
    norm = stain_reference.load_reference(out, "c")
    assert norm.digest == doc["digest"]
    h, e = np.asarray(doc["target"]["stain_matrix"]).T
    assert h[0] > e[0] and min(h.min(), e.min()) > 0  # H absorbs red most; OD vectors are positive


def test_fit_stain_cohort_is_the_median_of_per_slide_targets(shared_data, default_cfg, tmp_path) -> None:
    rows = [("cmu", "P1", shared_data / CMU, ""), ("tcga", "P2", shared_data / TCGA, "0.25")]
    config = _config(
        default_cfg, tmp_path, rows, method="reinhard", reference={"source": "cohort", "patches_per_slide": 16}
    )
    assert _fit(config, tmp_path / "a.json") == 0 and _fit(config, tmp_path / "b.json") == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    slides = doc["reference"]["slides"]
    assert [s["image_id"] for s in slides] == ["cmu", "tcga"] and all(0 < s["patches"] <= 16 for s in slides)
    assert doc["target"] == stain.median_target("reinhard", [s["target"] for s in slides])
    assert set(doc["inputs"]["files"]) == {"cmu", "tcga"}
    assert json.loads((tmp_path / "b.json").read_text())["digest"] == doc["digest"]  # seeded: reproducible
    # The two slides differ in stain (the TCGA frozen section is pinker), and the median lies between them.
    a, b = (np.asarray(s["target"]["mean"]) for s in slides)
    assert np.abs(a - b).max() > 2
    assert np.all(np.minimum(a, b) <= doc["target"]["mean"]) and np.all(doc["target"]["mean"] <= np.maximum(a, b))


@pytest.fixture(scope="module")
def blank_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blank") / "blank.tiff"
    write_pyramid_tiff(path, np.full((1024, 1024, 3), 243, np.uint8), mpp=0.5, tile=256)
    return path


@pytest.mark.parametrize(
    "case, problem",
    [
        ("outside", "wsi.stain.reference.region (x 2000, y 1800, width 800, height 800) lies outside the slide"),
        ("blank", "degenerate stain reference (wsi.stain.reference.region): only 0 of"),
        ("no_tissue", "no tissue found for the stain reference (wsi.stain.reference.source: cohort"),
        ("no_slide", "wsi.stain.reference.region.slide is not set"),
    ],
)
def test_bad_references_exit_2_with_one_line_and_write_nothing(
    shared_data, default_cfg, blank_slide, tmp_path, capsys, case, problem
) -> None:
    rows = [("cmu", "P1", shared_data / CMU, "")]
    region = {"slide": str(shared_data / CMU), **TISSUE_REGION}
    if case == "outside":
        region["x"] = 2000
    if case == "blank":
        region.update(BLANK_REGION)
    if case == "no_slide":
        region["slide"] = ""
    if case == "no_tissue":
        rows.append(("blank", "P2", blank_slide, ""))
        reference: dict = {"source": "cohort", "patches_per_slide": 4}
    else:
        reference = {"source": "region", "region": region}
    config = _config(default_cfg, tmp_path, rows, method="reinhard", reference=reference)
    out = tmp_path / "stain" / "c.json"
    assert _fit(config, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and problem in err, err
    named = {"outside": shared_data / CMU, "blank": shared_data / CMU, "no_tissue": blank_slide, "no_slide": config}[
        case
    ]
    assert err.startswith(f"medflow fit-stain: error: {named}: ")
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


def test_on_error_skip_leaves_a_slide_without_tissue_out(shared_data, default_cfg, blank_slide, tmp_path) -> None:
    rows = [("cmu", "P1", shared_data / CMU, ""), ("blank", "P2", blank_slide, "")]
    base = copy.deepcopy(default_cfg)
    base["wsi"]["on_error"] = "skip"
    config = _config(base, tmp_path, rows, method="macenko", reference={"source": "cohort", "patches_per_slide": 8})
    assert _fit(config, tmp_path / "c.json") == 0
    doc = json.loads((tmp_path / "c.json").read_text())
    assert [s["image_id"] for s in doc["reference"]["slides"]] == ["cmu"]
    assert (
        doc["reference"]["skipped"][0]["image_id"] == "blank" and "no tissue" in doc["reference"]["skipped"][0]["error"]
    )
    only = doc["reference"]["slides"][0]["target"]
    np.testing.assert_allclose(doc["target"]["stain_matrix"], only["stain_matrix"], rtol=1e-12)
    assert doc["target"]["max_concentrations"] == only["max_concentrations"]


# ---- extraction ------------------------------------------------------------------------------------------
def _extract(config: Path, tmp: Path, name: str, stain_path: Path | None) -> int:
    argv = ["extract-wsi", "--config", str(config), "--cohort", "c", "--image-id", "cmu"]
    argv += ["--out", str(tmp / f"{name}.h5"), "--record", str(tmp / f"{name}.record.json")]
    return cli.main(argv + (["--stain", str(stain_path)] if stain_path else []))


def _shard(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as h5:
        return h5["patches"][:], h5["coords"][:], read_attrs(h5)


def test_extraction_stores_normalised_patches_and_depends_on_the_reference_digest(
    shared_data, default_cfg, tmp_path, capsys
) -> None:
    rows = [("cmu", "P1", shared_data / CMU, "")]
    region = {"slide": str(shared_data / CMU), **TISSUE_REGION}
    raw_cfg = _config(default_cfg, tmp_path, rows, "raw", method="none")
    assert _extract(raw_cfg, tmp_path, "raw", None) == 0
    config = _config(
        default_cfg,
        tmp_path,
        rows,
        "norm",
        method="reinhard",
        apply="extraction",
        reference={"source": "region", "region": region},
    )
    ref = tmp_path / "stain.json"
    assert _fit(config, ref) == 0
    assert _extract(config, tmp_path, "norm", None) == 2  # the reference is required
    assert "--stain" in capsys.readouterr().err
    assert _extract(config, tmp_path, "norm", ref) == 0
    raw, raw_coords, raw_attrs = _shard(tmp_path / "raw.h5")
    normed, coords, attrs = _shard(tmp_path / "norm.h5")
    norm = stain_reference.load_reference(ref)
    np.testing.assert_array_equal(coords, raw_coords)  # the same patches: quality is judged on raw pixels
    np.testing.assert_array_equal(normed, norm.apply(raw))
    assert "stain" not in raw_attrs and attrs["config_hash"] == raw_attrs["config_hash"]  # not in the hash
    recorded = shard_stain(attrs)
    assert (
        recorded["digest"] == norm.digest and recorded["method"] == "reinhard" and recorded["applied"] == "extraction"
    )
    assert attrs["inputs"]["params"]["stain"] == norm.digest
    record = json.loads((tmp_path / "norm.record.json").read_text())
    assert record["stain"]["digest"] == norm.digest and record["concurrent_s"]["stain"] > 0  # in the writer thread
    # A batch job (wsi.images_per_job > 1, `extract-batch`) passes the reference on: the same shard.
    batch = ["extract-batch", "--config", str(config), "--cohort", "c", "--images", "cmu"]
    batch += ["--out-dir", str(tmp_path / "batch"), "--record", str(tmp_path / "batch" / "b.json")]
    assert cli.main([*batch, "--stain", str(ref)]) == 0
    np.testing.assert_array_equal(_shard(tmp_path / "batch" / "cmu.h5")[0], normed)
    # Training refuses shards prepared otherwise than its config says (raw for load-time normalisation).
    check_shards([str(tmp_path / "norm.h5")], norm.digest)
    with pytest.raises(InputError, match=f"norm.h5: patches are normalised with stain reference {norm.digest}"):
        check_shards([str(tmp_path / "norm.h5")], None)
    # A refit giving the same reference (a new file, same digest) keeps the shard ...
    capsys.readouterr()
    assert _fit(config, ref) == 0 and _extract(config, tmp_path, "norm", ref) == 0
    assert "is up to date" in capsys.readouterr().out
    # ... another reference re-extracts.
    other = _config(
        default_cfg,
        tmp_path,
        rows,
        "other",
        method="reinhard",
        apply="extraction",
        reference={"source": "region", "region": {**region, "x": 600, "y": 1000}},
    )
    assert _fit(other, ref) == 0 and _extract(other, tmp_path, "norm", ref) == 0
    assert "is up to date" not in capsys.readouterr().out
    again, _, attrs2 = _shard(tmp_path / "norm.h5")
    assert shard_stain(attrs2)["digest"] != norm.digest and not np.array_equal(again, normed)


def test_extraction_refuses_a_stale_reference(shared_data, default_cfg, tmp_path, capsys) -> None:
    rows = [("cmu", "P1", shared_data / CMU, "")]
    region = {"slide": str(shared_data / CMU), **TISSUE_REGION}
    reinhard = _config(
        default_cfg, tmp_path / "r", rows, method="reinhard", reference={"source": "region", "region": region}
    )
    assert _fit(reinhard, tmp_path / "stain.json") == 0
    macenko = _config(
        default_cfg, tmp_path / "m", rows, method="macenko", reference={"source": "region", "region": region}
    )
    assert _extract(macenko, tmp_path, "x", tmp_path / "stain.json") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'stain.json'}: stain reference is reinhard" in err and "rerun medflow fit-stain" in err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.record.json").exists()
    entry = manifest_entry(config_mod.load(macenko), "c", "cmu")
    with pytest.raises(InputError, match="give the stain reference"):
        wsi_job.extract_slide(entry, config_mod.load(macenko), "c", tmp_path / "y.h5", tmp_path / "y.json")

"""The bad-input suite: crafted broken inputs across every stage, each through its real command.

Every case asserts the documented behaviour: one line ``medflow <cmd>: error: <file>: <problem>`` on
stderr, exit 2, no traceback, and the output directory — which already holds the good outputs of an
earlier run — byte-identical afterwards. The cases are listed in docs/bad-input.md (a test checks it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, write_config
from hsi_cohorts import make_mosaic_cohort, write_envi
from medflow import cli
from medflow.bench.inputs import write_slide, write_synthetic_cohort
from medflow.core import config as config_mod
from medflow.core.index import load_index
from medflow.core.manifest import ImageEntry, write_manifest
from medflow.extract.wsi.annotations import write_asap_xml
from medflow.extract.wsi.pyramid import write_pyramid_tiff
from medflow.train.splits import make_plan


# ---- the good environment every case breaks a copy of ---------------------------------------------
@dataclass
class Env:
    root: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def cfg(self, name: str) -> dict:
        return yaml.safe_load((self.root / name).read_text())

    def save_cfg(self, name: str, cfg: dict) -> Path:
        return write_config(cfg, self.root / name)

    def wsi_args(self, image_id: str = "s0") -> list[str]:
        return [
            "extract-wsi",
            "--config",
            str(self / "wsi.yaml"),
            "--cohort",
            "c",
            "--image-id",
            image_id,
            "--out",
            str(self / "wsi_out" / f"{image_id}.h5"),
            "--record",
            str(self / "wsi_out" / f"{image_id}.record.json"),
        ]

    def hsi_args(self, image_id: str = "img0") -> list[str]:
        return [
            "extract-hsi",
            "--config",
            str(self / "hsi.yaml"),
            "--cohort",
            "h",
            "--image-id",
            image_id,
            "--out",
            str(self / "hsi_out" / f"{image_id}.h5"),
            "--record",
            str(self / "hsi_out" / f"{image_id}.record.json"),
        ]

    def train_args(self, outer: int = 0, inner: int | None = 0) -> list[str]:
        args = [
            "train",
            "--config",
            str(self / "study.yaml"),
            "--study",
            "syn",
            "--index",
            str(self / "syn" / "index" / "syn.json"),
            "--folds",
            str(self / "folds.json"),
            "--outer",
            str(outer),
            "--out-dir",
            str(self / "runs" / "inner0"),
        ]
        return args + (["--inner", str(inner)] if inner is not None else [])

    def select_args(self) -> list[str]:
        return [
            "select",
            "--config",
            str(self / "study.yaml"),
            "--study",
            "syn",
            "--index",
            str(self / "syn" / "index" / "syn.json"),
            "--folds",
            str(self / "folds.json"),
            "--outer",
            "0",
            "--inner-dirs",
            str(self / "runs" / "inner0"),
            str(self / "runs" / "inner1"),
            "--out-dir",
            str(self / "runs" / "outer0"),
        ]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-input-base")
    env = Env(root)
    default = yaml.safe_load((ROOT / "config.yaml").read_text())
    # WSI: one slide with a tumour polygon, extracted once (the earlier good output).
    entry = write_slide(root, np.random.default_rng(1), 1024, 0.5)
    write_manifest(root / "wsi.csv", [ImageEntry("s0", "p0", entry.image, entry.annotation)])
    wsi = {
        **default,
        "studies": {},
        "cohorts": {"c": {"kind": "wsi", "manifest": str(root / "wsi.csv")}},
        "wsi": {"mpp": 0.5, "patch_size": 64, "sampling": {"mode": "random", "per_class": 4}},
    }
    env.save_cfg("wsi.yaml", wsi)
    assert cli.main(env.wsi_args()) == 0
    # HSI: one 5×5 mosaic with references and ground truth, extracted once.
    manifest = make_mosaic_cohort(root / "hsi", n_images=1)
    hsi = {
        **default,
        "studies": {},
        "cohorts": {"h": {"kind": "hsi", "manifest": str(manifest)}},
        "hsi": {"per_class": 10, "patch": 3},
    }
    env.save_cfg("hsi.yaml", hsi)
    assert cli.main(env.hsi_args()) == 0
    # A trained study: shards of 6 patients, a fold plan, two inner runs and a selection.
    images = {f"img{p}": (f"P{p}", [0] * 8 + [1] * 8) for p in range(6)}
    index = write_synthetic_cohort(
        root / "syn", images, ["normal", "tumour"], patch_shape=(7, 7, 4), dtype="float32", cohort="syn", kind="hsi"
    )
    study = {
        **default,
        "cohorts": {"syn": {"kind": "hsi", "manifest": str(root / "unused.csv")}},
        "hsi": {"class_names": ["normal", "tumour"]},
        "studies": {"syn": {"cohort": "syn", "model": {"name": "conv2dnet"}, "train": {"epochs": 1, "batch_size": 8}}},
        "launch": {"backend": "ddp", "ranks": 1},
        "folds": {"outer": 3, "inner": 2},
    }
    cfg_path = env.save_cfg("study.yaml", study)
    plan = make_plan(load_index(index), config_mod.load(cfg_path), "syn")
    (root / "folds.json").write_text(json.dumps(plan))
    for inner in (0, 1):
        args = env.train_args(inner=inner)
        args[args.index("--out-dir") + 1] = str(root / "runs" / f"inner{inner}")
        assert cli.main(args) == 0
    assert cli.main(env.select_args()) == 0
    return root


@pytest.fixture
def env(base: Path, tmp_path: Path) -> Env:
    shutil.copytree(base, tmp_path / "env", symlinks=True)
    root = tmp_path / "env"
    for name in ("wsi.yaml", "hsi.yaml", "study.yaml", "wsi.csv"):  # absolute paths point at the base: re-point
        path = root / name
        path.write_text(path.read_text().replace(str(base), str(root)))
    manifest = root / "hsi" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(str(base), str(root)))
    return Env(root)


# ---- the cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    area: str
    problem: str  # text the one-line error must contain
    build: Callable[[Env], tuple[list[str], Path, Path]]  # → (argv, the file the error names, output dir)


CASES: list[Case] = []


def case(id_: str, area: str, problem: str) -> Callable:
    def register(build: Callable[[Env], tuple[list[str], Path, Path]]) -> Callable:
        CASES.append(Case(id_, area, problem, build))
        return build

    return register


def _wsi_manifest(env: Env, **row: str) -> None:
    fields = {
        "image_id": "s0",
        "patient_id": "p0",
        "image": str(env / "bench_slide.tiff"),
        "annotation": str(env / "bench_slide.xml"),
        "mpp": "",
        "mask": "",
        **row,
    }
    header = ["image_id", "patient_id", "image", "annotation", "white", "dark", "mpp", "mask"]
    (env / "wsi.csv").write_text(",".join(header) + "\n" + ",".join(fields.get(h, "") for h in header) + "\n")


def _wsi(env: Env, named: Path) -> tuple[list[str], Path, Path]:
    return env.wsi_args(), named, env / "wsi_out"


def _hsi(env: Env, named: Path) -> tuple[list[str], Path, Path]:
    return env.hsi_args(), named, env / "hsi_out"


def _wsi_cfg(env: Env, **over: object) -> None:
    cfg = env.cfg("wsi.yaml")
    for key, value in over.items():
        section, _, name = key.partition("__")
        (cfg[section] if name else cfg)[name or section] = value
    env.save_cfg("wsi.yaml", cfg)


# slides
@case("slide-missing", "slide", "image file not found")
def _(env: Env):
    (env / "bench_slide.tiff").unlink()
    return _wsi(env, env / "bench_slide.tiff")


@case("slide-garbage", "slide", "not a slide OpenSlide can read")
def _(env: Env):
    (env / "bench_slide.tiff").write_bytes(np.random.default_rng(0).integers(0, 256, 40_000, dtype=np.uint8).tobytes())
    return _wsi(env, env / "bench_slide.tiff")


@case("slide-empty", "slide", "not a slide OpenSlide can read")
def _(env: Env):
    (env / "bench_slide.tiff").write_bytes(b"")
    return _wsi(env, env / "bench_slide.tiff")


@case("slide-truncated", "slide", "slide")
def _(env: Env):
    data = (env / "bench_slide.tiff").read_bytes()
    (env / "bench_slide.tiff").write_bytes(data[: len(data) // 3])
    return _wsi(env, env / "bench_slide.tiff")


@case("slide-blank", "slide", "no tissue found")
def _(env: Env):
    write_pyramid_tiff(env / "bench_slide.tiff", np.full((768, 1024, 3), 243, np.uint8), mpp=0.5)
    _wsi_manifest(env, annotation="")
    return _wsi(env, env / "bench_slide.tiff")


@case("slide-no-mpp", "slide", "no mpp metadata")
def _(env: Env):
    import tifffile

    rgb = np.asarray(Image.open(env / "bench_slide.tiff").convert("RGB"))
    tifffile.imwrite(env / "bench_slide.tiff", rgb, tile=(256, 256), photometric="rgb")
    return _wsi(env, env / "bench_slide.tiff")


@case("slide-mpp-impossible", "slide", "requested mpp impossible")
def _(env: Env):
    _wsi_cfg(env, wsi__mpp=0.1)
    return _wsi(env, env / "bench_slide.tiff")


@case("slide-smaller-than-patch", "slide", "smaller than one patch")
def _(env: Env):
    write_pyramid_tiff(env / "bench_slide.tiff", np.full((40, 40, 3), 150, np.uint8), mpp=0.5, min_size=16)
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(env / "mask.png")  # all tissue, by the user's mask
    _wsi_manifest(env, annotation="", mask=str(env / "mask.png"))
    return _wsi(env, env / "bench_slide.tiff")


# annotations
@case("annotation-missing", "annotation", "annotation file not found")
def _(env: Env):
    (env / "bench_slide.xml").unlink()
    return _wsi(env, env / "bench_slide.xml")


@case("annotation-malformed-xml", "annotation", "malformed ASAP XML")
def _(env: Env):
    (env / "bench_slide.xml").write_text("<ASAP_Annotations><Annotations>")
    return _wsi(env, env / "bench_slide.xml")


@case("annotation-wrong-root", "annotation", "not an ASAP annotation file")
def _(env: Env):
    (env / "bench_slide.xml").write_text("<svg></svg>")
    return _wsi(env, env / "bench_slide.xml")


@case("annotation-coordinate-without-x", "annotation", "coordinate without numeric X/Y/Order")
def _(env: Env):
    xml = env / "bench_slide.xml"
    xml.write_text(xml.read_text().replace('X="', 'Q="', 1))
    return _wsi(env, xml)


@case("annotation-outside-slide", "annotation", "outside the 1024×1024 slide")
def _(env: Env):
    write_asap_xml(env / "bench_slide.xml", {"metastases": [np.array([[100, 100], [9000, 100], [9000, 900]], float)]})
    return _wsi(env, env / "bench_slide.xml")


@case("geojson-malformed", "annotation", "malformed GeoJSON")
def _(env: Env):
    (env / "a.geojson").write_text("{not json")
    _wsi_manifest(env, annotation=str(env / "a.geojson"))
    return _wsi(env, env / "a.geojson")


@case("geojson-point-as-tumour", "annotation", "which has no area")
def _(env: Env):
    feature = {
        "type": "Feature",
        "properties": {"classification": {"name": "Tumor"}},
        "geometry": {"type": "Point", "coordinates": [500, 500]},
    }
    (env / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    _wsi_manifest(env, annotation=str(env / "a.geojson"))
    return _wsi(env, env / "a.geojson")


@case("geojson-unknown-geometry", "annotation", "unknown geometry type")
def _(env: Env):
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Circle", "coordinates": [1, 2]}}
    (env / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    _wsi_manifest(env, annotation=str(env / "a.geojson"))
    return _wsi(env, env / "a.geojson")


@case("geojson-degenerate-ring", "annotation", "a ring needs ≥ 3 finite vertices")
def _(env: Env):
    feature = {
        "type": "Feature",
        "properties": {"classification": {"name": "Tumor"}},
        "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [5, 5]]]},
    }
    (env / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    _wsi_manifest(env, annotation=str(env / "a.geojson"))
    return _wsi(env, env / "a.geojson")


@case("annotation-unknown-format", "annotation", "unknown annotation format")
def _(env: Env):
    (env / "a.txt").write_text("tumour at 1,2")
    _wsi_manifest(env, annotation=str(env / "a.txt"))
    return _wsi(env, env / "a.txt")


# masks
@case("mask-missing", "mask", "mask file not found")
def _(env: Env):
    _wsi_manifest(env, mask=str(env / "mask.png"))
    return _wsi(env, env / "mask.png")


@case("mask-wrong-aspect", "mask", "does not have the aspect ratio")
def _(env: Env):
    Image.fromarray(np.full((10, 40), 255, np.uint8)).save(env / "mask.png")
    _wsi_manifest(env, mask=str(env / "mask.png"))
    return _wsi(env, env / "mask.png")


@case("mask-not-an-image", "mask", "mask")
def _(env: Env):
    (env / "mask.png").write_bytes(b"\x89PNG garbage")
    _wsi_manifest(env, mask=str(env / "mask.png"))
    return _wsi(env, env / "mask.png")


@case("mask-method-without-mask", "mask", "wsi.tissue.method is 'mask'")
def _(env: Env):
    cfg = env.cfg("wsi.yaml")
    cfg["wsi"]["tissue"] = {"method": "mask"}
    env.save_cfg("wsi.yaml", cfg)
    return _wsi(env, env / "bench_slide.tiff")


# manifests
@case("manifest-missing", "manifest", "manifest not found")
def _(env: Env):
    (env / "wsi.csv").unlink()
    return _wsi(env, env / "wsi.csv")


@case("manifest-empty", "manifest", "manifest lists no images")
def _(env: Env):
    (env / "wsi.csv").write_text("image_id,patient_id,image\n")
    return _wsi(env, env / "wsi.csv")


@case("manifest-missing-columns", "manifest", "manifest lacks column(s)")
def _(env: Env):
    (env / "wsi.csv").write_text("image_id,image\ns0,x.tiff\n")
    return _wsi(env, env / "wsi.csv")


@case("manifest-unknown-column", "manifest", "unknown manifest column(s)")
def _(env: Env):
    (env / "wsi.csv").write_text("image_id,patient_id,image,stain\ns0,p0,x.tiff,he\n")
    return _wsi(env, env / "wsi.csv")


@case("manifest-duplicate-image-id", "manifest", "duplicate image_id")
def _(env: Env):
    (env / "wsi.csv").write_text("image_id,patient_id,image\ns0,p0,a.tiff\ns0,p1,b.tiff\n")
    return _wsi(env, env / "wsi.csv")


@case("manifest-bad-id", "manifest", "image_id/patient_id must match")
def _(env: Env):
    (env / "wsi.csv").write_text("image_id,patient_id,image\ns 0,p0,a.tiff\n")
    return _wsi(env, env / "wsi.csv")


@case("manifest-mpp-nan", "manifest", "must be a finite number > 0")
def _(env: Env):
    _wsi_manifest(env, mpp="nan")
    return _wsi(env, env / "wsi.csv")


@case("manifest-mpp-negative", "manifest", "must be a finite number > 0")
def _(env: Env):
    _wsi_manifest(env, mpp="-0.25")
    return _wsi(env, env / "wsi.csv")


@case("manifest-mpp-text", "manifest", "is not a number")
def _(env: Env):
    _wsi_manifest(env, mpp="0.25um")
    return _wsi(env, env / "wsi.csv")


@case("manifest-empty-image", "manifest", "empty image path")
def _(env: Env):
    _wsi_manifest(env, image="")
    return _wsi(env, env / "wsi.csv")


@case("manifest-unknown-image-id", "manifest", "no image 's9'")
def _(env: Env):
    args, _, out = _wsi(env, env / "wsi.csv")
    args[args.index("--image-id") + 1] = "s9"
    return args, env / "wsi.csv", out


# HSI frames, cubes, ground truth
def _img(env: Env, name: str) -> Path:
    return env / "hsi" / "img0" / name


@case("hsi-mosaic-unreadable", "hsi", "not a readable .npy array")
def _(env: Env):
    _img(env, "raw.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    return _hsi(env, _img(env, "raw.npy"))


@case("hsi-mosaic-nan", "hsi", "NaN/inf")
def _(env: Env):
    np.save(_img(env, "raw.npy"), np.full((60, 70), np.nan, np.float32))
    return _hsi(env, _img(env, "raw.npy"))


@case("hsi-mosaic-pattern", "hsi", "not a multiple of the 5×5 pattern")
def _(env: Env):
    for name in ("raw.npy", "white.npy", "dark.npy"):
        np.save(_img(env, name), np.load(_img(env, name))[:, :-3])
    return _hsi(env, _img(env, "raw.npy"))


@case("hsi-white-equals-dark", "hsi", "white and dark references are identical")
def _(env: Env):
    np.save(_img(env, "white.npy"), np.load(_img(env, "dark.npy")))
    return _hsi(env, _img(env, "white.npy"))


@case("hsi-dark-brighter-than-white", "hsi", "dark reference is brighter than the white")
def _(env: Env):
    white, dark = np.load(_img(env, "white.npy")), np.load(_img(env, "dark.npy"))
    np.save(_img(env, "white.npy"), dark)
    np.save(_img(env, "dark.npy"), white)
    return _hsi(env, _img(env, "dark.npy"))


@case("hsi-references-half-degenerate", "hsi", "partially degenerate")
def _(env: Env):
    white, dark = np.load(_img(env, "white.npy")), np.load(_img(env, "dark.npy"))
    white[: white.shape[0] // 2] = dark[: white.shape[0] // 2]
    np.save(_img(env, "white.npy"), white)
    return _hsi(env, _img(env, "white.npy"))


@case("hsi-reference-shape", "hsi", "differs from the mosaic's")
def _(env: Env):
    np.save(_img(env, "white.npy"), np.ones((10, 10), np.uint16))
    return _hsi(env, _img(env, "white.npy"))


@case("hsi-references-absent", "hsi", "no white/dark reference")
def _(env: Env):
    manifest = env / "hsi" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    cols = lines[0].split(",")
    rows = [[v if cols[i] not in ("white", "dark") else "" for i, v in enumerate(r.split(","))] for r in lines[1:]]
    manifest.write_text("\n".join([lines[0], *[",".join(r) for r in rows]]) + "\n")
    return _hsi(env, _img(env, "raw.npy"))


@case("hsi-cube-zero-bands", "hsi", "image is empty")
def _(env: Env):
    np.save(_img(env, "raw.npy"), np.zeros((12, 14, 0), np.float32))
    return _hsi(env, _img(env, "raw.npy"))


@case("hsi-envi-truncated", "hsi", "ENVI data truncated")
def _(env: Env):
    write_envi(_img(env, "cube.hdr"), np.ones((12, 14, 6), np.float32))
    raw = _img(env, "cube.raw")
    raw.write_bytes(raw.read_bytes()[:100])
    manifest = env / "hsi" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("raw.npy", "cube.hdr"))
    return _hsi(env, raw)


@case("hsi-gt-shape", "hsi", "ground-truth shape")
def _(env: Env):
    Image.fromarray(np.ones((5, 5), np.uint8)).save(_img(env, "gt.png"))
    return _hsi(env, _img(env, "gt.png"))


@case("hsi-gt-unlabelled", "hsi", "ground-truth map has no labelled pixel")
def _(env: Env):
    Image.fromarray(np.zeros((12, 14), np.uint8)).save(_img(env, "gt.png"))
    return _hsi(env, _img(env, "gt.png"))


@case("hsi-gt-rgb", "hsi", "single-channel label image")
def _(env: Env):
    Image.fromarray(np.zeros((12, 14, 3), np.uint8)).save(_img(env, "gt.png"))
    return _hsi(env, _img(env, "gt.png"))


@case("hsi-gt-beyond-classes", "hsi", "map to class ids beyond")
def _(env: Env):
    gt = np.asarray(Image.open(_img(env, "gt.png"))).copy()
    gt[0, 0] = 9
    Image.fromarray(gt).save(_img(env, "gt.png"))
    return _hsi(env, _img(env, "gt.png"))


@case("hsi-correction-matrix-size", "hsi", "correction matrix is 3×3")
def _(env: Env):
    np.save(env / "m.npy", np.eye(3, dtype=np.float32))
    cfg = env.cfg("hsi.yaml")
    cfg["hsi"]["correction_matrix"] = str(env / "m.npy")
    env.save_cfg("hsi.yaml", cfg)
    return _hsi(env, env / "m.npy")


# configs
def _config_case(env: Env, text: str) -> tuple[list[str], Path, Path]:
    (env / "wsi.yaml").write_text(text)
    return _wsi(env, env / "wsi.yaml")


@case("config-unknown-key", "config", "'pach_size' was unexpected")
def _(env: Env):
    cfg = env.cfg("wsi.yaml")
    cfg["wsi"]["pach_size"] = 32
    return _config_case(env, yaml.safe_dump(cfg))


@case("config-wrong-type", "config", "invalid config at 'wsi.patch_size'")
def _(env: Env):
    cfg = env.cfg("wsi.yaml")
    cfg["wsi"]["patch_size"] = "big"
    return _config_case(env, yaml.safe_dump(cfg))


@case("config-duplicate-key", "config", "duplicate key 'seed'")
def _(env: Env):
    return _config_case(env, (env / "wsi.yaml").read_text() + "\nseed: 3\n")


@case("config-not-a-mapping", "config", "config must be a mapping")
def _(env: Env):
    return _config_case(env, "- a\n- b\n")


@case("config-invalid-yaml", "config", "not valid YAML")
def _(env: Env):
    return _config_case(env, "wsi: {patch_size: 224\n")


@case("config-positive-class", "config", "is not a class of cohort")
def _(env: Env):
    cfg = env.cfg("study.yaml")
    cfg["studies"]["syn"]["positive_class"] = "tumor"
    env.save_cfg("study.yaml", cfg)
    return env.train_args(), env / "study.yaml", env / "runs"


@case("config-even-hsi-patch", "config", "hsi.patch must be odd")
def _(env: Env):
    cfg = env.cfg("hsi.yaml")
    cfg["hsi"]["patch"] = 4
    env.save_cfg("hsi.yaml", cfg)
    return _hsi(env, Path("config"))


@case("config-missing", "config", "file not found")
def _(env: Env):
    (env / "wsi.yaml").unlink()
    return _wsi(env, env / "wsi.yaml")


@case("config-unknown-study", "config", "study 'nope' is not in the config")
def _(env: Env):
    args = env.train_args()
    args[args.index("--study") + 1] = "nope"
    return args, env / "study.yaml", env / "runs"


# shards (read by training)
def _shard(env: Env, image: str = "img1") -> Path:
    return env / "syn" / "shards" / f"{image}.h5"


def _train(env: Env, named: Path) -> tuple[list[str], Path, Path]:
    return env.train_args(), named, env / "runs"


@case("shard-missing", "shard", "shard listed in the cohort index is missing")
def _(env: Env):
    _shard(env).unlink()
    return _train(env, _shard(env))


@case("shard-truncated", "shard", "content changed since it was indexed")
def _(env: Env):
    data = _shard(env).read_bytes()
    _shard(env).write_bytes(data[: len(data) // 2])
    return _train(env, _shard(env))


@case("shard-bit-flip", "shard", "content changed since it was indexed")
def _(env: Env):
    data = bytearray(_shard(env).read_bytes())
    data[-100] ^= 0xFF
    _shard(env).write_bytes(bytes(data))
    return _train(env, _shard(env))


@case("shard-other-patient-copied-over", "shard", "content changed since it was indexed")
def _(env: Env):
    shutil.copyfile(_shard(env, "img2"), _shard(env))
    return _train(env, _shard(env))


@case("shard-copied-keeping-mtime", "shard", "holds image_id 'img2'")
def _(env: Env):
    """A copy that keeps the victim's size and mtime passes the fast check; the attributes still differ."""
    import os

    st = _shard(env).stat()
    shutil.copyfile(_shard(env, "img2"), _shard(env))
    os.utime(_shard(env), ns=(st.st_atime_ns, st.st_mtime_ns))
    index = env / "syn" / "index" / "syn.json"
    doc = json.loads(index.read_text())
    for entry in doc["shards"]:  # the index believes the copied content (as after an unnoticed swap)
        if entry["image_id"] == "img1":
            entry["sha256"] = next(e["sha256"] for e in doc["shards"] if e["image_id"] == "img2")
    index.write_text(json.dumps(doc))
    return _train(env, _shard(env))


@case("shard-not-hdf5", "shard", "content changed since it was indexed")
def _(env: Env):
    _shard(env).write_bytes(b"not hdf5 at all")
    return _train(env, _shard(env))


# cohort indexes
def _index(env: Env) -> Path:
    return env / "syn" / "index" / "syn.json"


@case("index-half-written", "index", "unreadable cohort index")
def _(env: Env):
    text = _index(env).read_text()
    _index(env).write_text(text[: len(text) // 2])
    return _train(env, _index(env))


@case("index-wrong-format", "index", "not a medflow cohort index")
def _(env: Env):
    doc = json.loads(_index(env).read_text())
    doc["format"] = "medflow-index/1"
    _index(env).write_text(json.dumps(doc))
    return _train(env, _index(env))


@case("index-no-shard-list", "index", "lacks its shard list")
def _(env: Env):
    doc = json.loads(_index(env).read_text())
    del doc["shards"]
    _index(env).write_text(json.dumps(doc))
    return _train(env, _index(env))


@case("index-other-cohort", "index", "index is cohort 'other'")
def _(env: Env):
    doc = json.loads(_index(env).read_text())
    doc["cohort"] = "other"
    _index(env).write_text(json.dumps(doc))
    return _train(env, _index(env))


@case("index-duplicate-source", "index", "would leak across patient splits")
def _(env: Env):
    records = sorted((env / "syn" / "shards").glob("*.record.json"))
    for path, source in zip(records[:2], ("same", "same")):
        shard = path.with_name(json.loads(path.read_text())["shard"])
        with h5py.File(shard, "a") as h5:
            h5.attrs["source_sha256"] = source * 10
    out = env / "syn" / "index" / "rebuilt.json"
    return (
        ["index", "--config", str(env / "study.yaml"), "--cohort", "syn", "--out", str(out), *map(str, records)],
        out,
        out.parent,
    )


# fold plans
def _folds(env: Env) -> Path:
    return env / "folds.json"


@case("folds-not-json", "fold plan", "unreadable fold plan")
def _(env: Env):
    _folds(env).write_text("{")
    return _train(env, _folds(env))


@case("folds-leak", "fold plan", "share patients")
def _(env: Env):
    plan = json.loads(_folds(env).read_text())
    plan["outer"][0]["inner"][0]["train_patients"].append(plan["outer"][0]["test_patients"][0])
    _folds(env).write_text(json.dumps(plan))
    return _train(env, _folds(env))


@case("folds-stale", "fold plan", "made from a different cohort index")
def _(env: Env):
    plan = json.loads(_folds(env).read_text())
    plan["index_digest"] = "0" * 16
    _folds(env).write_text(json.dumps(plan))
    return _train(env, _folds(env))


@case("folds-outer-out-of-range", "fold plan", "outer fold 7 not in the plan")
def _(env: Env):
    args = env.train_args()
    args[args.index("--outer") + 1] = "7"
    return args, _folds(env), env / "runs"


@case("folds-inner-out-of-range", "fold plan", "inner fold 5 not in outer fold 0")
def _(env: Env):
    return env.train_args(inner=5), _folds(env), env / "runs"


# records
def _record(env: Env, inner: int = 1) -> Path:
    return env / "runs" / f"inner{inner}" / "record.json"


def _select(env: Env, named: Path) -> tuple[list[str], Path, Path]:
    return env.select_args(), named, env / "runs"


@case("record-half-written", "record", "unreadable training record")
def _(env: Env):
    text = _record(env).read_text()
    _record(env).write_text(text[: len(text) // 2])
    return _select(env, _record(env))


@case("record-other-study", "record", "record is study 'elsewhere'")
def _(env: Env):
    rec = json.loads(_record(env).read_text())
    rec["study"] = "elsewhere"
    _record(env).write_text(json.dumps(rec))
    return _select(env, _record(env))


@case("record-unfinished", "record", "not a finished training job")
def _(env: Env):
    rec = json.loads(_record(env).read_text())
    rec["status"] = "running"
    _record(env).write_text(json.dumps(rec))
    return _select(env, _record(env))


@case("record-selection-without-epochs", "record", "no usable selected_epochs")
def _(env: Env):
    select = env / "runs" / "outer0" / "record.json"
    rec = json.loads(select.read_text())
    del rec["selected_epochs"]
    select.write_text(json.dumps(rec))
    args = env.train_args(inner=None) + ["--selection", str(select)]
    args[args.index("--out-dir") + 1] = str(env / "runs" / "outer0" / "refit")
    return args, select, env / "runs"


@case("record-model-not-a-model", "record", "not a readable medflow model")
def _(env: Env):
    model = env / "runs" / "outer0" / "model.pt"
    model.write_bytes(b"not a model")
    return (
        [
            "test",
            "--config",
            str(env / "study.yaml"),
            "--study",
            "syn",
            "--index",
            str(_index(env)),
            "--folds",
            str(_folds(env)),
            "--outer",
            "0",
            "--model",
            str(model),
            "--out-dir",
            str(env / "runs" / "outer0" / "t"),
        ],
        model,
        env / "runs",
    )


@case("record-verify-missing-dir", "record", "results directory not found")
def _(env: Env):
    return ["verify", str(env / "no-such-site")], env / "no-such-site", env / "runs"


# ---- the test ----------------------------------------------------------------------------------------
def _snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_outputs_unchanged(bad: Case, env: Env, capsys) -> None:
    argv, named, out = bad.build(env)
    before = _snapshot(out)
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{bad.id}: exit {code}; stderr: {err[-2000:]}"
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith(f"medflow {argv[0]}: error: {named}: "), err
    assert bad.problem in err, err
    assert _snapshot(out) == before, f"{bad.id}: the output directory changed"


def test_suite_covers_every_area_and_is_documented() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {c.area for c in CASES} >= {
        "slide",
        "annotation",
        "mask",
        "manifest",
        "hsi",
        "config",
        "shard",
        "index",
        "fold plan",
        "record",
    }
    table = (ROOT / "docs" / "bad-input.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in table]
    assert not missing, f"cases missing from docs/bad-input.md: {missing}"

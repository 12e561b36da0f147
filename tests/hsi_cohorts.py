"""Small HSI cohorts in real file formats, shared by the extraction and prediction tests."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from PIL import Image

from medflow.core import config as config_mod
from medflow.core.manifest import ImageEntry, write_manifest
from medflow.extract.hsi.io import ENVI_DTYPES


# ---- a tiny real-format cohort: raw 5×5 mosaics + white/dark .npy + PNG ground truth -------------------------
def make_mosaic_cohort(root: Path, n_images: int = 2, mosaic_shape: tuple[int, int] = (60, 70), seed: int = 0) -> Path:
    """Mosaics whose calibrated reflectance per band is known; GT: 5 classes in blocks, 0 = unlabelled."""
    rng = np.random.default_rng(seed)
    rows, cols = mosaic_shape[0] // 5, mosaic_shape[1] // 5
    entries = []
    for i in range(n_images):
        folder = root / f"img{i}"
        folder.mkdir(parents=True)
        gt = np.zeros((rows, cols), np.uint8)
        for c in range(5):  # five labelled blocks, the rest unlabelled
            gt[1 + 2 * c : 3 + 2 * c, 1 + c : 6 + c] = c + 1
        reflect = 0.2 + 0.6 * rng.random((rows, cols, 25)) + 0.05 * gt[..., None]
        mosaic = np.empty(mosaic_shape)
        for b in range(25):
            mosaic[b // 5 :: 5, b % 5 :: 5] = reflect[:, :, b]
        dark = rng.integers(90, 110, mosaic_shape).astype(np.uint16)
        white = dark + rng.integers(2500, 3000, mosaic_shape).astype(np.uint16)
        raw = np.round(dark + mosaic * (white.astype(float) - dark)).astype(np.uint16)
        np.save(folder / "raw.npy", raw)
        np.save(folder / "white.npy", white)
        np.save(folder / "dark.npy", dark)
        Image.fromarray(gt).save(folder / "gt.png")
        entries.append(
            ImageEntry(
                image_id=f"img{i}",
                patient_id=f"pat{i}",
                image=str(folder / "raw.npy"),
                annotation=str(folder / "gt.png"),
                white=str(folder / "white.npy"),
                dark=str(folder / "dark.npy"),
            )
        )
    write_manifest(root / "manifest.csv", entries)
    return root / "manifest.csv"


SALINAS_VALUES = (1, 10, 11, 12, 13, 14)


def salinas_cfg(default_cfg: dict, shared_data: Path, tmp_path: Path) -> dict:
    d = shared_data / "salinasA"
    entry = ImageEntry(
        image_id="salinasA",
        patient_id="salinas",
        image=str(d / "SalinasA_corrected.mat"),
        annotation=str(d / "SalinasA_gt.mat"),
    )
    write_manifest_abs(tmp_path / "salinas.csv", [entry])
    cfg = copy.deepcopy(default_cfg)
    cfg["cohorts"]["salinas"] = {"kind": "hsi", "manifest": str(tmp_path / "salinas.csv")}
    cfg["hsi"].update(
        chain={"calibrate": False, "demosaic": False, "correct": True, "normalise": False},
        per_class=0,
        dtype="float32",
        patch=7,
        border="reflect",
        class_names=[f"c{v}" for v in SALINAS_VALUES],
        class_map={str(v): i for i, v in enumerate(SALINAS_VALUES)},
    )
    cfg["studies"]["hsi_demo"]["positive_class"] = "c1"  # the HSI study now has SalinasA's classes
    return config_mod.validate(cfg)


def write_manifest_abs(path: Path, entries: list[ImageEntry]) -> None:
    """A manifest with absolute paths (the shared data lives outside the manifest's folder)."""
    lines = ["image_id,patient_id,image,annotation,white,dark,mpp,mask"]
    lines += [f"{e.image_id},{e.patient_id},{e.image},{e.annotation},,,," for e in entries]
    path.write_text("\n".join(lines) + "\n")


def write_envi(
    hdr: str | Path,
    cube: np.ndarray,
    interleave: str = "bsq",
    wavelengths: list[float] | None = None,
    byte_order: str = "<",
) -> None:
    """Write a (rows, cols, bands) cube as ENVI .hdr + .raw (the reader's test input)."""
    codes = {v: k for k, v in ENVI_DTYPES.items()}
    hdr = Path(hdr)
    kind = cube.dtype.newbyteorder("=").str[1:]
    if kind not in codes:
        raise ValueError(f"dtype {cube.dtype} has no ENVI code")
    layout = {"bsq": (2, 0, 1), "bil": (0, 2, 1), "bip": (0, 1, 2)}[interleave]
    lines, samples, bands = cube.shape
    data = np.ascontiguousarray(cube.transpose(layout)).astype(cube.dtype.newbyteorder(byte_order))
    data.tofile(hdr.with_suffix(".raw"))
    text = [
        "ENVI",
        f"samples = {samples}",
        f"lines = {lines}",
        f"bands = {bands}",
        "header offset = 0",
        "file type = ENVI Standard",
        f"data type = {codes[kind]}",
        f"interleave = {interleave}",
        f"byte order = {1 if byte_order == '>' else 0}",
    ]
    if wavelengths:
        text += ["wavelength units = Nanometers", "wavelength = {" + ", ".join(f"{w:g}" for w in wavelengths) + "}"]
    hdr.write_text("\n".join(text) + "\n")

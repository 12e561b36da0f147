"""Synthetic inputs for throughput measurements: a stained-looking slide, an HSI mosaic, a shard cohort.

Used by `medflow bench`, the benchmark scripts and the tests. Content only has to exercise the code
paths at realistic cost (tissue detection finds tissue, quality checks pass, decoding is real); the
demo cohort (`medflow.demo`, whose content is meant to be learned) is separate, and nothing in the
product depends on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import zoom

from ..core import fsio
from ..core.index import build_index
from ..core.manifest import ImageEntry
from ..core.shards import ShardWriter
from ..extract.wsi.annotations import write_asap_xml
from ..extract.wsi.pyramid import write_pyramid_tiff


def write_synthetic_cohort(
    root: str | os.PathLike,
    images: dict[str, tuple[str, list[int]]],
    class_names: list[str],
    patch_shape: tuple[int, ...] = (16, 16, 3),
    dtype: str = "uint8",
    chunk_patches: int = 32,
    seed: int = 0,
    cohort: str = "synthetic",
    kind: str = "wsi",
    compression: str = "none",
    make_patches: Callable[[np.random.Generator, int], np.ndarray] | None = None,
) -> str:
    """Write one real shard per image (``image_id -> (patient_id, labels)``) through ``ShardWriter``,
    plus extraction records and the cohort index; return the index path. Pixels are uniform noise
    unless ``make_patches(rng, n)`` supplies them."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    records = []
    for image_id, (patient_id, label_list) in images.items():
        labels = np.asarray(label_list, dtype=np.int64)
        n = len(labels)
        if make_patches is not None:
            patches = make_patches(rng, n)
        elif np.dtype(dtype).kind == "f":
            patches = rng.standard_normal((n, *patch_shape)).astype(dtype)
        else:
            patches = rng.integers(0, 256, size=(n, *patch_shape), dtype=np.uint8).astype(dtype)
        attrs = {
            "kind": kind,
            "image_id": image_id,
            "patient_id": patient_id,
            "cohort": cohort,
            "class_names": class_names,
            "patch_size": patch_shape[0],
            "channels": patch_shape[-1],
            "seed": seed,
        }
        shard = root / "shards" / f"{image_id}.h5"
        with ShardWriter(
            shard, patch_shape, dtype, attrs, chunk_patches=chunk_patches, compression=compression
        ) as writer:
            for lo in range(0, n, 256):
                coords = np.column_stack([np.arange(lo, min(lo + 256, n))] * 2)
                writer.append(patches[lo : lo + 256], coords, labels[lo : lo + 256])
        record = shard.with_name(f"{image_id}.record.json")
        fsio.write_json(
            record,
            {"status": "ok", "shard": shard.name, "image_id": image_id, "patient_id": patient_id, "cohort": cohort},
        )
        records.append(record)
    index_path = root / "index" / f"{cohort}.json"
    build_index(records, index_path, cohort, kind)
    return str(index_path)


def _smooth(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1): a coarse random grid upsampled (cubic)."""
    coarse = rng.random((shape[0] // cell + 2, shape[1] // cell + 2))
    return np.clip(zoom(coarse, cell, order=3)[: shape[0], : shape[1]], 0.0, 1.0)


def write_slide(directory: Path, rng: np.random.Generator, side: int, mpp: float) -> ImageEntry:
    """A side×side pyramidal TIFF of pink/purple tissue in an ellipse on white, and an ASAP XML tumour
    polygon in its centre; returns its manifest row."""
    yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
    tissue = (xx / 0.42) ** 2 + (yy / 0.40) ** 2 < 1.0
    texture = _smooth(rng, (side, side), 32)[..., None]
    stain = np.array([200.0, 120.0, 180.0]) - 90.0 * texture * np.array([0.6, 1.0, 0.4])
    rgb = np.where(tissue[..., None], stain, 242.0) + rng.normal(0.0, 4.0, (side, side, 3))
    slide, xml = directory / "bench_slide.tiff", directory / "bench_slide.xml"
    write_pyramid_tiff(slide, np.clip(rgb, 0, 255).astype(np.uint8), mpp)
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    write_asap_xml(xml, {"metastases": [side * (0.5 + 0.18 * np.stack([np.cos(angles), np.sin(angles)], 1))]})
    return ImageEntry(image_id="bench_slide", patient_id="bench", image=str(slide), annotation=str(xml))


def write_hsi(directory: Path, rng: np.random.Generator, height: int, width: int, size: int) -> ImageEntry:
    """A raw size×size snapshot mosaic with white and dark frames (12-bit counts) and a ground truth of
    four classes in blocks; returns its manifest row."""
    h, w, bands = height // size, width // size, size * size
    truth = (np.arange(h)[:, None] * 2 // h) * 2 + np.arange(w)[None, :] * 2 // w
    spectra = 0.3 + 0.5 * rng.random((4, bands))
    reflectance = spectra[truth] * (1 + 0.05 * rng.standard_normal((h, w, 1)))

    def mosaic(cube: np.ndarray) -> np.ndarray:  # band b at tile offset (b // size, b % size)
        return cube.reshape(h, w, size, size).transpose(0, 2, 1, 3).reshape(h * size, w * size)

    dark = 90.0 + 6.0 * rng.random((h * size, w * size))
    gain = np.broadcast_to(2600.0 + 500.0 * rng.random(bands), (h, w, bands))
    frames = {"raw": dark + mosaic(reflectance * gain), "white": dark + mosaic(gain), "dark": dark}
    paths = {}
    for name, frame in frames.items():
        paths[name] = directory / f"hsi_{name}.npy"
        np.save(paths[name], np.clip(np.round(frame), 0, 4095).astype(np.uint16))
    gt = directory / "hsi_gt.png"
    Image.fromarray((truth + 1).astype(np.uint8)).save(gt)
    return ImageEntry(
        image_id="bench_hsi",
        patient_id="bench",
        image=str(paths["raw"]),
        annotation=str(gt),
        white=str(paths["white"]),
        dark=str(paths["dark"]),
    )


def write_placeholder_cohort(root: str | os.PathLike, slides: int, slides_per_patient: int = 3) -> Path:
    """A WSI manifest of ``slides`` empty slide files (``s0000000.svs``…), for dry runs only: Snakemake
    needs the inputs to exist to plan a DAG, never reads them. Returns the manifest path."""
    root = Path(root)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    lines = ["image_id,patient_id,image"]
    for i in range(slides):
        name = f"s{i:07d}"
        (root / "slides" / f"{name}.svs").touch()
        lines.append(f"{name},p{i // slides_per_patient:07d},slides/{name}.svs")
    manifest = root / "manifest.csv"
    fsio.write_text(manifest, "\n".join(lines) + "\n")
    return manifest

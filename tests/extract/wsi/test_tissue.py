"""Tissue masks (medflow.tissue): Otsu + morphology on real OpenSlide reads, user mask images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from medflow.core.errors import InputError
from medflow.extract.wsi import tissue
from medflow.extract.wsi.pyramid import write_pyramid_tiff

TISSUE_CFG = {
    "method": "otsu",
    "channel": "saturation",
    "mask_mpp": 16.0,
    "threshold": 0,
    "min_threshold": 8,
    "closing_um": 64,
    "opening_um": 32,
    "min_region_um2": 20000,
}


def _blob_slide(path: Path, width: int = 2048, height: int = 1536, blank: bool = False) -> np.ndarray:
    """White slide with one pink textured ellipse (and a 2-px speck of dust); returns the tissue truth."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    truth = ((xx - 900) / 600.0) ** 2 + ((yy - 700) / 400.0) ** 2 < 1
    rgb = np.full((height, width, 3), 240, np.uint8)
    if not blank:
        pink = np.stack(
            [
                rng.integers(180, 230, truth.sum()),
                rng.integers(90, 150, truth.sum()),
                rng.integers(150, 200, truth.sum()),
            ],
            axis=1,
        )
        rgb[truth] = pink
        rgb[100:102, 1800:1802] = (120, 40, 120)  # dust: far below min_region_um2
    rgb = (rgb.astype(np.int16) + rng.integers(-3, 4, rgb.shape)).clip(0, 255).astype(np.uint8)
    write_pyramid_tiff(path, rgb, mpp=0.5, tile=256)
    return truth & ~blank


def test_otsu_threshold_separates_two_modes() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(20, 5, 5000), rng.normal(120, 10, 3000)]).clip(0, 255).astype(np.uint8)
    t = tissue.otsu_threshold(values)
    assert 40 < t < 100


def test_otsu_mask_finds_the_tissue_on_a_real_pyramid(tmp_path: Path) -> None:
    truth = _blob_slide(tmp_path / "blob.tiff")
    slide = openslide.OpenSlide(str(tmp_path / "blob.tiff"))
    assert slide.level_count > 2
    tm = tissue.otsu_mask(slide, 0.5, TISSUE_CFG)
    assert tm.level > 0 and tm.cell == pytest.approx(32.0)  # 16 µm/px at 0.5 µm/px level 0
    rows, cols = tm.mask.shape
    centres = truth[(np.arange(rows) * tm.cell + tm.cell / 2).astype(int)][
        :, (np.arange(cols) * tm.cell + tm.cell / 2).astype(int)
    ]
    iou = (tm.mask & centres).sum() / (tm.mask | centres).sum()
    assert iou > 0.9, iou
    assert not tm.mask[100 // 32, 1800 // 32], "dust speck should be removed"


def test_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    _blob_slide(tmp_path / "blank.tiff", blank=True)
    tm = tissue.otsu_mask(openslide.OpenSlide(str(tmp_path / "blank.tiff")), 0.5, TISSUE_CFG)
    assert not tm.mask.any()
    assert tm.threshold >= TISSUE_CFG["min_threshold"]


def test_clean_fills_gaps_and_drops_small_regions() -> None:
    mask = np.zeros((60, 60), bool)
    mask[10:40, 10:40] = True
    mask[25, 10:40] = False  # 1-cell crack: closed
    mask[50, 50] = True  # isolated pixel: removed
    out = tissue.clean(mask, cell_um=16, closing_um=64, opening_um=32, min_region_um2=16 * 16 * 20)
    assert out[25, 20] and not out[50, 50]
    assert out[12:38, 12:38].all()


def test_user_mask_image(tmp_path: Path) -> None:
    img = np.zeros((150, 200), np.uint8)
    img[30:60, 40:90] = 255
    Image.fromarray(img).save(tmp_path / "mask.png")
    tm = tissue.user_mask(tmp_path / "mask.png", 4000, 3000)
    assert tm.cell == pytest.approx(20.0) and tm.mask.sum() == 30 * 50
    with pytest.raises(InputError, match="aspect ratio"):
        tissue.user_mask(tmp_path / "mask.png", 4000, 4000)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="unreadable tissue mask"):
        tissue.user_mask(tmp_path / "broken.png", 4000, 3000)


def test_associated_thumbnail_is_used_for_one_level_slides(shared_data: Path) -> None:
    slide = openslide.OpenSlide(str(shared_data / "cmu1_small_region" / "CMU-1-Small-Region.svs"))
    assert slide.level_count == 1
    rgb, opaque, cell, level = tissue.thumbnail(slide, 32.0)
    assert level == -1 and 16 < cell <= 32
    assert rgb.shape[1] == pytest.approx(slide.dimensions[0] / cell, abs=1)
    tm = tissue.otsu_mask(slide, 0.499, TISSUE_CFG)
    assert 0.1 < tm.fraction < 0.9

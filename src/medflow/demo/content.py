"""Content of the synthetic demo cohort: H&E-like slides with tumour polygons, HSI mosaics of five classes.

WSI: tissue on a white background; tumour regions are drawn from polygons with denser, larger,
darker nuclei (the polygons are returned as drawn, as a pathologist's outline would be). HSI: raw
2-D snapshot mosaics of a 5×5-pattern camera (25 bands, 665–975 nm) with white and dark reference
frames, and a ground-truth map of the brain study's five classes (healthy, tumour, venous blood,
arterial blood, dura mater) whose spectra differ, healthy vs tumour only slightly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from ..extract.hsi.chain import CAMERA_WAVELENGTHS_NM

HSI_CLASSES = ("healthy", "tumour", "venous", "arterial", "dura")
HSI_WAVELENGTHS = CAMERA_WAVELENGTHS_NM


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = max(2, shape[0] // cell + 2), max(2, shape[1] // cell + 2)
    coarse = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def _nuclei(rng: np.random.Generator, shape: tuple[int, int], density: float, radius: float) -> np.ndarray:
    """Soft nucleus mask in [0,1]: random centres blurred to blobs of ~radius px."""
    points = np.zeros(shape, np.float32)
    n = int(density * shape[0] * shape[1])
    points[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = 1.0
    blobs = gaussian_filter(points, sigma=radius, truncate=2.5) * (2 * np.pi * radius**2)
    return np.clip((blobs - 0.35) * 3.0, 0.0, 1.0)


def _star_polygon(rng: np.random.Generator, centre: tuple[float, float], radius: float, k: int = 14) -> np.ndarray:
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = radius * rng.uniform(0.6, 1.0, k)
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)


def _polygon_mask(shape: tuple[int, int], polygons: list[np.ndarray]) -> np.ndarray:
    img = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        draw.polygon([tuple(p) for p in poly], fill=1)
    return np.asarray(img, dtype=bool)


def make_slide(
    rng: np.random.Generator, width: int, height: int, mpp: float, with_tumour: bool = True
) -> tuple[np.ndarray, list[np.ndarray]]:
    """An H&E-like RGB image and its tumour polygons (level-0 x, y); ``with_tumour=False``: a normal slide."""
    shape = (height, width)
    um = 1.0 / mpp  # pixels per µm
    tissue = _smooth_field(rng, shape, cell=int(400 * um)) * 0.6 + _smooth_field(rng, shape, cell=int(120 * um)) * 0.4
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ellipse = ((xx - width / 2) / (0.42 * width)) ** 2 + ((yy - height / 2) / (0.40 * height)) ** 2
    tissue_mask = (tissue - 0.45 * ellipse) > 0.12
    # Tumour: 1–2 irregular polygons placed where there is tissue.
    polygons: list[np.ndarray] = []
    candidates = np.argwhere(tissue_mask[:: int(50 * um), :: int(50 * um)]) * int(50 * um)
    for _ in range(int(rng.integers(1, 3)) if with_tumour else 0):
        cy, cx = candidates[rng.integers(len(candidates))]
        poly = _star_polygon(rng, (float(cx), float(cy)), radius=float(rng.uniform(180, 320) * um))
        polygons.append(np.clip(poly, 0, [width - 1, height - 1]))  # outlines stay on the slide
    tumour = _polygon_mask(shape, polygons)

    fibre = _smooth_field(rng, shape, cell=int(12 * um))
    stroma = np.stack([236 - 25 * fibre, 150 - 40 * fibre, 196 - 25 * fibre], axis=-1)
    normal_nuc = _nuclei(rng, shape, density=0.0025 / um**2, radius=2.2 * um)
    tumour_nuc = _nuclei(rng, shape, density=0.0060 / um**2, radius=3.2 * um)
    nuclei = np.where(tumour, tumour_nuc, normal_nuc)[..., None]
    nucleus_colour = np.where(
        tumour[..., None], np.array([72, 38, 118], np.float32), np.array([118, 72, 160], np.float32)
    )
    tissue_rgb = stroma * (1 - nuclei) + nucleus_colour * nuclei
    tissue_rgb = np.where(tumour[..., None], tissue_rgb * np.array([0.93, 0.88, 0.97], np.float32), tissue_rgb)
    background = np.full((*shape, 3), 242.0, np.float32)
    rgb = np.where(tissue_mask[..., None], tissue_rgb, background)
    rgb += rng.normal(0.0, 3.0, rgb.shape).astype(np.float32)
    # Only the part of each polygon that lies on tissue is tumour in the pixels; keep polygons as drawn
    # (pathologists' outlines also cross small background gaps) — the extractor intersects with tissue.
    return np.clip(rgb, 0, 255).astype(np.uint8), polygons


# ---- HSI content --------------------------------------------------------------------------------
def hsi_signatures() -> np.ndarray:
    """(5, 25) reflectance spectra of the five classes over 665–975 nm."""
    w = (HSI_WAVELENGTHS - 665.0) / 310.0  # 0..1
    bump = lambda c, s: np.exp(-0.5 * ((HSI_WAVELENGTHS - c) / s) ** 2)  # noqa: E731
    healthy = 0.55 + 0.15 * w - 0.05 * bump(760, 25)
    tumour = 0.57 + 0.11 * w - 0.03 * bump(760, 25) + 0.025 * bump(900, 40)  # deliberately close to healthy
    venous = 0.25 + 0.35 * w - 0.12 * bump(760, 15)  # deoxy-haemoglobin dip at 760 nm
    arterial = 0.32 + 0.38 * w - 0.02 * bump(760, 15)  # oxy-haemoglobin: flatter red edge
    dura = 0.72 + 0.05 * w - 0.04 * bump(970, 30)  # bright, water band near 970 nm
    return np.stack([healthy, tumour, venous, arterial, dura]).astype(np.float32)


def make_hsi(
    rng: np.random.Generator, mosaic_h: int, mosaic_w: int, size: int = 5
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw mosaic, white and dark frames (uint16 counts) and the ground-truth map (uint8, 0 = unlabelled)."""
    h, w = mosaic_h // size, mosaic_w // size
    # Class regions: Voronoi cells of random centres, every class present at least once.
    n_centres = 10
    classes = np.concatenate([np.arange(5), rng.integers(0, 5, n_centres - 5)])
    centres = np.stack([rng.uniform(0, h, n_centres), rng.uniform(0, w, n_centres)], axis=1)
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    nearest = d2.argmin(axis=-1)
    truth = classes[nearest]
    # Sparse labelling, as surgeons' ground truth: only the core of each region is labelled.
    core = np.sqrt(d2.min(axis=-1)) < 0.22 * min(h, w)
    gt = np.where(core, truth + 1, 0).astype(np.uint8)

    signatures = hsi_signatures()
    reflectance = signatures[truth] * (1 + 0.04 * rng.standard_normal((h, w, 1)))  # within-class variation
    reflectance += 0.02 * rng.standard_normal(reflectance.shape)
    illumination = 0.6 + 0.4 * _smooth_field(rng, (h, w), cell=max(4, h // 3))[..., None]  # removed by RMS norm
    reflectance = np.clip(reflectance * illumination, 0.01, 1.2).astype(np.float32)

    band_pos = np.arange(size * size)  # band b sits at mosaic offset (b // size, b % size)

    def to_mosaic(cube: np.ndarray) -> np.ndarray:
        return cube[..., band_pos].reshape(h, w, size, size).transpose(0, 2, 1, 3).reshape(h * size, w * size)

    dark = 90.0 + 6.0 * rng.random((mosaic_h, mosaic_w))
    gain = (2600.0 + 500.0 * rng.random((1, 1, size * size))) * (0.85 + 0.15 * _smooth_field(rng, (h, w), 8)[..., None])
    white = dark + to_mosaic(np.broadcast_to(gain, (h, w, size * size)).astype(np.float32))
    raw = dark + to_mosaic(reflectance * gain) + rng.normal(0, 4.0, (mosaic_h, mosaic_w))

    def as_counts(a: np.ndarray) -> np.ndarray:  # a 12-bit sensor
        return np.clip(np.round(a), 0, 4095).astype(np.uint16)

    return as_counts(raw), as_counts(white), as_counts(dark), gt

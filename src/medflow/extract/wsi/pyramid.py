"""Writing a pyramidal TIFF that OpenSlide opens with every level (demo slides, benchmark inputs, tests).

Each level is a top-level IFD (OpenSlide ignores SubIFD levels; `subfiletype=1` marks reduced
levels), and the resolution tags in CENTIMETER give ``openslide.mpp-x/y``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...core import fsio


def write_pyramid_tiff(
    path: str | Path, rgb: np.ndarray, mpp: float, tile: int = 256, compression: str = "deflate", min_size: int = 256
) -> int:
    """Write ``rgb`` (H,W,3 uint8) as a tiled pyramidal TIFF that OpenSlide opens with all levels.

    Levels are 2× box-filtered reductions, each a top-level IFD (SubIFDs would be ignored by
    OpenSlide). Returns the number of levels. ``compression``: deflate (lossless), jpeg (needs
    imagecodecs) or none.
    """
    import tifffile

    codec = {"deflate": "zlib", "zlib": "zlib", "jpeg": "jpeg", "none": None}[compression]
    # Level-1 deflate: noisy tissue barely compresses better at higher levels and costs 10× the time.
    codec_args = {"level": 1} if codec == "zlib" else None
    levels = [np.ascontiguousarray(rgb, dtype=np.uint8)]
    while min(levels[-1].shape[:2]) // 2 >= min_size:
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        quads = prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
        levels.append(((quads.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8))
    with fsio.atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tif:
            for i, level in enumerate(levels):
                px_per_cm = 10_000.0 / (mpp * 2**i)
                tif.write(
                    level,
                    tile=(tile, tile),
                    compression=codec,
                    compressionargs=codec_args,
                    photometric="rgb",
                    subfiletype=1 if i else 0,
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    metadata=None,
                )
    return len(levels)

"""Colour spaces of stain normalisation and augmentation, vectorised in float32.

Arrays are **planar**: channels on axis 0, shape ``(3, ...)`` (``np.moveaxis(img, -1, 0)`` for an
(H, W, 3) image), so every channel is one contiguous plane and a 3×3 colour matrix is one matrix
product over all pixels.

- **CIE L*a*b*** (D65 white, 2° observer) from sRGB (IEC 61966-2-1 transfer curve): the definition
  of scikit-image's ``rgb2lab`` and of torchstain's numpy backend; L in 0..100, a and b unscaled.
  Not OpenCV's 8-bit Lab (L·255/100, a+128, b+128, rounded to integers): a mean or standard deviation
  there is the same number in other units, up to that rounding.
- **Optical density** (Beer-Lambert), Macenko's convention: ``OD = -ln((I + 1) / Io)`` of uint8 I with
  background intensity Io (240 in Macenko's code), inverted exactly by ``I = Io·exp(-OD) - 1``
  (Macenko's MATLAB code and torchstain recompose with ``Io·exp(-OD)``, one level brighter).
- **HED** (Ruifrok & Johnston 2001 stain vectors) in scikit-image's ``rgb2hed``/``hed2rgb`` convention:
  OD in units of -ln(1e-6), intensities floored at 1e-6; negative stain amounts are kept (scikit-image
  clips them at 0, which makes even an unchanged HED image come back altered).
"""

from __future__ import annotations

import numpy as np

# sRGB primaries → CIE XYZ (scikit-image `xyz_from_rgb`, the same in torchstain) and the D65 white.
XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_EPSILON = 0.008856  # CIE ε: below it f(t) is linear
_KAPPA_116 = 7.787  # κ/116, the slope of that linear part
_F_EPSILON = 0.2068966  # f(ε) = ∛ε: where the inverse switches to the linear part

# Ruifrok & Johnston's H, E and DAB vectors (rows), scikit-image's `rgb_from_hed`.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
HED_LOG_ADJUST = float(np.log(1e-6))  # scikit-image's OD unit: OD 1 at intensity 1e-6

_F32 = np.float32


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(
        c > _F32(0.04045),
        np.power((np.maximum(c, _F32(0.04045)) + _F32(0.055)) / _F32(1.055), _F32(2.4)),
        c / _F32(12.92),
    ).astype(np.float32, copy=False)


# Exact linear values of the 256 uint8 levels: a table lookup instead of a power per pixel.
_LINEAR_OF_UINT8 = _srgb_to_linear(np.arange(256, dtype=np.float32) / _F32(255))


def mix(matrix: np.ndarray, planar: np.ndarray) -> np.ndarray:
    """``matrix`` (3×3) applied to every pixel of a planar (3, ...) array, in float32.

    einsum, not matmul: a BLAS product with an inner dimension of 3 is slower, more so threaded."""
    return np.einsum("ij,j...->i...", matrix.astype(np.float32), planar.astype(np.float32, copy=False))


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] float → uint8, rounded to nearest and clipped."""
    scaled = np.multiply(unit, _F32(255), dtype=np.float32)
    np.clip(scaled, 0, 255, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (0..255, float32) of planar uint8 RGB: OpenCV's and PIL's grey."""
    f = rgb.astype(np.float32, copy=False)
    return f[0] * _F32(0.299) + f[1] * _F32(0.587) + f[2] * _F32(0.114)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Planar sRGB — uint8, or float in [0, 1] — → planar float32 CIE L*a*b*.

    Few, reused temporaries: fresh multi-MB arrays cost page faults as much as the arithmetic."""
    lin = _LINEAR_OF_UINT8[rgb] if rgb.dtype == np.uint8 else _srgb_to_linear(rgb.astype(np.float32))
    # Dividing by the white point is folded into the matrix rows.
    xyz = mix(XYZ_FROM_RGB / D65_WHITE[:, None], lin)
    f = np.cbrt(xyz)
    dark = xyz <= _F32(_EPSILON)  # the linear part of f (L* < 8): rare in stained tissue
    if dark.any():
        f[dark] = xyz[dark] * _F32(_KAPPA_116) + _F32(16 / 116)
    lab = xyz  # reused for the result
    np.multiply(f[1], _F32(116), out=lab[0])
    lab[0] -= _F32(16)
    np.subtract(f[0], f[1], out=lab[1])
    lab[1] *= _F32(500)
    np.subtract(f[1], f[2], out=lab[2])
    lab[2] *= _F32(200)
    return lab


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Planar CIE L*a*b* → planar sRGB float32, clipped to [0, 1]."""
    lab = lab.astype(np.float32, copy=False)
    f = np.empty_like(lab)
    np.add(lab[0], _F32(16), out=f[1])
    f[1] /= _F32(116)
    np.divide(lab[1], _F32(500), out=f[0])
    f[0] += f[1]
    np.divide(lab[2], _F32(-200), out=f[2])
    f[2] += f[1]
    t = f * f
    t *= f
    dark = f <= _F32(_F_EPSILON)  # the linear part of the inverse: rare in stained tissue
    if dark.any():
        t[dark] = (f[dark] - _F32(16 / 116)) / _F32(_KAPPA_116)
    out = mix(RGB_FROM_XYZ * D65_WHITE[None, :], t)  # × white, then XYZ → linear sRGB
    dark = out <= _F32(0.0031308)  # the linear part of the sRGB curve
    low = out[dark] * _F32(12.92) if dark.any() else None
    np.maximum(out, _F32(0.0031308), out=out)
    np.power(out, _F32(1 / 2.4), out=out)
    out *= _F32(1.055)
    out -= _F32(0.055)
    if low is not None:
        out[dark] = low
    return np.clip(out, 0, 1, out=out)


def optical_density(rgb: np.ndarray, io: float) -> np.ndarray:
    """Macenko's OD of uint8 RGB: -ln((I + 1) / Io), float32 (negative for I ≥ Io). Any layout."""
    table = (-np.log((np.arange(256, dtype=np.float64) + 1) / io)).astype(np.float32)
    return table[rgb]


def od_to_rgb(od: np.ndarray, io: float) -> np.ndarray:
    """Inverse of `optical_density` as uint8: Io·exp(-OD) - 1, clipped to 0..255 and rounded. Any layout."""
    out = np.negative(od, dtype=np.float32)
    np.exp(out, out=out)
    out *= _F32(io)
    out -= _F32(1)
    np.clip(out, 0, 255, out=out)
    np.rint(out, out=out)
    return out.astype(np.uint8)


_HED_OD_OF_UINT8 = (np.log(np.maximum(np.arange(256) / 255, 1e-6)) / HED_LOG_ADJUST).astype(np.float32)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Planar uint8 RGB → planar H, E, DAB stain amounts (scikit-image ``rgb2hed``, not clipped), float32."""
    return mix(HED_FROM_RGB.T, _HED_OD_OF_UINT8[rgb])


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Planar H, E, DAB amounts → planar sRGB float32 in [0, 1] (scikit-image ``hed2rgb``)."""
    out = mix(RGB_FROM_HED.T * HED_LOG_ADJUST, hed)
    np.exp(out, out=out)
    return np.clip(out, 0, 1, out=out)

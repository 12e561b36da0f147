"""Readers for hyperspectral inputs: raw mosaic frames, white/dark references, cubes, ground truth, matrices.

Every reader returns NumPy arrays in the layout the chain expects and raises
``medflow.errors.InputError(path, problem)`` for anything it cannot use (unreadable, wrong
dimensionality, NaN/inf, truncated ENVI data), so the CLI prints one line naming the file.

Layouts: mosaics and references (rows, cols); cubes (rows, cols, bands); ground truth (rows, cols)
integers. MATLAB v7.3 files are HDF5 with column-major storage, so h5py sees every array with its
axes reversed; they are transposed back here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...core.errors import InputError

MOSAIC_SUFFIXES = (".tif", ".tiff", ".npy")
CUBE_SUFFIXES = (".hdr", ".mat", ".npy")
GT_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".mat")
MATRIX_SUFFIXES = (".npy", ".csv")

# ENVI "data type" codes → NumPy dtypes (byte order applied separately).
ENVI_DTYPES = {1: "u1", 2: "i2", 3: "i4", 4: "f4", 5: "f8", 12: "u2", 13: "u4", 14: "i8", 15: "u8"}
ENVI_DATA_SUFFIXES = ("", ".img", ".raw", ".dat", ".bsq", ".bil", ".bip", ".IMG", ".RAW", ".DAT")


@dataclass
class HsiImage:
    """A loaded input image: a 2-D raw mosaic or a 3-D cube (rows, cols, bands)."""

    data: np.ndarray
    kind: str  # "mosaic" | "cube"
    wavelengths: list[float] = field(default_factory=list)  # from the file (ENVI header), if any


# ---- generic helpers ------------------------------------------------------------------------------
def suffix(path: str | Path) -> str:
    return Path(path).suffix.lower()


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    return path


def check_finite(array: np.ndarray, path: str | Path, what: str = "data") -> None:
    """NaN/inf anywhere in float data is a corrupt input: refuse it rather than propagate it."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InputError(path, f"{what} contains {bad} NaN/inf value(s)")


def _numeric(array: np.ndarray, path: str | Path) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise InputError(path, f"expected numeric data, found dtype {array.dtype}")
    return array


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path, f"not a readable .npy array ({exc})") from None


def _load_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        return tifffile.imread(path)
    except Exception as exc:  # tifffile raises several types for corrupt files
        raise InputError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None


# ---- MATLAB ---------------------------------------------------------------------------------------
def _is_hdf5(path: Path) -> bool:
    import h5py

    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def mat_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every numeric array of a .mat file (v5 via scipy.io, v7.3 via h5py), in MATLAB's axis order."""
    path = _require_file(path)
    if _is_hdf5(path):
        return _mat73_arrays(path)
    import scipy.io

    try:
        content = scipy.io.loadmat(path)
    except NotImplementedError:  # v7.3 without an HDF5 signature scipy would recognise
        return _mat73_arrays(path)
    except Exception as exc:
        raise InputError(path, f"not a readable MATLAB file ({type(exc).__name__}: {exc})") from None
    return {
        k: v
        for k, v in content.items()
        if not k.startswith("__") and isinstance(v, np.ndarray) and v.dtype.kind in "biuf"
    }


def _mat73_arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as h5:
            for name, obj in h5.items():
                if name.startswith("#") or not isinstance(obj, h5py.Dataset) or obj.dtype.kind not in "biuf":
                    continue
                # Column-major storage: h5py shows MATLAB's (H,W,B) as (B,W,H); .T restores it.
                out[name] = np.ascontiguousarray(obj[()].T)
    except OSError as exc:
        raise InputError(path, f"not a readable MATLAB v7.3 (HDF5) file ({exc})") from None
    return out


def _pick_mat_array(path: Path, ndim: int, what: str) -> np.ndarray:
    arrays = {k: v for k, v in mat_arrays(path).items() if np.squeeze(v).ndim == ndim or v.ndim == ndim}
    if not arrays:
        raise InputError(path, f"no {ndim}-D numeric variable ({what}) in the MATLAB file")
    # Several candidates (e.g. a cube and a thumbnail): the largest is the image.
    name = max(arrays, key=lambda k: arrays[k].size)
    arr = arrays[name]
    return arr if arr.ndim == ndim else np.squeeze(arr)


# ---- ENVI -----------------------------------------------------------------------------------------
def parse_envi_header(path: str | Path) -> dict[str, str]:
    """Key → raw value of an ENVI .hdr (brace values may span lines). Keys are lower-case."""
    path = _require_file(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise InputError(path, f"cannot read ENVI header ({exc})") from None
    if not text.lstrip().upper().startswith("ENVI"):
        raise InputError(path, "not an ENVI header (first line is not 'ENVI')")
    fields: dict[str, str] = {}
    for match in re.finditer(r"^\s*([^=\n]+?)\s*=\s*(\{[^}]*\}|[^\n]*)", text, flags=re.M):
        fields[match.group(1).strip().lower()] = match.group(2).strip()
    return fields


def _envi_int(fields: dict[str, str], key: str, path: Path, default: int | None = None) -> int:
    if key not in fields:
        if default is None:
            raise InputError(path, f"ENVI header lacks '{key}'")
        return default
    try:
        return int(fields[key])
    except ValueError:
        raise InputError(path, f"ENVI header '{key}' = {fields[key]!r} is not an integer") from None


def _envi_list(value: str) -> list[str]:
    return [v.strip() for v in value.strip("{}").split(",") if v.strip()]


def envi_data_file(hdr: Path, fields: dict[str, str]) -> Path:
    if "data file" in fields:
        candidate = hdr.parent / fields["data file"]
        if candidate.is_file():
            return candidate
    base = hdr.with_suffix("")
    for ext in ENVI_DATA_SUFFIXES:
        candidate = Path(str(base) + ext)
        if candidate.is_file() and candidate != hdr:
            return candidate
    tried = ",".join(ENVI_DATA_SUFFIXES)
    raise InputError(hdr, f"ENVI data file not found next to the header (tried {base.name}{{{tried}}})")


def read_envi(hdr: str | Path) -> tuple[np.ndarray, list[float]]:
    """Read an ENVI cube (bsq/bil/bip, any byte order) as (rows, cols, bands) plus its wavelengths."""
    hdr = _require_file(hdr)
    fields = parse_envi_header(hdr)
    samples, lines, bands = (_envi_int(fields, k, hdr) for k in ("samples", "lines", "bands"))
    offset = _envi_int(fields, "header offset", hdr, 0)
    code = _envi_int(fields, "data type", hdr)
    if code not in ENVI_DTYPES:
        raise InputError(hdr, f"unsupported ENVI data type {code}")
    order = ">" if _envi_int(fields, "byte order", hdr, 0) == 1 else "<"
    dtype = np.dtype(order + ENVI_DTYPES[code]) if ENVI_DTYPES[code] != "u1" else np.dtype("u1")
    interleave = fields.get("interleave", "bsq").lower()
    shapes = {"bsq": (bands, lines, samples), "bil": (lines, bands, samples), "bip": (lines, samples, bands)}
    to_hwb = {"bsq": (1, 2, 0), "bil": (0, 2, 1), "bip": (0, 1, 2)}
    if interleave not in shapes:
        raise InputError(hdr, f"unsupported ENVI interleave {interleave!r}")
    data_file = envi_data_file(hdr, fields)
    count = samples * lines * bands
    if data_file.stat().st_size < offset + count * dtype.itemsize:
        raise InputError(
            data_file,
            f"ENVI data truncated: {data_file.stat().st_size} bytes, header needs {offset + count * dtype.itemsize}",
        )
    raw = np.fromfile(data_file, dtype=dtype, count=count, offset=offset)
    cube = np.ascontiguousarray(raw.reshape(shapes[interleave]).transpose(to_hwb[interleave]))
    if cube.dtype.byteorder == ">":
        cube = cube.astype(cube.dtype.newbyteorder("="))
    wavelengths: list[float] = []
    if "wavelength" in fields:
        try:
            wavelengths = [float(v) for v in _envi_list(fields["wavelength"])]
        except ValueError:
            raise InputError(hdr, "ENVI 'wavelength' values are not numbers") from None
        if len(wavelengths) != bands:
            raise InputError(hdr, f"ENVI header lists {len(wavelengths)} wavelengths for {bands} bands")
        units = fields.get("wavelength units", "nm").lower()
        if units.startswith("micro") or units in ("um", "µm"):
            wavelengths = [w * 1000.0 for w in wavelengths]
    return cube, wavelengths


# ---- public readers -------------------------------------------------------------------------------
def read_image(path: str | Path) -> HsiImage:
    """A manifest `image`: raw mosaic (.tif/.tiff, 2-D .npy) or cube (ENVI .hdr, .mat, 3-D .npy)."""
    path = _require_file(path)
    ext = suffix(path)
    wavelengths: list[float] = []
    if ext in (".tif", ".tiff"):
        data = _load_tiff(path)
    elif ext == ".npy":
        data = _load_npy(path)
    elif ext == ".hdr":
        data, wavelengths = read_envi(path)
    elif ext == ".mat":
        data = _pick_mat_array(path, 3, "cube")
    else:
        raise InputError(
            path, f"unsupported image format {ext!r}; expected one of {sorted(set(MOSAIC_SUFFIXES + CUBE_SUFFIXES))}"
        )
    data = _numeric(np.asarray(data), path)
    if data.ndim == 3 and ext in (".tif", ".tiff") and data.shape[0] == 1:
        data = data[0]
    if data.ndim not in (2, 3) or (ext in (".tif", ".tiff") and data.ndim != 2):
        raise InputError(path, f"expected a 2-D mosaic or a (rows, cols, bands) cube, found shape {data.shape}")
    if 0 in data.shape:
        raise InputError(path, f"image is empty (shape {data.shape}: no rows, columns or bands)")
    check_finite(data, path, "image")
    return HsiImage(data=data, kind="mosaic" if data.ndim == 2 else "cube", wavelengths=wavelengths)


def read_reference(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A white or dark reference frame of the mosaic's shape; a stack of frames (n, rows, cols) is averaged."""
    path = _require_file(path)
    ext = suffix(path)
    if ext in (".tif", ".tiff"):
        data = _load_tiff(path)
    elif ext == ".npy":
        data = _load_npy(path)
    else:
        raise InputError(path, f"unsupported reference format {ext!r}; expected .tif/.tiff/.npy")
    data = _numeric(np.asarray(data), path)
    check_finite(data, path, "reference frame")
    if data.ndim == 3 and data.shape[1:] == tuple(shape):
        data = data.mean(axis=0, dtype=np.float64)  # several captured frames: average out noise
    if data.shape != tuple(shape):
        raise InputError(path, f"reference frame shape {data.shape} differs from the mosaic's {tuple(shape)}")
    return data


def read_ground_truth(path: str | Path) -> np.ndarray:
    """A ground-truth map (rows, cols) of integer values: .png/.tif (single channel), .npy or .mat."""
    path = _require_file(path)
    ext = suffix(path)
    if ext == ".png":
        from PIL import Image

        try:
            with Image.open(path) as img:
                if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                    raise InputError(path, f"ground truth must be a single-channel label image, found mode {img.mode}")
                data = np.asarray(img)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(path, f"not a readable PNG ({type(exc).__name__}: {exc})") from None
    elif ext in (".tif", ".tiff"):
        data = _load_tiff(path)
    elif ext == ".npy":
        data = _load_npy(path)
    elif ext == ".mat":
        data = _pick_mat_array(path, 2, "ground-truth map")
    else:
        raise InputError(path, f"unsupported ground-truth format {ext!r}; expected one of {list(GT_SUFFIXES)}")
    data = _numeric(np.asarray(data), path)
    if data.ndim != 2:
        raise InputError(path, f"ground truth must be 2-D (rows, cols), found shape {data.shape}")
    check_finite(data, path, "ground truth")
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise InputError(path, "ground truth holds non-integer values")
    return data.astype(np.int64, copy=False)


def read_matrix(path: str | Path) -> np.ndarray:
    """A spectral correction matrix (.npy, or .csv with comma/whitespace separators) as float32 2-D."""
    path = _require_file(path)
    ext = suffix(path)
    if ext == ".npy":
        data = _load_npy(path)
    elif ext == ".csv":
        try:
            text = path.read_text()
            delimiter = "," if "," in text else None
            data = np.loadtxt(path, delimiter=delimiter, ndmin=2, dtype=np.float64)
        except (OSError, ValueError) as exc:
            raise InputError(path, f"not a readable numeric CSV matrix ({exc})") from None
    else:
        raise InputError(path, f"unsupported correction-matrix format {ext!r}; expected .npy or .csv")
    data = _numeric(np.asarray(data), path)
    if data.ndim != 2:
        raise InputError(path, f"correction matrix must be 2-D, found shape {data.shape}")
    check_finite(data, path, "correction matrix")
    return data.astype(np.float32)

"""HSI readers: ENVI, MATLAB v5 / v7.3, .npy, TIFF, PNG ground truth, correction matrices, references."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import tifffile
from PIL import Image

from hsi_cohorts import write_envi
from medflow.core.errors import InputError
from medflow.extract.hsi import io as hsi_io


@pytest.fixture
def cube() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4000, (6, 7, 5)).astype(np.int16)


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_envi_round_trip(tmp_path: Path, cube: np.ndarray, interleave: str, byte_order: str) -> None:
    hdr = tmp_path / "img.hdr"
    write_envi(hdr, cube, interleave=interleave, wavelengths=[500, 600, 700, 800, 900], byte_order=byte_order)
    image = hsi_io.read_image(hdr)
    assert image.kind == "cube"
    np.testing.assert_array_equal(image.data, cube)
    assert image.wavelengths == [500, 600, 700, 800, 900]


def test_envi_header_details(tmp_path: Path, cube: np.ndarray) -> None:
    # Multi-line brace values, micrometre wavelengths, a header offset and an .img data file.
    offset = 16
    (tmp_path / "c.img").write_bytes(
        b"\0" * offset + np.ascontiguousarray(cube.transpose(2, 0, 1)).astype("<i2").tobytes()
    )
    (tmp_path / "c.hdr").write_text(
        "ENVI\ndescription = {a cube\n  over two lines}\nsamples = 7\nlines = 6\nbands = 5\n"
        f"header offset = {offset}\ndata type = 2\ninterleave = bsq\nbyte order = 0\n"
        "wavelength units = Micrometers\nwavelength = {0.5, 0.6,\n 0.7, 0.8, 0.9}\n"
    )
    data, wavelengths = hsi_io.read_envi(tmp_path / "c.hdr")
    np.testing.assert_array_equal(data, cube)
    np.testing.assert_allclose(wavelengths, [500, 600, 700, 800, 900])


def test_envi_errors_name_the_file(tmp_path: Path, cube: np.ndarray) -> None:
    hdr = tmp_path / "img.hdr"
    write_envi(hdr, cube)
    raw = tmp_path / "img.raw"
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(InputError, match="truncated") as err:
        hsi_io.read_image(hdr)
    assert err.value.path == str(raw)
    raw.unlink()
    with pytest.raises(InputError, match="data file not found"):
        hsi_io.read_image(hdr)
    bad = tmp_path / "bad.hdr"
    bad.write_text("samples = 3\n")
    with pytest.raises(InputError, match="not an ENVI header"):
        hsi_io.read_image(bad)


def test_mat_v5_cube_and_ground_truth(tmp_path: Path, cube: np.ndarray) -> None:
    gt = np.arange(42, dtype=np.uint8).reshape(6, 7) % 4
    scipy.io.savemat(tmp_path / "c.mat", {"thumb": cube[:2, :2, :2], "img": cube})
    scipy.io.savemat(tmp_path / "g.mat", {"gt": gt})
    np.testing.assert_array_equal(hsi_io.read_image(tmp_path / "c.mat").data, cube)
    np.testing.assert_array_equal(hsi_io.read_ground_truth(tmp_path / "g.mat"), gt)


def test_mat_v73_transposed_layout(tmp_path: Path, cube: np.ndarray) -> None:
    # MATLAB -v7.3 writes HDF5 in column-major order (h5py sees the axes reversed) after a 512-byte user block.
    gt = (np.arange(42).reshape(6, 7) % 3).astype(np.uint8)
    with h5py.File(tmp_path / "c.mat", "w", userblock_size=512) as h5:
        h5["cube"] = cube.T
        h5.create_group("#refs#")
    with h5py.File(tmp_path / "g.mat", "w", userblock_size=512) as h5:
        h5["gt"] = gt.T
    np.testing.assert_array_equal(hsi_io.read_image(tmp_path / "c.mat").data, cube)
    np.testing.assert_array_equal(hsi_io.read_ground_truth(tmp_path / "g.mat"), gt)


def test_npy_and_tiff_mosaics(tmp_path: Path) -> None:
    mosaic = np.random.default_rng(1).integers(0, 1023, (10, 15)).astype(np.uint16)
    np.save(tmp_path / "m.npy", mosaic)
    tifffile.imwrite(tmp_path / "m.tif", mosaic)
    for name in ("m.npy", "m.tif"):
        image = hsi_io.read_image(tmp_path / name)
        assert image.kind == "mosaic"
        np.testing.assert_array_equal(image.data, mosaic)
    np.save(tmp_path / "c.npy", np.zeros((3, 4, 5), np.float32))
    assert hsi_io.read_image(tmp_path / "c.npy").kind == "cube"


@pytest.mark.parametrize("content", [b"", b"not an array at all", b"\x93NUMPY garbage"])
def test_unreadable_files(tmp_path: Path, content: bytes) -> None:
    for name in ("x.npy", "x.tif", "x.mat"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError) as err:
            hsi_io.read_image(tmp_path / name)
        assert err.value.path == str(tmp_path / name)


def test_nan_and_inf_are_refused(tmp_path: Path) -> None:
    data = np.ones((5, 5), np.float32)
    data[2, 3] = np.nan
    data[1, 1] = np.inf
    np.save(tmp_path / "m.npy", data)
    with pytest.raises(InputError, match="2 NaN/inf"):
        hsi_io.read_image(tmp_path / "m.npy")
    np.save(tmp_path / "w.npy", data)
    with pytest.raises(InputError, match="NaN/inf"):
        hsi_io.read_reference(tmp_path / "w.npy", (5, 5))


def test_ground_truth_formats(tmp_path: Path) -> None:
    gt = (np.arange(30).reshape(5, 6) % 6).astype(np.uint8)
    Image.fromarray(gt).save(tmp_path / "g.png")
    tifffile.imwrite(tmp_path / "g.tif", gt)
    np.save(tmp_path / "g.npy", gt.astype(np.float64))
    for name in ("g.png", "g.tif", "g.npy"):
        out = hsi_io.read_ground_truth(tmp_path / name)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, gt)
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="single-channel"):
        hsi_io.read_ground_truth(tmp_path / "rgb.png")
    np.save(tmp_path / "frac.npy", gt + 0.5)
    with pytest.raises(InputError, match="non-integer"):
        hsi_io.read_ground_truth(tmp_path / "frac.npy")


def test_correction_matrix_formats(tmp_path: Path) -> None:
    m = np.arange(9, dtype=np.float64).reshape(3, 3) / 7
    np.save(tmp_path / "m.npy", m)
    np.savetxt(tmp_path / "m.csv", m, delimiter=",")
    np.savetxt(tmp_path / "w.csv", m)  # whitespace-separated also accepted
    for name in ("m.npy", "m.csv", "w.csv"):
        out = hsi_io.read_matrix(tmp_path / name)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, m, rtol=1e-6)
    np.save(tmp_path / "v.npy", np.ones(3))
    with pytest.raises(InputError, match="2-D"):
        hsi_io.read_matrix(tmp_path / "v.npy")
    (tmp_path / "t.csv").write_text("1,2\nx,y\n")
    with pytest.raises(InputError, match="CSV"):
        hsi_io.read_matrix(tmp_path / "t.csv")


def test_reference_frames(tmp_path: Path) -> None:
    frames = np.stack([np.full((4, 5), v, np.uint16) for v in (10, 20, 30)])
    np.save(tmp_path / "stack.npy", frames)
    np.testing.assert_array_equal(hsi_io.read_reference(tmp_path / "stack.npy", (4, 5)), np.full((4, 5), 20.0))
    with pytest.raises(InputError, match="differs from the mosaic"):
        hsi_io.read_reference(tmp_path / "stack.npy", (5, 5))
    with pytest.raises(InputError, match="file not found"):
        hsi_io.read_reference(tmp_path / "missing.npy", (4, 5))

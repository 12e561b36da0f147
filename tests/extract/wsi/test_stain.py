"""Stain normalisation maths (medflow.extract.wsi.colour, .stain): hand-checkable cases on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from medflow.core.errors import InputError
from medflow.extract.wsi import colour, stain

# Macenko's reference H&E optical-density directions (his code's HERef, torchstain's default).
H_VEC = np.array([0.5626, 0.7201, 0.4062]) / np.linalg.norm([0.5626, 0.7201, 0.4062])
E_VEC = np.array([0.2159, 0.8012, 0.5581]) / np.linalg.norm([0.2159, 0.8012, 0.5581])


def _planar(img: np.ndarray) -> np.ndarray:
    return np.moveaxis(img, -1, 0)


def _lab_stats(batch: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    lab = colour.rgb_to_lab(_planar(batch)).reshape(3, -1).astype(np.float64)
    if keep is not None:
        lab = lab[:, keep.reshape(-1)]
    return lab.mean(axis=1), lab.std(axis=1)


# ---- colour spaces ----------------------------------------------------------------------------------
def test_lab_of_reference_colours() -> None:
    rgb = np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255], [128, 128, 128]], np.uint8)
    lab = colour.rgb_to_lab(rgb.T).T
    expected = [  # CIE L*a*b* (D65) of these sRGB colours, as published (e.g. brucelindbloom.com)
        [100.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [53.2408, 80.0925, 67.2032],
        [32.2970, 79.1875, -107.8602],
        [53.5850, 0.0, 0.0],
    ]
    np.testing.assert_allclose(lab, expected, atol=0.02)


def test_lab_round_trip_returns_every_grey_and_random_colours_exactly() -> None:
    rng = np.random.default_rng(0)
    grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    rgb = np.concatenate([grey, rng.integers(0, 256, (100_000, 3), dtype=np.uint8)]).T
    back = colour.to_uint8(colour.lab_to_rgb(colour.rgb_to_lab(rgb)))
    np.testing.assert_array_equal(back, rgb)


def test_optical_density_round_trip_and_values() -> None:
    levels = np.arange(256, dtype=np.uint8)
    od = colour.optical_density(levels, 240)
    np.testing.assert_allclose(od, -np.log((levels + 1.0) / 240), rtol=1e-6)
    assert od[239] == 0 and od[255] < 0  # the background level has zero density
    np.testing.assert_array_equal(colour.od_to_rgb(od, 240), levels)


def test_hed_round_trip_without_jitter_is_the_identity() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (3, 50_000), dtype=np.uint8)
    back = colour.to_uint8(colour.hed_to_rgb(colour.rgb_to_hed(rgb)))
    np.testing.assert_array_equal(back, rgb)


# ---- percentiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 1000, 20_000, 150_000])
@pytest.mark.parametrize("kind", ["random", "ties", "sorted", "reversed", "one_value"])
def test_tail_percentiles_equal_numpys(n: int, kind: str) -> None:
    a = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    a = {
        "random": a,
        "ties": np.round(a * 3),
        "sorted": np.sort(a),
        "reversed": np.sort(a)[::-1].copy(),
        "one_value": np.full(n, 0.25, np.float32),
    }[kind]
    for qs in ([1, 99], [99], [0, 100], [50], [0.5, 99.5, 2]):
        np.testing.assert_allclose(stain.percentiles(a, qs), np.percentile(a, qs), rtol=0, atol=1e-6)


# ---- Macenko ----------------------------------------------------------------------------------------
def _two_stain_image(rng: np.random.Generator, n: int = 40_000) -> np.ndarray:
    """Pixels of known stain vectors: pure H, pure E and mixtures, as intensities of Io = 240
    (concentrations high enough that every pixel has OD ≥ beta = 0.15 in every channel)."""
    c = rng.uniform(0.8, 2.0, (n, 2))
    c[: n // 4, 1] = 0  # pure haematoxylin
    c[n // 4 : n // 2, 0] = 0  # pure eosin
    od = c @ np.stack([H_VEC, E_VEC])
    return np.clip(np.rint(240 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def _angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(abs(u @ v) / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))))


def test_macenko_recovers_the_stain_vectors_of_a_two_stain_image() -> None:
    pixels = _two_stain_image(np.random.default_rng(2))
    target = stain.fit("macenko", {}, pixels)
    found = np.asarray(target["stain_matrix"])
    assert _angle_deg(found[:, 0], H_VEC) < 0.5  # haematoxylin first (measured 0.20°: uint8 rounding)
    assert _angle_deg(found[:, 1], E_VEC) < 0.5
    np.testing.assert_allclose(np.linalg.norm(found, axis=0), 1.0, atol=1e-9)


def test_macenko_maps_an_image_onto_the_targets_stains() -> None:
    rng = np.random.default_rng(3)
    source = _two_stain_image(rng).reshape(1, 200, 200, 3)
    target = {"stain_matrix": np.stack([H_VEC, E_VEC], axis=1).tolist(), "max_concentrations": [1.2, 0.8]}
    out = stain.make("macenko", {}, target).apply(source)
    refit = stain.fit("macenko", {}, out.reshape(-1, 3))
    found = np.asarray(refit["stain_matrix"])
    assert _angle_deg(found[:, 0], H_VEC) < 0.5 and _angle_deg(found[:, 1], E_VEC) < 0.5
    np.testing.assert_allclose(refit["max_concentrations"], [1.2, 0.8], rtol=0.02)
    # Normalising an image to its own fit changes it by at most the float rounding: one level.
    own = stain.make("macenko", {}, stain.fit("macenko", {}, source.reshape(-1, 3))).apply(source)
    assert np.abs(own.astype(int) - source).max() <= 1


# ---- Reinhard ---------------------------------------------------------------------------------------
def _stained_patches(rng: np.random.Generator, n: int, size: int = 64) -> np.ndarray:
    """H&E-like colours, smooth enough that Reinhard's output is not clipped."""
    base = np.array([175, 110, 165], np.float64)
    noise = rng.normal(0, 14, (n, size, size, 3)) + rng.normal(0, 6, (n, 1, 1, 3))
    return np.clip(np.rint(base + noise), 0, 255).astype(np.uint8)


def test_reinhard_output_has_the_target_statistics() -> None:
    batch = _stained_patches(np.random.default_rng(4), 3)
    target = {"mean": [55.0, 22.0, -9.0], "std": [9.0, 6.0, 5.0]}
    out = stain.make("reinhard", {"background": 255}, target).apply(batch)
    for patch in out:
        mean, std = _lab_stats(patch[None])
        np.testing.assert_allclose(mean, target["mean"], atol=0.1)  # uint8 rounding of the result
        np.testing.assert_allclose(std, target["std"], rtol=0.015)


def test_reinhard_leaves_background_alone_and_ignores_it_in_the_statistics() -> None:
    rng = np.random.default_rng(5)
    patch = _stained_patches(rng, 1)
    patch[0, :, :24] = 243  # a background band: luma 243 > 215
    target = {"mean": [55.0, 22.0, -9.0], "std": [9.0, 6.0, 5.0]}
    out = stain.make("reinhard", {"background": 215}, target).apply(patch)
    np.testing.assert_array_equal(out[0, :, :24], patch[0, :, :24])
    tissue = np.zeros(patch.shape[1:3], bool)
    tissue[:, 24:] = True
    mean, std = _lab_stats(out, tissue)
    np.testing.assert_allclose(mean, target["mean"], atol=0.1)
    np.testing.assert_allclose(std, target["std"], rtol=0.015)
    # The same tissue without the background band is normalised identically.
    alone = stain.make("reinhard", {"background": 215}, target).apply(np.ascontiguousarray(patch[:, :, 24:]))
    np.testing.assert_array_equal(alone[0], out[0, :, 24:])


def test_reinhard_fit_equals_the_statistics_of_the_reference() -> None:
    ref = _stained_patches(np.random.default_rng(6), 1)
    target = stain.fit("reinhard", {"background": 255}, ref.reshape(-1, 3))
    mean, std = _lab_stats(ref)
    np.testing.assert_allclose(target["mean"], mean, atol=1e-4)
    np.testing.assert_allclose(target["std"], std, rtol=1e-5)


# ---- both ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", stain.METHODS)
def test_a_batch_is_normalised_as_its_patches_are_one_by_one_or_in_threads(method: str) -> None:
    rng = np.random.default_rng(7)
    batch = np.concatenate([_stained_patches(rng, 20, 32), _two_stain_image(rng, 32 * 32).reshape(1, 32, 32, 3)])
    norm = stain.make(method, {}, stain.fit(method, {}, batch[:4].reshape(-1, 3)))
    whole = norm.apply(batch)
    single = np.concatenate([norm.apply(p[None]) for p in batch])
    np.testing.assert_array_equal(whole, single)
    out = np.empty_like(batch)
    assert norm.apply(batch, out=out) is out and np.array_equal(out, whole)
    np.testing.assert_array_equal(norm.apply(batch, threads=3), whole)  # chunks normalised in parallel


@pytest.mark.parametrize("method", stain.METHODS)
def test_blank_patches_pass_through_unchanged_and_are_counted(method: str) -> None:
    rng = np.random.default_rng(8)
    batch = np.concatenate([np.full((2, 32, 32, 3), 245, np.uint8), _stained_patches(rng, 1, 32)])
    norm = stain.make(method, {}, stain.fit(method, {}, _stained_patches(rng, 2, 64).reshape(-1, 3)))
    out = norm.apply(batch)
    np.testing.assert_array_equal(out[:2], batch[:2])
    assert norm.passed_through == 2 and not np.array_equal(out[2], batch[2])


@pytest.mark.parametrize(
    "method, pixels, problem",
    [
        ("reinhard", np.full((5000, 3), 250, np.uint8), "pixels are tissue"),
        ("reinhard", np.full((5000, 3), 120, np.uint8), "flat colour"),
        ("macenko", np.full((5000, 3), 250, np.uint8), "pixels are stained"),
        ("macenko", np.full((5000, 3), 60, np.uint8), "single stain direction"),
    ],
)
def test_degenerate_references_are_refused(method: str, pixels: np.ndarray, problem: str) -> None:
    with pytest.raises(stain.DegenerateReference, match=problem):
        stain.fit(method, {}, pixels)


def test_median_target_over_slides() -> None:
    targets = [{"mean": [50, 10, -5], "std": [10, 5, 4]}, {"mean": [60, 20, -9], "std": [12, 7, 5]}]
    targets.append({"mean": [52, 30, -6], "std": [30, 6, 1]})
    assert stain.median_target("reinhard", targets) == {"mean": [52, 20, -6], "std": [12, 6, 4]}
    h2 = H_VEC + [0.02, -0.02, 0.0]
    mac = [
        {"stain_matrix": np.stack([H_VEC, E_VEC], 1).tolist(), "max_concentrations": [1.0, 0.5]},
        {"stain_matrix": np.stack([h2, E_VEC], 1).tolist(), "max_concentrations": [2.0, 0.7]},
    ]
    med = stain.median_target("macenko", mac)
    np.testing.assert_allclose(np.linalg.norm(med["stain_matrix"], axis=0), 1.0)
    np.testing.assert_allclose(med["max_concentrations"], [1.5, 0.6])


def test_record_round_trip_and_tampering() -> None:
    norm = stain.make("reinhard", {"background": 200}, {"mean": [55, 22, -9], "std": [9, 6, 5]})
    rec = norm.record(applied="load", reference="x.json")
    again = stain.from_record(rec, "model.pt")
    assert again.digest == norm.digest and again.params == {"background": 200.0}
    batch = _stained_patches(np.random.default_rng(9), 2, 16)
    np.testing.assert_array_equal(again.apply(batch), norm.apply(batch))
    other = stain.make("reinhard", {"background": 201}, {"mean": [55, 22, -9], "std": [9, 6, 5]})
    assert other.digest != norm.digest
    tampered = {**rec, "target": {"mean": [56, 22, -9], "std": [9, 6, 5]}}
    with pytest.raises(InputError, match="model.pt: stain normaliser digest"):
        stain.from_record(tampered, "model.pt")
    with pytest.raises(InputError, match="not a valid stain normaliser record"):
        stain.from_record({**rec, "target": {"mean": [1, 2], "std": [1, 1, 1]}}, "model.pt")
    with pytest.raises(InputError, match="unknown method"):
        stain.from_record({**rec, "method": "vahadane"}, "model.pt")

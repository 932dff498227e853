"""The NTIRE 2022 camera and the four documented RGB-simulation steps."""

from __future__ import annotations

import numpy as np
import pytest

from drcr_model.camera import (
    ANALOG_GAIN,
    DEFAULT_BANDS,
    decode_image,
    encode_jpeg,
    ntire2022_camera_response,
    simulate_rgb,
)


def _csv_row(nm: int) -> np.ndarray:
    from importlib import resources

    lines = resources.files("drcr_model").joinpath("data", "ntire2022_rgb_camera_qe.csv").read_text().splitlines()
    for line in lines[1:]:
        v = [float(x) for x in line.split(",")]
        if v[0] == nm:
            return np.array([v[1], v[2], v[4]])  # R, G1, B (G2 is column 3)
    raise AssertionError(nm)


def test_response_is_qe_times_gain_at_the_bands() -> None:
    r = ntire2022_camera_response(DEFAULT_BANDS)
    assert r.shape == (31, 3)
    np.testing.assert_allclose(r[15], _csv_row(550) * ANALOG_GAIN)
    np.testing.assert_allclose(r[0], _csv_row(400) * [2.2933984, 1, 1.62308182])


def test_response_interpolates_linearly() -> None:
    r = ntire2022_camera_response([550.5])
    np.testing.assert_allclose(r[0], 0.5 * (_csv_row(550) + _csv_row(551)) * ANALOG_GAIN)


def test_response_refuses_extrapolation() -> None:
    with pytest.raises(ValueError, match="within"):
        ntire2022_camera_response([350, 400])


def test_simulation_without_noise_or_jpeg_is_projection_and_scaling() -> None:
    rng = np.random.default_rng(0)
    cube = rng.uniform(0.01, 1.0, (8, 12, 31))
    cube[0, 0] = -1.0  # projects negative → clipped to 0
    rgb = simulate_rgb(cube)
    proj = np.clip(cube @ ntire2022_camera_response(DEFAULT_BANDS), 0, None)
    assert proj[0, 0].max() == 0.0
    expected = np.clip(proj * (0.18 / proj.mean()) * 255, 0, 255).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 12, 3)
    np.testing.assert_array_equal(rgb, expected)


def test_noise_is_poisson_and_seeded() -> None:
    cube = np.full((16, 16, 31), 0.3)
    a = simulate_rgb(cube, npe=750, seed=1)
    b = simulate_rgb(cube, npe=750, seed=1)
    c = simulate_rgb(cube, npe=750, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    proj = cube @ ntire2022_camera_response(DEFAULT_BANDS)
    noisy = np.random.default_rng(1).poisson(proj * 750) / 750
    expected = np.clip(noisy * (0.18 / noisy.mean()) * 255, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(a, expected)


def test_jpeg_step_is_a_pillow_roundtrip() -> None:
    cube = np.random.default_rng(0).uniform(0.05, 0.9, (16, 16, 31))
    clean = simulate_rgb(cube)
    jpg = simulate_rgb(cube, jpeg_quality=65)
    np.testing.assert_array_equal(jpg, decode_image(encode_jpeg(clean, 65)))
    assert jpg.dtype == np.uint8
    with pytest.raises(ValueError, match="jpeg_quality"):
        encode_jpeg(clean, 0)


def test_all_zero_cube_is_rejected() -> None:
    with pytest.raises(ValueError, match="all zero"):
        simulate_rgb(np.zeros((4, 4, 31)))

"""Synthetic scenes: seeded, deterministic, realistic range, written in the ARAD_1K layout."""

from __future__ import annotations

import numpy as np
import pytest

from drcr_model.scenes import SceneConfig, load_spectral_library, make_scene, scene_seed, write_paired_dataset

SMALL = SceneConfig(height=32, width=48)


def test_library_has_measured_spectra() -> None:
    lib = load_spectral_library()
    assert lib.reflectances.shape == (7261 + 24, 31)  # earthlib + ColorChecker
    assert lib.illuminants.shape == (14, 31)
    assert "vegetation" in lib.group_names and "colorchecker" in lib.group_names
    assert lib.reflectances.min() >= 0.0 and lib.reflectances.max() <= 1.0
    np.testing.assert_allclose(lib.illuminants.max(axis=1), 1.0)


def test_same_seed_same_scene_and_different_seed_differs() -> None:
    a = make_scene(7, SMALL)
    np.testing.assert_array_equal(a, make_scene(7, SMALL))
    assert not np.array_equal(a, make_scene(8, SMALL))
    assert a.shape == (32, 48, 31) and a.dtype == np.float32


def test_values_stay_in_a_realistic_range() -> None:
    cubes = np.stack([make_scene(scene_seed(0, i), SMALL) for i in range(6)])
    assert cubes.min() >= SMALL.floor - 1e-7
    assert cubes.max() <= 1.0
    assert np.percentile(cubes, 99.5) == pytest.approx(SMALL.peak, abs=0.1)
    assert (cubes < 0.01).mean() == 0.0


def test_scene_config_validates() -> None:
    with pytest.raises(ValueError, match="floor"):
        SceneConfig(floor=0.5, peak=0.4)
    with pytest.raises(ValueError, match="regions"):
        SceneConfig(regions=(5, 2))


def test_write_paired_dataset_roundtrips_through_the_arad_reader(tmp_path) -> None:
    from drcr_model.datasets import read_arad

    names = write_paired_dataset(tmp_path, 2, seed=3, config=SceneConfig(height=16, width=20), jpeg_quality=90)
    assert (tmp_path / "Train_RGB" / f"{names[0]}.jpg").exists()
    pairs = read_arad(str(tmp_path))
    assert [p.name for p in pairs] == names
    np.testing.assert_array_equal(pairs[0].cube, make_scene(scene_seed(3, 0), SceneConfig(height=16, width=20)))
    assert pairs[0].rgb.shape == (16, 20, 3)

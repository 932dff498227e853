"""Root-polynomial baseline: exact recovery of a root-polynomial mapping, both weightings."""

from __future__ import annotations

import numpy as np
import pytest

from drcr_model.baseline import fit_root_polynomial, root_polynomial_features


def test_features_scale_linearly_with_exposure() -> None:
    rgb = np.array([[0.2, 0.5, 0.8]])
    f = root_polynomial_features(rgb)
    np.testing.assert_allclose(f[0], [0.2, 0.5, 0.8, np.sqrt(0.1), np.sqrt(0.4), np.sqrt(0.16)])
    np.testing.assert_allclose(root_polynomial_features(3 * rgb), 3 * f)


@pytest.mark.parametrize("weighting", ["none", "relative"])
def test_fit_recovers_an_exact_mapping(weighting: str) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(20, 256, (12, 10, 3)).astype(np.uint8)
    rgb[0, 0] = 255  # image max 255 for every image
    x = rgb / 255.0
    true = rng.uniform(0.05, 0.3, (6, 31))
    cube = (root_polynomial_features(x) @ true).astype(np.float32)
    model = fit_root_polynomial([rgb], [cube], weighting=weighting)
    np.testing.assert_allclose(model.matrix, true, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(model.predict(rgb), cube, rtol=1e-3, atol=1e-4)


def test_weightings_differ_on_noisy_data_and_bad_input_is_refused() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(1, 256, (16, 16, 3)).astype(np.uint8)
    cube = rng.uniform(0.01, 1.0, (16, 16, 31)).astype(np.float32)
    ls = fit_root_polynomial([rgb], [cube])
    rel = fit_root_polynomial([rgb], [cube], weighting="relative")
    assert not np.allclose(ls.matrix, rel.matrix)
    with pytest.raises(ValueError, match="weighting"):
        fit_root_polynomial([rgb], [cube], weighting="huber")
    with pytest.raises(ValueError, match="equally many"):
        fit_root_polynomial([rgb], [])

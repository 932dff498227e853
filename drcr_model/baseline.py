"""Root-polynomial regression from RGB to spectra: the classical baseline for spectral reconstruction.

Degree-2 root-polynomial features (Finlayson, Mackiewicz & Hurlbert, "Color correction using
root-polynomial regression", IEEE TIP 2015) of an RGB pixel are ``r, g, b, √(rg), √(gb), √(rb)``; every
term scales linearly with exposure. A 6×bands matrix maps them to a spectrum, fitted in closed form:

- ``weighting="none"``: ordinary least squares, ``min Σ (f·m − s)²``;
- ``weighting="relative"``: each residual divided by the ground truth, ``min Σ ((f·m − s)/s)²``, which
  targets MRAE. calibration.md found the two differ by about 3× in MRAE (and the other way round in
  RMSE), so always say which one a comparison used.

Inputs are the same as DRCR Net's: the RGB image divided by its own maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from drcr_model.inference import preprocess

__all__ = ["root_polynomial_features", "RootPolynomial", "fit_root_polynomial", "WEIGHTINGS"]

WEIGHTINGS = ("none", "relative")


def root_polynomial_features(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) non-negative RGB → (..., 6) degree-2 root-polynomial terms, float64."""
    x = np.clip(np.asarray(rgb, dtype=np.float64), 0.0, None)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return np.stack([r, g, b, np.sqrt(r * g), np.sqrt(g * b), np.sqrt(r * b)], axis=-1)


@dataclass(frozen=True)
class RootPolynomial:
    """A fitted mapping: ``matrix`` is 6×bands; ``weighting`` records how it was fitted."""

    matrix: np.ndarray
    weighting: str = "none"

    def predict(self, rgb: np.ndarray, *, preprocessed: bool = False) -> np.ndarray:
        """H×W×3 RGB (uint8, or float already divided by its max) → H×W×bands float32 (unclipped)."""
        x = np.asarray(rgb, dtype=np.float32) if preprocessed else preprocess(rgb)
        return (root_polynomial_features(x) @ self.matrix).astype(np.float32)


def fit_root_polynomial(
    rgbs: Sequence[np.ndarray],
    cubes: Sequence[np.ndarray],
    *,
    weighting: str = "none",
    max_pixels: int = 400_000,
    seed: int = 0,
) -> RootPolynomial:
    """Fit on paired images: ``rgbs`` H×W×3 as stored (uint8; divided by their max here), ``cubes`` H×W×bands.

    At most ``max_pixels`` pixels, drawn uniformly (seeded) over all images, enter the fit.

    Raises:
        ValueError: for an unknown ``weighting`` or mismatched inputs.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if len(rgbs) != len(cubes) or not rgbs:
        raise ValueError(f"need equally many RGB images and cubes (got {len(rgbs)} and {len(cubes)})")
    feats = np.concatenate([root_polynomial_features(preprocess(np.asarray(x))).reshape(-1, 6) for x in rgbs])
    spectra = np.concatenate([np.asarray(c, dtype=np.float64).reshape(-1, c.shape[-1]) for c in cubes])
    if feats.shape[0] != spectra.shape[0]:
        raise ValueError("RGB images and cubes differ in pixel count")
    if feats.shape[0] > max_pixels:
        keep = np.random.default_rng(seed).choice(feats.shape[0], max_pixels, replace=False)
        feats, spectra = feats[keep], spectra[keep]
    if weighting == "none":
        matrix = np.linalg.lstsq(feats, spectra, rcond=None)[0]
    else:
        if spectra.min() <= 0:
            raise ValueError("weighting='relative' needs ground truth > 0 everywhere")
        # Per band: divide each row by the target, so the residual is the relative error.
        matrix = np.stack(
            [
                np.linalg.lstsq(feats / spectra[:, j : j + 1], np.ones(len(feats)), rcond=None)[0]
                for j in range(spectra.shape[1])
            ],
            axis=1,
        )
    return RootPolynomial(matrix=matrix, weighting=weighting)

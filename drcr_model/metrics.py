"""Spectral-reconstruction metrics with the NTIRE 2022 challenge definitions.

Every function takes ``gt`` and ``rec`` as H×W×bands arrays (band axis last, any float dtype, nominally
in [0, 1]) and returns a Python float. The definitions follow the organisers' ``NTIRE2022Util.py``
(github.com/boazarad/NTIRE2022_spectral) and the authors' ``test/compute_mrae.py`` (spec §8):

- MRAE = mean(|rec − gt| / gt) over all elements, **no epsilon**. Ground truth with values ≤ 0 gives
  ``inf``/``nan``; the challenge skipped such scenes. ``min_gt`` restricts the mean to elements with
  ``gt >= min_gt`` (calibration.md: on dark synthetic scenes MRAE otherwise measures the floor).
- RMSE = sqrt(mean((rec − gt)²)).
- PSNR = 10·log10(peak² / MSE). The organisers' code writes ``peak ^ 2`` (a bitwise XOR in Python);
  we use the intended square. The authors' repository has no PSNR (spec §8).
- SAM = mean over pixels of the angle (radians) between the gt and rec spectra. As the organisers do,
  an all-zero spectrum keeps norm 1 (so its angle to anything is π/2); the cosine is clipped to [−1, 1]
  to keep round-off from producing ``nan``.
- Back-projection MRAE = MRAE between ``gt @ camera_response`` and ``rec @ camera_response``.

Options shared by all functions:

- ``clip`` (default ``True``): clip ``rec`` to [0, 1] before scoring, as the authors' evaluation did
  (spec §8); pass ``False`` to score the raw output.
- ``crop`` (default ``False``): score only the central region ``[128:-128, 128:-128]`` as the
  challenge's own scoring did (data README); the authors' script scores the whole image.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CROP_BORDER",
    "central_crop",
    "mrae",
    "rmse",
    "psnr",
    "sam",
    "backprojection_mrae",
    "all_metrics",
]

CROP_BORDER = 128
"""Border, in pixels, removed on every side by :func:`central_crop` (the challenge's ``CROP``)."""


def central_crop(a: np.ndarray, border: int = CROP_BORDER) -> np.ndarray:
    """Return ``a[border:-border, border:-border]`` (H and W are the first two axes).

    Raises:
        ValueError: if the image is not larger than ``2 * border`` in both H and W.
    """
    h, w = a.shape[:2]
    if h <= 2 * border or w <= 2 * border:
        raise ValueError(f"central_crop: image of {h}×{w} is too small for a border of {border}; pass crop=False")
    return a[border:-border, border:-border]


def _prepare(gt: np.ndarray, rec: np.ndarray, clip: bool, crop: bool) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt, dtype=np.float64)
    rec = np.asarray(rec, dtype=np.float64)
    if gt.shape != rec.shape:
        raise ValueError(f"gt and rec must have the same shape, got {gt.shape} and {rec.shape}")
    if gt.ndim != 3:
        raise ValueError(f"expected H×W×bands arrays, got shape {gt.shape}")
    if clip:
        rec = np.clip(rec, 0.0, 1.0)
    if crop:
        gt, rec = central_crop(gt), central_crop(rec)
    return gt, rec


def _relative_error(gt: np.ndarray, rec: np.ndarray, min_gt: float | None) -> float:
    if min_gt is not None:
        keep = gt >= min_gt
        if not keep.any():
            return float("nan")
        gt, rec = gt[keep], rec[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean(np.abs(rec - gt) / gt))


def mrae(
    gt: np.ndarray, rec: np.ndarray, *, clip: bool = True, crop: bool = False, min_gt: float | None = None
) -> float:
    """Mean relative absolute error (no epsilon). ``min_gt``: only elements with ``gt >= min_gt``."""
    gt, rec = _prepare(gt, rec, clip, crop)
    return _relative_error(gt, rec, min_gt)


def rmse(gt: np.ndarray, rec: np.ndarray, *, clip: bool = True, crop: bool = False) -> float:
    """Root mean squared error over all elements."""
    gt, rec = _prepare(gt, rec, clip, crop)
    return float(np.sqrt(np.mean((rec - gt) ** 2)))


def psnr(gt: np.ndarray, rec: np.ndarray, peak: float = 1.0, *, clip: bool = True, crop: bool = False) -> float:
    """Peak signal-to-noise ratio in dB, ``10·log10(peak² / MSE)``; ``inf`` for identical arrays."""
    gt, rec = _prepare(gt, rec, clip, crop)
    mse = float(np.mean((rec - gt) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(peak**2 / mse))


def sam(gt: np.ndarray, rec: np.ndarray, *, clip: bool = True, crop: bool = False) -> float:
    """Mean per-pixel spectral angle in radians."""
    gt, rec = _prepare(gt, rec, clip, crop)

    def unit(a: np.ndarray) -> np.ndarray:
        flat = a.reshape(-1, a.shape[-1])
        norms = np.linalg.norm(flat, axis=-1)
        norms[norms == 0] = 1.0
        return flat / norms[:, None]

    cos = np.clip(np.sum(unit(gt) * unit(rec), axis=1), -1.0, 1.0)
    return float(np.mean(np.arccos(cos)))


def backprojection_mrae(
    gt: np.ndarray, rec: np.ndarray, camera_response: np.ndarray, *, clip: bool = True, crop: bool = False
) -> float:
    """MRAE between the RGB projections of gt and rec; ``camera_response`` is bands×3."""
    gt, rec = _prepare(gt, rec, clip, crop)
    response = np.asarray(camera_response, dtype=np.float64)
    if response.ndim != 2 or response.shape[0] != gt.shape[-1]:
        raise ValueError(f"camera_response must be ({gt.shape[-1]}, channels), got {response.shape}")
    return _relative_error(gt @ response, rec @ response, None)


def all_metrics(
    gt: np.ndarray,
    rec: np.ndarray,
    camera_response: np.ndarray | None = None,
    *,
    clip: bool = True,
    crop: bool = False,
    min_gt: float = 0.01,
) -> dict[str, float]:
    """All metrics for one image as a flat dict (SAM also in degrees; MRAE also restricted to gt ≥ min_gt)."""
    out = {
        "mrae": mrae(gt, rec, clip=clip, crop=crop),
        f"mrae_gt_ge_{min_gt:g}": mrae(gt, rec, clip=clip, crop=crop, min_gt=min_gt),
        "rmse": rmse(gt, rec, clip=clip, crop=crop),
        "psnr": psnr(gt, rec, clip=clip, crop=crop),
        "sam_rad": sam(gt, rec, clip=clip, crop=crop),
    }
    out["sam_deg"] = float(np.degrees(out["sam_rad"]))
    if camera_response is not None:
        out["backprojection_mrae"] = backprojection_mrae(gt, rec, camera_response, clip=clip, crop=crop)
    return out

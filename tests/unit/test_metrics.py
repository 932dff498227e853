"""Metrics on hand-computed cases (NTIRE 2022 definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drcr_model.metrics import all_metrics, backprojection_mrae, central_crop, mrae, psnr, rmse, sam


def _pair() -> tuple[np.ndarray, np.ndarray]:
    gt = np.array([[[0.5, 0.25], [1.0, 0.2]]])  # 1×2×2
    rec = np.array([[[0.6, 0.2], [0.5, 0.3]]])
    return gt, rec


def test_mrae_by_hand() -> None:
    gt, rec = _pair()
    # |Δ|/gt = 0.2, 0.2, 0.5, 0.5 → mean 0.35
    assert mrae(gt, rec) == pytest.approx(0.35)


def test_mrae_has_no_epsilon() -> None:
    gt = np.array([[[0.0, 1.0]]])
    rec = np.array([[[0.1, 1.0]]])
    assert math.isinf(mrae(gt, rec))


def test_mrae_min_gt_restricts_elements() -> None:
    gt = np.array([[[0.005, 0.5]]])
    rec = np.array([[[0.010, 0.6]]])
    assert mrae(gt, rec) == pytest.approx((1.0 + 0.2) / 2)
    assert mrae(gt, rec, min_gt=0.01) == pytest.approx(0.2)


def test_rmse_and_psnr_by_hand() -> None:
    gt, rec = _pair()
    mse = (0.01 + 0.0025 + 0.25 + 0.01) / 4
    assert rmse(gt, rec) == pytest.approx(math.sqrt(mse))
    assert psnr(gt, rec) == pytest.approx(10 * math.log10(1 / mse))
    assert psnr(gt, rec, peak=2.0) == pytest.approx(10 * math.log10(4 / mse))
    assert psnr(gt, gt) == math.inf


def test_clip_is_applied_to_rec_only_and_optional() -> None:
    gt = np.array([[[0.5, 0.5]]])
    rec = np.array([[[1.5, -0.5]]])
    assert mrae(gt, rec) == pytest.approx(1.0)  # clipped to 1 and 0
    assert mrae(gt, rec, clip=False) == pytest.approx(2.0)


def test_sam_by_hand() -> None:
    gt = np.array([[[1.0, 0.0], [1.0, 1.0]]])
    rec = np.array([[[0.0, 1.0], [2.0, 2.0]]])  # 90° and 0° (scale-invariant)
    assert sam(gt, rec, clip=False) == pytest.approx(math.pi / 4)
    # An all-zero spectrum keeps norm 1 (organisers' convention): angle π/2 to anything non-zero.
    assert sam(np.array([[[0.0, 0.0]]]), np.array([[[1.0, 0.0]]])) == pytest.approx(math.pi / 2)


def test_backprojection_mrae_by_hand() -> None:
    gt = np.array([[[0.2, 0.4]]])
    rec = np.array([[[0.4, 0.4]]])
    response = np.array([[1.0, 0.0], [1.0, 1.0]])  # 2 bands → 2 channels
    # gt rgb = (0.6, 0.4), rec rgb = (0.8, 0.4) → (1/3 + 0)/2
    assert backprojection_mrae(gt, rec, response) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="camera_response"):
        backprojection_mrae(gt, rec, np.ones((3, 3)))


def test_central_crop() -> None:
    a = np.arange(260 * 300).reshape(260, 300, 1).astype(float)
    c = central_crop(a)
    assert c.shape == (4, 44, 1)
    assert c[0, 0, 0] == a[128, 128, 0]
    with pytest.raises(ValueError, match="too small"):
        central_crop(np.zeros((256, 300, 1)))
    gt = np.full((260, 260, 2), 0.5)
    rec = gt.copy()
    rec[0, 0] = 1.0  # outside the crop
    assert mrae(gt, rec, crop=True) == 0.0
    assert mrae(gt, rec) > 0.0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        mrae(np.ones((2, 2, 3)), np.ones((2, 2, 4)))


def test_all_metrics_keys() -> None:
    gt, rec = _pair()
    m = all_metrics(gt, rec, np.ones((2, 3)))
    assert set(m) == {"mrae", "mrae_gt_ge_0.01", "rmse", "psnr", "sam_rad", "sam_deg", "backprojection_mrae"}
    assert m["sam_deg"] == pytest.approx(math.degrees(m["sam_rad"]))

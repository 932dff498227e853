"""QA of every cube without ground truth: is the cube consistent with the photo it came from?

Two pure steps, so the work happens where the data is:

* :func:`tile_stats` runs in the predictor on each batch (the model's preprocessed input and its output
  cores) and returns small sufficient statistics (sums, counts and a ratio histogram, independent of the
  image size);
* :func:`reduce_stats` adds those of one image's batches and :func:`summarize` turns them into the
  image's QA record, checked against the job's thresholds (``[qa]``, :class:`pipeline.config.QASpec`).

Back-projection consistency: the cube ``c`` (bands × pixels) projected through the weights' camera response
``R`` (:func:`drcr_model.camera.camera_response`) gives ``p = Rᵀc``, which must reproduce the model's input
``x`` (the RGB after the weights' preprocessing) up to one exposure scale ``s`` per image (the camera's
exposure and the simulation's normalisation are unknown). ``s`` minimises the MRAE ``mean |s·p − x| / x``
over the values with ``x ≥ MIN_INPUT``; the MRAE and the RMSE ``sqrt(mean (s·p − x)²)`` (all finite
values) are reported at that scale. A ground-truth cube scored against its own noise-free RGB gives ≈ 0
(8-bit quantisation only); the shipped weights on real photos give 0.1–0.3.

The MRAE as a function of ``s`` needs the distribution of the ratios ``r = p / x``, not a few moments:
a histogram of ``log2 r`` with per-bin counts and sums of ``r`` makes it exact in every bin except the one
holding ``1/s``, whose values are taken at their mean (error < half a bin, ``2**(1/512) - 1`` ≈ 0.14 %,
on that bin's share only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MIN_INPUT",
    "QAError",
    "QAResult",
    "tile_stats",
    "reduce_stats",
    "summarize",
    "check",
    "MANIFEST_FIELDS",
    "manifest_columns",
]

MIN_INPUT = 0.02
"""Input values (fraction of the image's maximum) below which the MRAE ignores a value: 8-bit quantisation
alone is > 20 % relative error there (a value of 1/255 of a 255-peak image)."""

LOG2_RANGE = 24.0
BINS_PER_OCTAVE = 256
NBINS = int(2 * LOG2_RANGE * BINS_PER_OCTAVE)
"""Histogram of ``log2(p / x)`` over ±24 octaves in 1/256-octave bins (0.27 %); ratios outside go to the end bins."""

_SUMS = ("values", "nonfinite", "negative", "above_one", "pixels", "finite_pixels", "sxx", "spx", "spp", "mrae_n")


class QAError(ValueError):
    """A cube failed QA (non-finite values, or a threshold with ``on_exceed = "fail"``).

    ``qa`` holds the image's QA record, so the failure is recorded with its figures."""

    def __init__(self, message: str, qa: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.qa = dict(qa)


def tile_stats(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], response: np.ndarray) -> dict[str, Any]:
    """QA sufficient statistics of a batch of one image's tile cores.

    Args:
        inputs: per tile, the model's input over the core, 3 × h × w float32 (after preprocessing, [0, 1]).
        outputs: per tile, the cube core, bands × h × w float (model output, nominally [0, 1]).
        response: the camera response, bands × 3 (:func:`drcr_model.camera.camera_response`).

    Returns:
        a dict of counts and sums (see :data:`_SUMS`), the ratio histogram's non-empty bins (``hist_idx``,
        ``hist_n``, ``hist_r``: bin, count, sum of ratios; at most a few thousand for a real image) and
        ``band_sum`` (bands, float64: sum of each band over finite pixels); add batches with
        :func:`reduce_stats`.
    """
    bands = response.shape[0]
    acc = _empty(bands)
    rt = np.ascontiguousarray(response.T, dtype=np.float32)  # 3 × bands
    for x, c in zip(inputs, outputs):
        c = np.asarray(c, dtype=np.float32).reshape(bands, -1)
        x = np.asarray(x, dtype=np.float32).reshape(3, -1)
        finite = np.isfinite(c)
        ok = finite.all(axis=0)
        acc["values"] += c.size
        acc["nonfinite"] += int(c.size - np.count_nonzero(finite))
        acc["negative"] += int(np.count_nonzero(c < 0))
        acc["above_one"] += int(np.count_nonzero(c > 1))
        acc["pixels"] += c.shape[1]
        if not ok.all():
            c, x = c[:, ok], x[:, ok]
        acc["finite_pixels"] += c.shape[1]
        p = rt @ c  # 3 × n: what the camera would have seen
        # float64: the RMSE is a difference of these sums, which float32 would cancel away
        x64, p64 = x.ravel().astype(np.float64), p.ravel().astype(np.float64)
        acc["sxx"] += float(np.dot(x64, x64))
        acc["spx"] += float(np.dot(p64, x64))
        acc["spp"] += float(np.dot(p64, p64))
        acc["band_sum"] += c.sum(axis=1, dtype=np.float64)
        _add_ratios(acc, p.ravel(), x.ravel())
    used = np.flatnonzero(acc["hist_n"])
    acc["hist_idx"], acc["hist_n"], acc["hist_r"] = used, acc["hist_n"][used], acc["hist_r"][used]
    return acc


def _empty(bands: int) -> dict[str, Any]:
    acc: dict[str, Any] = dict.fromkeys(_SUMS, 0)
    for k in ("sxx", "spx", "spp"):
        acc[k] = 0.0
    acc["hist_n"] = np.zeros(NBINS, dtype=np.int64)
    acc["hist_r"] = np.zeros(NBINS, dtype=np.float64)
    acc["band_sum"] = np.zeros(bands, dtype=np.float64)
    return acc


def _add_ratios(acc: dict[str, Any], p: np.ndarray, x: np.ndarray) -> None:
    keep = x >= MIN_INPUT
    r = p[keep] / x[keep]
    acc["mrae_n"] += int(r.size)
    # r ≤ 0 (a black or negative projection) lands in the lowest bin, where s·r − 1 ≈ −1 as it should.
    lr = np.log2(np.maximum(r, 2.0**-LOG2_RANGE))
    idx = np.clip(((lr + LOG2_RANGE) * BINS_PER_OCTAVE).astype(np.int64), 0, NBINS - 1)
    acc["hist_n"] += np.bincount(idx, minlength=NBINS)
    acc["hist_r"] += np.bincount(idx, weights=r.astype(np.float64), minlength=NBINS)


def reduce_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of several :func:`tile_stats` results (the batches of one image)."""
    if not parts:
        raise ValueError("reduce_stats needs at least one batch's statistics")
    acc = _empty(len(parts[0]["band_sum"]))
    for part in parts:
        for k in _SUMS:
            acc[k] += part[k]
        acc["band_sum"] += np.asarray(part["band_sum"])
        np.add.at(acc["hist_n"], part["hist_idx"], part["hist_n"])
        np.add.at(acc["hist_r"], part["hist_idx"], part["hist_r"])
    return acc


@dataclasses.dataclass(frozen=True, kw_only=True)
class QAResult:
    """One cube's QA record (provenance ``qa``, manifest ``qa_*`` columns, STAC properties).

    Fractions are of all values (bands × pixels); ``backprojection_*`` are ``None`` when no pixel was finite.
    """

    backprojection_mrae: float | None
    backprojection_rmse: float | None
    exposure_scale: float | None
    nonfinite_fraction: float
    negative_fraction: float
    above_one_fraction: float
    mean_spectrum: list[float | None]
    flags: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fit_mrae(n: np.ndarray, r_sum: np.ndarray) -> tuple[float, float]:
    """The scale minimising ``Σ|s·r − 1|`` over the histogrammed ratios, and that sum's mean."""
    used = n > 0
    n, r_sum = n[used].astype(np.float64), r_sum[used]
    total = float(n.sum())
    r_mean = r_sum / n
    if float(r_sum.sum()) <= 0:  # every projection black: no scale explains the input
        return 0.0, 1.0
    # Σ r_i |s − 1/r_i| is minimised at the median of 1/r weighted by r: walk the bins from large r down.
    order = np.argsort(-r_mean)
    cum = np.cumsum(r_sum[order])
    k = int(np.searchsorted(cum, 0.5 * cum[-1]))
    s = 1.0 / float(r_mean[order][k])
    # Bins wholly above / below 1/s contribute exactly; only the bin holding 1/s is taken at its mean.
    err = np.abs(s * r_sum - n)
    return s, float(err.sum()) / total


def summarize(stats: Mapping[str, Any], thresholds: Mapping[str, float] | None = None) -> QAResult:
    """The image's QA record from its reduced statistics, flagged against ``thresholds``
    (:meth:`pipeline.config.QASpec.thresholds`: field name → maximum)."""
    values = max(int(stats["values"]), 1)
    mrae = rmse = scale = None
    if stats["mrae_n"] > 0:
        scale, mrae = _fit_mrae(np.asarray(stats["hist_n"]), np.asarray(stats["hist_r"]))
    if stats["finite_pixels"] > 0:
        if scale is None:  # no input bright enough for the MRAE: least-squares scale
            scale = stats["spx"] / stats["spp"] if stats["spp"] > 0 else 0.0
        sse = stats["sxx"] - 2 * scale * stats["spx"] + scale * scale * stats["spp"]
        rmse = math.sqrt(max(sse, 0.0) / (3 * stats["finite_pixels"]))
    n = stats["finite_pixels"]
    result = QAResult(
        backprojection_mrae=mrae,
        backprojection_rmse=rmse,
        exposure_scale=scale,
        nonfinite_fraction=stats["nonfinite"] / values,
        negative_fraction=stats["negative"] / values,
        above_one_fraction=stats["above_one"] / values,
        mean_spectrum=[float(v) / n if n else None for v in np.asarray(stats["band_sum"])],
        flags=[],
    )
    flags = []
    for name, limit in (thresholds or {}).items():
        value = getattr(result, name)
        if value is not None and value > limit:
            flags.append(f"{name} {value:.4g} > {limit:g}")
    return dataclasses.replace(result, flags=flags)


def check(result: QAResult, *, fail_on_flags: bool, label: str) -> None:
    """Raise :class:`QAError` when the cube must not be marked complete: any non-finite value, or a flag
    with ``fail_on_flags`` (``qa.on_exceed = "fail"``)."""
    if result.nonfinite_fraction > 0:
        raise QAError(
            f"{label}: {result.nonfinite_fraction:.2%} of the cube's values are not finite (NaN/inf model output; "
            "check the weights)",
            result.to_dict(),
        )
    if fail_on_flags and result.flags:
        raise QAError(f"{label}: QA threshold exceeded: {'; '.join(result.flags)}", result.to_dict())


MANIFEST_FIELDS = {
    "qa_backprojection_mrae": "backprojection_mrae",
    "qa_backprojection_rmse": "backprojection_rmse",
    "qa_nonfinite_fraction": "nonfinite_fraction",
    "qa_negative_fraction": "negative_fraction",
    "qa_above_one_fraction": "above_one_fraction",
    "qa_flags": "flags",
}
"""Manifest column → QA record field."""


def manifest_columns(qa: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``qa_*`` values of a QA record (flags joined by ``"; "``)."""
    out = {col: qa.get(field) for col, field in MANIFEST_FIELDS.items()}
    out["qa_flags"] = "; ".join(qa.get("flags") or []) or None
    return out

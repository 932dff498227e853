"""Whole-image reconstruction of any H×W, with the preprocessing that goes with the weights.

Two modes (DRCR needs H and W to be multiples of 4, spec §3.6):

* ``"authors"`` — the authors' ``test.py`` procedure, generalised (spec §6): for a height not a multiple
  of 4 run one pass on rows ``[0, H4)`` and one on rows ``[H-H4, H)`` (H4 = H rounded down to a multiple
  of 4); output rows ``< H4`` come from the first pass, the last ``H % 4`` rows from the second. Width is
  handled the same way, independently, so up to four passes. For ARAD's 482×512 this is exactly the
  authors' two 480-row passes. Reproduces published numbers.
* ``"pad"`` — reflect-pad bottom/right to a multiple of 4 (at least 4), one pass, crop back.

A test-time ensemble (``ensemble`` = 1, 2, 4 or 8, as MST++ ships) averages the model's outputs over the
first members of the dihedral group of the image plane (:data:`ENSEMBLE_TRANSFORMS`), each undone on its
output: 2 = identity + horizontal flip, 4 = + vertical flip + both, 8 = + the four transposed versions.

fp32 is the default and the reference. bf16/fp16 autocast and channels_last are GPU options; half
precision on this project's CPUs runs ~400× slower than fp32, so it is refused on CPU.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = [
    "select_device",
    "preprocess",
    "forward",
    "forward_tensor",
    "reconstruct",
    "transform",
    "untransform",
    "PRECISIONS",
    "MODES",
    "ENSEMBLES",
    "ENSEMBLE_TRANSFORMS",
]

PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("authors", "pad")
ENSEMBLES = (1, 2, 4, 8)
ENSEMBLE_TRANSFORMS = (
    (False, False, False),
    (False, True, False),
    (True, False, False),
    (True, True, False),
    (False, False, True),
    (False, True, True),
    (True, False, True),
    (True, True, True),
)
"""(flip rows, flip columns, transpose) of each ensemble member, applied in that order."""


def transform(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ensemble member ``k``'s view of ``x`` [..., H, W] (flips, then transpose of the last two axes)."""
    flip_rows, flip_cols, transpose = ENSEMBLE_TRANSFORMS[k]
    dims = [d for d, on in ((-2, flip_rows), (-1, flip_cols)) if on]
    y = torch.flip(x, dims) if dims else x
    return y.transpose(-2, -1) if transpose else y


def untransform(y: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`transform` (transpose first, then the same flips)."""
    flip_rows, flip_cols, transpose = ENSEMBLE_TRANSFORMS[k]
    y = y.transpose(-2, -1) if transpose else y
    dims = [d for d, on in ((-2, flip_rows), (-1, flip_cols)) if on]
    return torch.flip(y, dims) if dims else y


def _check_ensemble(ensemble: int) -> None:
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` → CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 uint8/uint16 (or float) → H×W×3 float32 divided by the image's own maximum (spec §6 step 2).

    The authors scale every image by its global max over all pixels and channels, not by 255; the
    released weights expect that. An all-zero image stays all zero.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB array, got shape {rgb.shape}")
    if not (np.issubdtype(rgb.dtype, np.integer) or np.issubdtype(rgb.dtype, np.floating)):
        raise ValueError(f"expected an integer or float RGB array, got dtype {rgb.dtype}")
    x = rgb.astype(np.float32)
    peak = float(x.max()) if x.size else 0.0
    if peak > 0:
        x /= np.float32(peak)
    return x


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(
            f"precision={precision!r} is a GPU path; on {device.type} use 'fp32' (half precision convs are ~400x slower on AVX2 CPUs)"
        )


def forward(
    model: torch.nn.Module,
    batch: np.ndarray | torch.Tensor,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    means: np.ndarray | None = None,
    ensemble: int = 1,
) -> np.ndarray:
    """:func:`forward_tensor`, copied back: B×31×h×w float32 numpy."""
    return (
        forward_tensor(model, batch, precision=precision, channels_last=channels_last, means=means, ensemble=ensemble)
        .cpu()
        .numpy()
    )


def forward_tensor(
    model: torch.nn.Module,
    batch: np.ndarray | torch.Tensor,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    means: np.ndarray | None = None,
    ensemble: int = 1,
) -> torch.Tensor:
    """Run the model on a preprocessed batch B×3×h×w float32 (h, w multiples of 4) → B×31×h×w float32, a
    tensor on the model's device (what the caller still does there, e.g. quantising the cube, saves the host).

    Runs on the model's device under ``torch.inference_mode``; autocast for bf16/fp16 on CUDA. ``means``:
    re-calibration statistics to use instead of each sample's own (:mod:`drcr_model.recalibration`),
    [n_blocks, C], or [ensemble, n_blocks, C] with one set per ensemble member (each member sees a flipped
    image, whose block inputs differ). ``ensemble``: average over that many flips/transposes.
    """
    device = next(model.parameters()).device
    _check_precision(precision, device)
    _check_ensemble(ensemble)
    x = torch.as_tensor(batch, dtype=torch.float32).to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    m = None if means is None else torch.as_tensor(means, dtype=torch.float32, device=device)
    if m is not None and m.dim() == 2:
        m = m.expand(ensemble, *m.shape)
    total: torch.Tensor | None = None
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for k in range(ensemble):
            xk = transform(x, k)
            yk = untransform((model(xk) if m is None else model(xk, m[k])).float(), k)
            total = yk if total is None else total + yk
    assert total is not None
    return total / ensemble if ensemble > 1 else total


def _run_chw(model: torch.nn.Module, x: np.ndarray, precision: str, channels_last: bool, ensemble: int) -> np.ndarray:
    """3×h×w float32 → bands×h×w float32 (one pass)."""
    return forward(model, x[None], precision=precision, channels_last=channels_last, ensemble=ensemble)[0]


def pad_chw(x: np.ndarray) -> np.ndarray:
    """3×h×w → 3×h'×w', reflect-padded at the bottom and right to multiples of 4 (at least 4): what
    :func:`reconstruct`'s ``"pad"`` mode runs the model on; its output's ``[:, :h, :w]`` is the cube."""
    _, h, w = x.shape
    ph, pw = max(4, -(-h // 4) * 4) - h, max(4, -(-w // 4) * 4) - w
    if not (ph or pw):
        return x
    # numpy's reflect repeats the reflection for pads larger than the image (tiny inputs).
    return np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge")


def reconstruct(
    rgb: np.ndarray,
    model: torch.nn.Module,
    *,
    mode: Literal["authors", "pad"] = "authors",
    precision: str = "fp32",
    channels_last: bool = False,
    preprocessed: bool = False,
    ensemble: int = 1,
) -> np.ndarray:
    """H×W×3 uint8/uint16 RGB → H×W×bands float32 cube (unclipped, as the authors save it).

    Args:
        rgb: the image; divided by its own maximum first unless ``preprocessed`` is true.
        model: a DRCRNet in eval mode (on any device).
        mode: ``"authors"`` (overlapping passes, spec §6) or ``"pad"`` (reflect pad to a multiple of 4).
        precision: ``"fp32"`` (default, reference), ``"bf16"`` or ``"fp16"`` (CUDA only).
        channels_last: run convolutions in NHWC memory format.
        preprocessed: ``rgb`` is already float32 divided by its max.
        ensemble: test-time ensemble size (1, 2, 4 or 8 flips/transposes, averaged).
    """
    _check_ensemble(ensemble)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    x = (rgb.astype(np.float32) if preprocessed else preprocess(rgb)).transpose(2, 0, 1)
    _, h, w = x.shape
    if mode == "pad":
        return np.ascontiguousarray(
            _run_chw(model, pad_chw(x), precision, channels_last, ensemble)[:, :h, :w].transpose(1, 2, 0)
        )
    if h < 4 or w < 4:
        raise ValueError(f"mode='authors' needs an image of at least 4x4, got {h}x{w}; use mode='pad'")
    h4, w4 = h - h % 4, w - w % 4
    row_passes = [0] if h4 == h else [0, h - h4]
    col_passes = [0] if w4 == w else [0, w - w4]
    out: np.ndarray | None = None
    for r0 in row_passes:
        for c0 in col_passes:
            y = _run_chw(
                model, np.ascontiguousarray(x[:, r0 : r0 + h4, c0 : c0 + w4]), precision, channels_last, ensemble
            )
            if out is None:
                out = np.empty((y.shape[0], h, w), dtype=np.float32)
            # First pass fills rows/cols [0, H4); the shifted pass supplies only the last H % 4 rows/cols.
            rs = slice(0, h4) if r0 == 0 else slice(h4, h)
            cs = slice(0, w4) if c0 == 0 else slice(w4, w)
            out[:, rs, cs] = y[:, rs.start - r0 : rs.stop - r0, cs.start - c0 : cs.stop - c0]
    assert out is not None
    return np.ascontiguousarray(out.transpose(1, 2, 0))

"""The integers an error-bounded chunk stores: model output quantised and run through the planar predictor.

Three implementations that give the same integers, bit for bit: :func:`fused_residual` (numba, on the
host, one chunk at a time in one pass: each float32 is read once and its integer written straight into
the chunk blosc compresses), :func:`chunk_residual` (numpy, the same in band slabs, used where numba is
not installed) and :func:`region_residuals` (torch, on the tensor's device, every chunk of a region at
once), so an actor with a GPU copies back int16 residuals and leaves its host CPUs only the compressor
(:mod:`pipeline.cubes` stores them). numba is the writers' dependency only: readers decode with zarr.

What the integers are, for a chunk ``q`` (bands × h × w, the quantised values ``rint(x · scale)``, padded
to the chunk by repeating the last row and column): ``d`` = the delta of ``q`` along y over the flattened
(band, x, y) order, then ``r`` = the delta of ``d`` along x over the flattened (band, y, x) order, both
wrapping in the integer type: exactly what zarr's ``transpose, numcodecs.delta, transpose, numcodecs.delta``
(:meth:`pipeline.cubes.Quantiser.filters`) make of ``q``, so zarr's decoder undoes them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["SLAB_VALUES", "fused_available", "fused_residual", "chunk_residual", "region_residuals", "OutOfRange"]

SLAB_VALUES = 1 << 18
"""Values per band slab of :func:`chunk_residual` (4 bands of a 256² chunk: 1 MiB of float32), so the
quantise, the range test and both deltas of a slab run in cache; the float32 output is read once."""


class OutOfRange(ValueError):
    """Some value is NaN, ±inf or beyond the quantiser's range (the caller says which and where)."""


def fused_available() -> bool:
    """Whether :func:`fused_residual` can run (numba imports). Its kernel compiles on its first call in a
    process (seconds), or loads from numba's cache (``pipeline/__pycache__``, else numba's per-user cache
    directory; a fraction of a second)."""
    return _fused_kernel() is not None


def fused_residual(block: np.ndarray, scale: float, bound: float, band: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The stored integers of one chunk, as :func:`chunk_residual` gives them, in one pass: ``block``
    (bands × h × w float32, h, w ≤ the chunk's, any layout) quantised with ``scale``, padded, predicted
    into ``out`` (bands × chunk h × chunk w, the integer type); ``band`` (chunk h × chunk w, the same
    type) holds one band's quantised values, small enough to stay in cache. Returns ``out``.

    Raises:
        OutOfRange: ``|x · scale| > bound`` (or NaN) somewhere in ``block``.
    """
    kernel = _fused_kernel()
    assert kernel is not None, "numba is not installed: use chunk_residual"
    nb, h, w = block.shape
    item = block.itemsize
    sb, sy, sx = block.strides
    if block.dtype != np.float32 or sx != item or sb < 0 or sy < 0 or sb % item or sy % item:
        block = np.ascontiguousarray(block, dtype=np.float32)
        item, (sb, sy, sx) = block.itemsize, block.strides
    # One flat, unit-stride view of the memory the block spans, indexed with its row and band strides:
    # numba compiles a strided 3-D view's rows as strided loads, this one as vector loads.
    span = (nb - 1) * (sb // item) + (h - 1) * (sy // item) + w
    flat = np.lib.stride_tricks.as_strided(block, shape=(span,), strides=(item,), writeable=False)
    # The test runs in float32 (a float64 compare would convert every value): the bound rounded down, so
    # every value passing it passes the exact one; the caller retests a failure exactly.
    bound32 = np.float32(bound)
    if float(bound32) > bound:
        bound32 = np.nextafter(bound32, np.float32(0))
    if not kernel(flat, sb // item, sy // item, nb, h, w, np.float32(scale), bound32, band, out):
        raise OutOfRange
    return out


@functools.cache
def _fused_kernel() -> Callable[..., bool] | None:
    try:
        import numba
    except Exception as exc:  # not installed; or broken, e.g. a MagicMock scipy (colour-science's stand-in)
        if not isinstance(exc, ImportError):
            logging.getLogger(__name__).warning("numba unusable (%s); encoding with numpy", exc)
        return None

    def kernel(flat, sb, sy, nb, h, w, scale, bound, band, out):
        _, cy, cx = out.shape
        prev_q = 0  # the previous band's last quantised value
        prev_d = 0  # the delta along y of the value before (module docstring: d)
        for b in range(nb):
            r = out[b]
            for y in range(cy):
                if y < h:
                    row = flat[b * sb + y * sy : b * sb + y * sy + w]
                    q = band[y]
                    ok = True
                    for x in range(w):
                        t = row[x] * scale  # float32 · float32, as numpy's multiply
                        ok &= abs(t) <= bound  # NaN fails; no branch, so the loop vectorises
                        q[x] = np.rint(t)  # exact: within the integer type once ok (checked below)
                    if not ok:
                        return False
                    last = q[w - 1]
                    for x in range(w, cx):  # pad: repeat the last column
                        q[x] = last
                else:  # pad: repeat the last row
                    band[y, :] = band[h - 1, :]
                # The row's residuals while it is in cache (and the next row's floats on their way):
                # the planar predictor's, wrapping in the type on the store.
                if y >= 1:
                    for x in range(1, cx):
                        r[y, x] = band[y, x] - band[y - 1, x] - band[y, x - 1] + band[y - 1, x - 1]
                    if y >= 2:
                        r[y, 0] = (band[y, 0] - band[y - 1, 0]) - (band[y - 1, cx - 1] - band[y - 2, cx - 1])
            # Row 0's deltas along y follow the band's last row (d's flattened (band, x, y) order), and
            # r[1, 0] follows row 0's last delta.
            d = band[0, 0] - prev_q
            r[0, 0] = d - prev_d
            prev_d = d
            for x in range(1, cx):
                d = band[0, x] - band[cy - 1, x - 1]
                r[0, x] = d - prev_d
                prev_d = d
            if cy >= 2:
                r[1, 0] = (band[1, 0] - band[0, 0]) - prev_d
                prev_d = band[cy - 1, cx - 1] - band[cy - 2, cx - 1]
            prev_q = band[cy - 1, cx - 1]
        return True

    # nogil: the encode pool's threads run it in parallel; no fastmath: NaN must fail the range test
    # and the float32 multiply must round as numpy's (and torch's) does. Compiling takes seconds, so
    # the machine code is cached, where numba finds a writable place for it.
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(kernel)
    except RuntimeError:  # no writable cache directory: compile once per process
        return numba.njit(nogil=True, boundscheck=False)(kernel)


def _slab_bands(chunk_shape: Sequence[int]) -> int:
    return max(1, SLAB_VALUES // (int(chunk_shape[1]) * int(chunk_shape[2])))


def chunk_residual(
    block: np.ndarray, scale: float, bound: float, bufs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
) -> np.ndarray:
    """The stored integers of one chunk: ``block`` (bands × h × w float32, h, w ≤ the chunk's) quantised
    with ``scale``, padded, predicted; returns ``bufs[3]``. numpy, in band slabs: where numba is not
    installed (:func:`fused_residual` is about 1.5x faster), and the reference the tests compare with.

    ``bufs``: float32 scratch of (slab bands, chunk h, chunk w), then ``q``, ``d``, ``r`` of the chunk's
    shape and integer type (reused across calls: fresh multi-MB arrays cost a page fault per 4 KiB).

    Raises:
        OutOfRange: ``|x · scale| > bound`` (or NaN) somewhere in ``block``.
    """
    f, q, d, r = bufs
    nb, _, _ = q.shape
    _, h, w = block.shape
    k = f.shape[0]
    scale32 = np.float32(scale)
    for b0 in range(0, nb, k):
        b1 = min(nb, b0 + k)
        t = f[: b1 - b0, :h, :w]
        np.multiply(block[b0:b1], scale32, out=t)
        # The range test on x · scale rather than on x: float32 rounding can let |x| pass a relative
        # 2⁻²⁴ beyond the limit, which the limit's 0.9 factor and its one-step distance from the integer
        # type's end absorb. NaN fails the test.
        if not (float(t.min()) >= -bound and float(t.max()) <= bound):
            raise OutOfRange
        np.rint(t, out=t)
        qs = q[b0:b1]
        np.copyto(qs[:, :h, :w], t, casting="unsafe")  # exact: integers within the type (checked above)
        qs[:, :h, w:] = qs[:, :h, w - 1 : w]
        qs[:, h:, :] = qs[:, h - 1 : h, :]
        _slab_deltas(q, d, r, b0, b1)
    return r


def _slab_deltas(q: np.ndarray, d: np.ndarray, r: np.ndarray, b0: int, b1: int) -> None:
    """``d`` and ``r`` (module docstring) of bands ``b0..b1``, given ``q`` of bands ``..b1``: the first
    row of each column follows the last row of the column before (band b's first column follows band
    b−1's last), and each band's first value follows the previous band's last."""
    qs, ds = q[b0:b1], d[b0:b1]
    np.subtract(qs[:, 1:, :], qs[:, :-1, :], out=ds[:, 1:, :])
    np.subtract(qs[:, 0, 1:], qs[:, -1, :-1], out=ds[:, 0, 1:])
    first = max(b0, 1)
    np.subtract(q[first:b1, 0, 0], q[first - 1 : b1 - 1, -1, -1], out=d[first:b1, 0, 0])
    n = q.shape[1] * q.shape[2]
    flat_d, flat_r = d.reshape(-1), r.reshape(-1)
    i0, i1 = b0 * n, b1 * n
    if b0 == 0:
        d[0, 0, 0] = q[0, 0, 0]
        flat_r[0] = flat_d[0]
        i0 = 1
    np.subtract(flat_d[i0:i1], flat_d[i0 - 1 : i1 - 1], out=flat_r[i0:i1])


def region_residuals(
    region: torch.Tensor, scale: float, bound: float, chunk_shape: Sequence[int], dtype: str
) -> torch.Tensor:
    """Every chunk of a region, on the region's device: ``region`` (bands × h × w float32 covering whole
    chunks, or ending at the image border) → (chunks along y, chunks along x, bands, cy, cx) integers of
    ``dtype`` (``"<i2"``/``"<i4"``), the same integers as :func:`chunk_residual` gives for each chunk.

    Raises:
        OutOfRange: some ``|x · scale| > bound``, or NaN (one device-to-host sync to find out).
    """
    import torch

    with torch.inference_mode():  # no autograd records; the model's output is an inference tensor anyway
        return _region_residuals(region, scale, bound, chunk_shape, dtype)


def _region_residuals(
    region: torch.Tensor, scale: float, bound: float, chunk_shape: Sequence[int], dtype: str
) -> torch.Tensor:
    import torch

    nb, cy, cx = (int(s) for s in chunk_shape)
    t = region.to(torch.float32) * torch.tensor(scale, dtype=torch.float32, device=region.device)
    lo, hi = torch.aminmax(t)
    if not (float(lo) >= -bound and float(hi) <= bound):  # NaN fails both
        raise OutOfRange
    q = torch.round(t).to(torch.int32)  # round half to even, as numpy's rint
    _, h, w = q.shape
    ny, nx = -(-h // cy), -(-w // cx)
    pad_y, pad_x = ny * cy - h, nx * cx - w
    if pad_y or pad_x:  # only the image's last chunks are partial: repeat the last row and column
        q = torch.cat([q, q[:, :, -1:].expand(nb, h, pad_x)], dim=2)
        q = torch.cat([q, q[:, -1:, :].expand(nb, pad_y, nx * cx)], dim=1)
    chunks = q.reshape(nb, ny, cy, nx, cx).permute(1, 3, 0, 2, 4)  # ny, nx, bands, cy, cx
    d = chunks.clone()
    d[..., 1:, :] = chunks[..., 1:, :] - chunks[..., :-1, :]
    d[..., :, 0, 1:] = chunks[..., :, 0, 1:] - chunks[..., :, -1, :-1]
    d[..., 1:, 0, 0] = chunks[..., 1:, 0, 0] - chunks[..., :-1, -1, -1]
    flat = d.reshape(ny, nx, -1)
    res = flat.clone()
    res[..., 1:] = flat[..., 1:] - flat[..., :-1]
    bits = 16 if dtype == "<i2" else 32
    if bits == 16:  # wrap to the integer type as numcodecs' Delta does; exact for int32 (no overflow)
        res = ((res + 32768) & 0xFFFF) - 32768
    out_dtype = torch.int16 if bits == 16 else torch.int32
    return res.to(out_dtype).reshape(ny, nx, nb, cy, cx)

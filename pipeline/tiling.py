"""Tiling and stitching: cut an image into equal windows with a halo, write each core exactly once.

Images with H·W ≤ ``max_tile_pixels`` are one tile (the whole image). Larger images get a grid of
cores of side ``tile_core`` (a multiple of the output chunk, so every core covers whole chunks and no
two tiles ever touch the same chunk); each tile's window is its core plus ``halo`` on every side, all
windows of an image the same size (a multiple of 4, so they batch). Only the core of each tile's output
is kept.

Windows never reach past the *padded image*: the image reflect-padded bottom/right to a multiple of 4,
which is what the network sees when it runs on the whole image (``inference.mode = "pad"``). A window
that would pass that border is shifted inwards, so the network's own padding of every feature map
happens at the true border, as in the whole-image run (reflect-padding the input is not the same: 3×3
kernels are not symmetric). Window origins are multiples of 4, so the network's 2×2 and 4×4 pooling
grids line up with the whole image's. The halo is honoured on every side away from the border (less
2 px on the bottom/right side when ``halo % 4 == 2``). With a model whose receptive field fits in the
halo, tiled output then equals whole-image output; DRCR's channel re-calibration also needs the whole
image's statistics (:mod:`pipeline.statistics`), summed over :func:`statistics_region`, which partitions
the padded image.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

__all__ = [
    "Croppable",
    "Tile",
    "plan_tiles",
    "padded_size",
    "statistics_region",
    "reflect_indices",
    "extract_window",
    "crop_core",
    "stitch",
]


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile, in image pixel coordinates.

    ``y0, x0``: top-left of the window (multiples of 4, inside the padded image); ``height, width``: window
    size; rows/columns past the image's own border are its reflection.
    ``core_y0, core_x0, core_h, core_w``: the output region this tile writes (inside the image).
    ``whole``: the tile is the whole image, run without a halo (single-tile images).
    """

    index: int
    y0: int
    x0: int
    height: int
    width: int
    core_y0: int
    core_x0: int
    core_h: int
    core_w: int
    whole: bool = False

    @property
    def core_slices(self) -> tuple[slice, slice]:
        """Where the core sits in the image."""
        return slice(self.core_y0, self.core_y0 + self.core_h), slice(self.core_x0, self.core_x0 + self.core_w)

    @property
    def core_in_window(self) -> tuple[slice, slice]:
        """Where the core sits in the window."""
        dy, dx = self.core_y0 - self.y0, self.core_x0 - self.x0
        return slice(dy, dy + self.core_h), slice(dx, dx + self.core_w)


def padded_size(n: int) -> int:
    """``n`` rounded up to a multiple of 4 (at least 4): the extent the network sees along one axis."""
    return max(4, -(-n // 4) * 4)


def _window_origin(core_start: int, halo: int, size: int, padded: int) -> int:
    """Core start less the halo, down to a multiple of 4, shifted inwards to fit in ``[0, padded)``."""
    return min(max(0, (core_start - halo) // 4 * 4), padded - size)


def plan_tiles(height: int, width: int, *, max_tile_pixels: int, tile_core: int, halo: int) -> list[Tile]:
    """The tiles of an H×W image, in row-major order (deterministic)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if height * width <= max_tile_pixels:
        return [Tile(0, 0, 0, height, width, 0, 0, height, width, whole=True)]
    if tile_core % 4 or halo % 2:
        raise ValueError(f"tile_core ({tile_core}) must be a multiple of 4 and halo ({halo}) even")
    hp, wp = padded_size(height), padded_size(width)
    side = tile_core + 2 * halo
    wh, ww = min(side, hp), min(side, wp)  # an image narrower than a window is one window across
    tiles: list[Tile] = []
    for cy in range(0, height, tile_core):
        for cx in range(0, width, tile_core):
            ch, cw = min(tile_core, height - cy), min(tile_core, width - cx)
            y0, x0 = _window_origin(cy, halo, wh, hp), _window_origin(cx, halo, ww, wp)
            tiles.append(Tile(len(tiles), y0, x0, wh, ww, cy, cx, ch, cw))
    return tiles


def statistics_region(tile: Tile, height: int, width: int) -> tuple[slice, slice]:
    """Where a tile's share of the whole-image statistics lies, in window coordinates.

    The core, extended to the padded border (:func:`padded_size`) on tiles whose core ends at the image's
    bottom or right border; over the tiles of one plan these regions partition the padded image, so their
    sums add up to the sums the whole-image ("pad" mode) run pools over.
    """
    ys, xs = tile.core_in_window
    if tile.core_y0 + tile.core_h == height:
        ys = slice(ys.start, padded_size(height) - tile.y0)
    if tile.core_x0 + tile.core_w == width:
        xs = slice(xs.start, padded_size(width) - tile.x0)
    return ys, xs


def reflect_indices(start: int, length: int, n: int) -> np.ndarray:
    """Indices ``start .. start+length-1`` mapped into ``[0, n)`` by reflection without edge repeat
    (PyTorch/numpy ``reflect``), repeated as often as needed; ``n == 1`` maps everything to 0."""
    i = np.arange(start, start + length)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    m = np.mod(i, period)
    return np.where(m >= n, period - m, m)


class Croppable(Protocol):
    """An image that hands out crops (e.g. :class:`pipeline.decode.DecodedImage`)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...


def extract_window(image: np.ndarray | Croppable, tile: Tile) -> np.ndarray:
    """The tile's window of an H×W×C image (rows/columns past the image reflected), same dtype, contiguous.

    ``image`` is an array or anything with ``shape`` and ``crop(y0, y1, x0, x1)``; only the rows and columns
    the window uses are cropped, so a decoded image never has to exist as one whole array.
    """
    h, w = image.shape[:2]
    if tile.whole:
        return image if isinstance(image, np.ndarray) else image.crop(0, h, 0, w)
    rows = reflect_indices(tile.y0, tile.height, h)
    cols = reflect_indices(tile.x0, tile.width, w)
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    block = image[r0:r1, c0:c1] if isinstance(image, np.ndarray) else image.crop(r0, r1, c0, c1)
    inside = tile.y0 >= 0 and tile.x0 >= 0 and tile.y0 + tile.height <= h and tile.x0 + tile.width <= w
    if inside:
        return np.ascontiguousarray(block)
    return np.ascontiguousarray(block[(rows - r0)[:, None], (cols - c0)[None, :]])


def crop_core(output: np.ndarray, tile: Tile) -> np.ndarray:
    """The core of a tile's model output, ``bands×height×width`` → ``bands×core_h×core_w``."""
    ys, xs = tile.core_in_window
    return output[:, ys, xs]


def stitch(
    cores: list[tuple[Tile, np.ndarray]], height: int, width: int, bands: int, dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """Assemble ``bands×H×W`` from ``(tile, core)`` pairs (any order; cores never overlap)."""
    out = np.empty((bands, height, width), dtype=dtype)
    covered = np.zeros((height, width), dtype=bool)
    for tile, core in cores:
        ys, xs = tile.core_slices
        out[:, ys, xs] = core
        covered[ys, xs] = True
    if not covered.all():
        raise ValueError("tiles do not cover the image")
    return out

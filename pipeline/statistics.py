"""Whole-image re-calibration statistics of a tiled image, gathered from its tiles (``tiling.statistics``).

``"global"`` statistics make a tiled image's cube equal the whole-image run's (README "Exact tiling"):
before the tiles are predicted, passes over all tiles find each DRCR block's whole-image input mean
(:mod:`drcr_model.recalibration`). One pass = every batch of tiles → :func:`tile_sums` (a map, on any
worker) → add the sums → :meth:`GatherState.update` (the reduction); memory is one batch of windows.
:func:`gather_statistics` runs the passes in this process; on Ray the inference actor that takes the image
runs them (:meth:`pipeline.work.Predictor.gather_means`, :mod:`pipeline.predict`) with the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from drcr_model.net import DRCRNet
from drcr_model.recalibration import DEFAULT_TOL, GatherState, block_input_sums
from pipeline.tiling import Croppable, Tile, extract_window, statistics_region

__all__ = ["STATISTICS", "needs_global", "windows_to_batch", "tile_sums", "add_sums", "gather_statistics"]

STATISTICS = ("tile", "global")
"""``tiling.statistics`` values: each tile's own re-calibration statistics, or the whole image's."""


def needs_global(statistics: str, tiles: Sequence[Tile]) -> bool:
    """Whether an image's tiles need the gathered statistics (a single whole tile has its own)."""
    return statistics == "global" and not (len(tiles) == 1 and tiles[0].whole)


def windows_to_batch(windows: Sequence[np.ndarray], scale: float) -> np.ndarray:
    """Raw h×w×3 windows → preprocessed B×3×h×w float32 (divided by the whole image's maximum)."""
    return np.stack([w.astype(np.float32).transpose(2, 0, 1) / np.float32(scale) for w in windows])


def tile_sums(
    model: torch.nn.Module,
    batch: np.ndarray,
    tiles: Sequence[Tile],
    height: int,
    width: int,
    means: np.ndarray | None,
    *,
    channels_last: bool = False,
    ensemble: int = 1,
) -> tuple[np.ndarray, int]:
    """One batch's share of a pass: ([n_blocks, C] float64 sums, or [ensemble, n_blocks, C], pixels counted).

    ``batch`` is :func:`windows_to_batch` of the tiles' windows of an H×W image; each tile counts its
    :func:`pipeline.tiling.statistics_region`. With a test-time ensemble each member (a flipped view of
    the image) has its own statistics.
    """
    device = next(model.parameters()).device
    x = torch.as_tensor(batch, dtype=torch.float32).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if not isinstance(model, DRCRNet):
        raise TypeError(f"tiling.statistics = 'global' needs a DRCRNet, got {type(model).__name__}")
    regions = [statistics_region(t, height, width) for t in tiles]
    m = None if means is None else torch.as_tensor(means, dtype=torch.float32, device=device)
    count = sum((ys.stop - ys.start) * (xs.stop - xs.start) for ys, xs in regions)
    if ensemble == 1:
        return block_input_sums(model, x, regions, m), int(count)
    sums = [block_input_sums(model, x, regions, None if m is None else m[k], k) for k in range(ensemble)]
    return np.stack(sums), int(count)


def add_sums(state: GatherState, parts: Sequence[tuple[np.ndarray, int] | None]) -> GatherState:
    """The reduction of one pass: add the batches' sums and counts, then update the means.

    A pass submitted after the passes were done (its parts are ``None``) leaves the state as it is.
    """
    if state.done:
        return state
    done = [p for p in parts if p is not None]
    if len(done) != len(parts):
        raise ValueError("add_sums: a batch of an unfinished pass returned no sums")
    total = np.zeros_like(done[0][0], dtype=np.float64)
    for sums, _ in done:
        total += sums
    return state.update(total, sum(count for _, count in done))


def gather_statistics(
    model: DRCRNet,
    image: np.ndarray | Croppable,
    tiles: Sequence[Tile],
    *,
    scale: float,
    batch_size: int = 4,
    tol: float = DEFAULT_TOL,
    channels_last: bool = False,
    ensemble: int = 1,
) -> GatherState:
    """Run the passes over an H×W×3 image's tiles here; the final state's ``means`` [n_blocks, C] float32.

    Windows are cut per batch (``image`` may be a decoder's :class:`~pipeline.tiling.Croppable`), so the
    memory is one batch's windows and activations, whatever the image's size.
    """
    h, w = image.shape[:2]
    state = GatherState(n_blocks=len(model.backbone), tol=tol)
    while not state.done:
        parts = []
        for i in range(0, len(tiles), batch_size):
            group = tiles[i : i + batch_size]
            batch = windows_to_batch([extract_window(image, t) for t in group], scale)
            parts.append(
                tile_sums(model, batch, group, h, w, state.means, channels_last=channels_last, ensemble=ensemble)
            )
        state = add_sums(state, parts)
    return state

"""Whole-image channel re-calibration statistics for tiled inference.

Each DRCR block pools its input twice: ``se1`` pools the block input ``x`` and ``se2`` pools
``se1(x) = x · g1``, whose mean is ``g1 · mean(x)``. So one statistic per block — the spatial mean of the
block's input over the whole image, [C] — is all a tile lacks to compute exactly what the whole-image run
computes (given a halo at least the receptive radius: 18 + 6 px per block, 30 for 2 blocks, 78 for 10). This module
runs the network on tiles with those means supplied (``DRCRNet.forward(x, means)``) and collects each
tile's share of them: sums over a region of the tile (its core), so that over all tiles of an image the
regions partition the image and the sums add up to the whole image's.

The means are found by passes over all tiles (:class:`GatherState`): the first pass runs with each tile's
own statistics; every later pass runs with the previous pass's means. Block 0's input does not depend on
any re-calibration, so after pass ``p`` the means of blocks ``0 .. p-1`` are exact: ``n_blocks`` passes
always suffice, and the passes stop earlier once the means stop changing (``tol``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from drcr_model.inference import transform, untransform
from drcr_model.net import DRCRNet

__all__ = ["block_input_sums", "GatherState", "DEFAULT_TOL"]

DEFAULT_TOL = 1e-5
"""Largest change of any mean between passes, relative to the largest mean, at which the passes stop."""

Region = tuple[slice, slice]


def block_input_sums(
    model: DRCRNet,
    x: torch.Tensor,
    regions: Sequence[Region],
    means: torch.Tensor | None = None,
    member: int = 0,
) -> np.ndarray:
    """Sums of each block's input over a region of each sample, added over the batch.

    Args:
        model: the network (eval mode).
        x: preprocessed tiles [B, 3, h, w] float32 on the model's device (h, w multiples of 4).
        regions: per sample, the (rows, columns) slices of the tile whose pixels count.
        means: [n_blocks, C] means to run the blocks with; ``None``: each tile's own.
        member: test-time ensemble member (:func:`drcr_model.inference.transform`): the network runs on
            that view of the tiles; the regions stay in the tiles' own coordinates.

    Returns:
        [n_blocks, C] float64 sums (block ``i``'s input, before block ``i`` runs). The last block's
        output is not needed, so the last block and the tail do not run.
    """
    if len(regions) != x.shape[0]:
        raise ValueError(f"block_input_sums: {len(regions)} regions for a batch of {x.shape[0]}")
    n = len(model.backbone)
    sums = torch.zeros(n, model.config["channels"], dtype=torch.float64, device=x.device)
    with torch.inference_mode():
        f = model.trunk(transform(x, member))
        for i, block in enumerate(model.backbone):
            g = untransform(f, member)
            for b, (ys, xs) in enumerate(regions):
                sums[i] += g[b, :, ys, xs].sum(dim=(1, 2), dtype=torch.float64)
            if i + 1 < n:
                f = block(f, None if means is None else means[i])
    return sums.cpu().numpy()


@dataclasses.dataclass(frozen=True)
class GatherState:
    """Where the passes stand: the current means, how many passes fed them, whether to stop.

    ``means`` [n_blocks, C] float32, or [ensemble, n_blocks, C] (one set per test-time ensemble member);
    ``None`` before the first pass: tiles use their own statistics.
    Pure data, picklable: a distributed driver can hand it from pass to pass (README "Exact tiling").
    """

    n_blocks: int
    tol: float = DEFAULT_TOL
    means: np.ndarray | None = None
    passes: int = 0
    change: float = float("inf")

    @property
    def done(self) -> bool:
        """Exact (``n_blocks`` passes) or converged (the last pass changed no mean by more than ``tol``)."""
        return self.passes >= self.n_blocks or self.change <= self.tol

    def update(self, sums: np.ndarray, count: int) -> GatherState:
        """The state after one pass whose tiles' sums add up to ``sums`` over ``count`` pixels."""
        if count <= 0:
            raise ValueError(f"GatherState.update: no pixels counted ({count})")
        new = (np.asarray(sums, dtype=np.float64) / count).astype(np.float32)
        change = float("inf")
        if self.means is not None:
            scale = float(np.abs(new).max()) or 1.0
            change = float(np.abs(new - self.means).max()) / scale
        return dataclasses.replace(self, means=new, passes=self.passes + 1, change=change)

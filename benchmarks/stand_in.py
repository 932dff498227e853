"""A stand-in for the model, injected by the benchmarks (``run_job(spec, predictor=stand_in(0.01))``).

It sleeps a fixed time per batch under the predictor's compute lock and outputs zeros, so a benchmark measures
scheduling, transfer and writing without model compute. It lives here, not in the job spec: production specs
cannot turn it on, and cubes it writes are zeros.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from pipeline.tiling import Tile
from pipeline.work import Predictor


class StandInPredictor(Predictor):
    """:class:`pipeline.work.Predictor` with the model replaced by ``time.sleep(latency_s)`` and zeros.

    Args:
        latency_s: seconds per batch (0: as fast as the rest of the pipeline allows).
    """

    def __init__(self, *args: object, latency_s: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.latency_s = latency_s

    def bounds_heap(self) -> bool:
        return True  # no CPU convolutions, so the fixed mmap threshold costs nothing (pipeline.work.bound_heap)

    def _compute_batch(
        self, scale: float, tiles: Sequence[Tile], windows: Sequence[np.ndarray] | np.ndarray
    ) -> list[np.ndarray]:
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        return [np.zeros((len(self.ctx.bands_nm), t.core_h, t.core_w), dtype=np.float32) for t in tiles]


def stand_in(latency_s: float) -> Callable[..., Predictor]:
    """The ``predictor`` argument of :func:`pipeline.execution.run_job` for a stand-in of ``latency_s``.

    This module is not importable on Ray's workers (``benchmarks/`` is not a package), so cloudpickle sends
    it by value."""
    from ray import cloudpickle  # the copy Ray itself pickles functions with

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return functools.partial(StandInPredictor, latency_s=latency_s)

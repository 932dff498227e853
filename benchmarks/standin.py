"""The benchmarks' stand-in models, injected through ``run_job(spec, predictor=...)`` (the production spec
has no stand-in setting): predictors whose compute is replaced, to measure what the pipeline costs around
the model. Never for real work: their cubes are zeros.

* :func:`stand_in` (:class:`StandIn`): sleeps a fixed latency per batch under the compute lock, exactly
  where the model's forward runs, and outputs zero cores; everything else is real (weights loaded, and the
  statistics passes of ``tiling.statistics = "global"`` run the model; QA statistics, previews and zarr
  writes of the zeros; completion markers). Its heap is bounded (:func:`pipeline.work.bound_heap`), as a
  GPU actor's is: it runs no CPU convolution.
* :class:`ZeroLatency`: returns at once, writing nothing, to find how many batches one driver can take.

Ray workers unpickle these classes by value (registered below), so a job's actors need not find this
directory on their ``sys.path`` (a test or a benchmark run from anywhere).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray.cloudpickle

from pipeline.tiling import Tile
from pipeline.work import JobContext, Predictor

__all__ = ["StandIn", "stand_in", "ZeroLatency"]


class StandIn(Predictor):
    """A :class:`~pipeline.work.Predictor` whose forward is ``time.sleep(latency_s)`` and whose cores are
    zeros (``float32``, bands × core_h × core_w)."""

    def __init__(self, ctx: JobContext, *, latency_s: float, **kwargs: Any) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s = {latency_s}: must be >= 0")
        self.latency_s = latency_s
        super().__init__(ctx, **kwargs)

    def _bounds_heap(self) -> bool:
        return True  # no CPU convolution pays for the fixed threshold

    def _warm_up(self) -> None:
        pass  # nothing of a model's to warm: its first batch costs what the others do

    def _compute_outputs(
        self, scale: float, tiles: list[Tile], windows: list[np.ndarray], means: np.ndarray | None = None
    ) -> list[np.ndarray]:
        time.sleep(self.latency_s)
        return [np.zeros((len(self.ctx.bands_nm), t.core_h, t.core_w), dtype=np.float32) for t in tiles]


def stand_in(latency_s: float) -> Callable[..., Predictor]:
    """What ``run_job``'s ``predictor`` takes: each actor's predictor a :class:`StandIn` of ``latency_s``."""
    return functools.partial(StandIn, latency_s=latency_s)


class ZeroLatency(Predictor):
    """A predictor that returns at once: no model and no writes; only the per-tile QA statistics the driver's
    completion step reduces (of zero cubes), so every record is what a real batch sends back."""

    def run(
        self, group: str, scale: float, tiles: list[Tile], windows: list[np.ndarray], means: np.ndarray | None = None
    ) -> dict[str, Any]:
        from pipeline import qa
        from pipeline.provenance import host_info
        from pipeline.work import _core_inputs

        now = time.time()
        outputs = [np.zeros((len(self.ctx.bands_nm), t.core_h, t.core_w), dtype=np.float32) for t in tiles]
        stats = qa.tile_stats(_core_inputs(scale, tiles, windows), outputs, self._response)
        return {"infer_s": 0.0, "write_s": 0.0, "infer_cpu_s": 0.0, "compute_start": now, "compute_end": now,
                "pixels": int(sum(t.core_h * t.core_w for t in tiles)), "device": "stand-in",
                "host": host_info()["hostname"], "pid": os.getpid(), "peak_rss": 0, "qa": stats, "qa_s": 0.0}  # fmt: skip


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

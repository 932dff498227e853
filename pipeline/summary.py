"""What a run reports: :class:`RunSummary` (counts, timings, pool, peaks) and :func:`compute_stats`, the
inference actors' compute aggregated from their per-batch results."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

__all__ = ["RunSummary", "compute_stats"]


@dataclasses.dataclass(kw_only=True)
class RunSummary:
    run_id: str
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    megapixels: float = 0.0
    elapsed_s: float = 0.0
    manifest: str = ""
    published: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What :func:`pipeline.publish.publish_run` wrote (``report``: the HTML report's URL, ``stac``, …)."""
    catalog: str = ""
    actors: int = 0
    """Inference actors started (0 when every input was unchanged)."""
    prepared: int = 0
    """Prepare tasks started (inputs read)."""
    unchanged: int = 0
    """Inputs skipped without reading: unchanged since the catalog's run (counted in ``skipped``)."""
    nodes: list[str] = dataclasses.field(default_factory=list)
    pool: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The inference actor pool asked for (:class:`PoolPlan`): ``min_size``, ``max_size``, ``num_gpus`` and
    ``num_cpus`` per actor."""
    peak_rss: dict[str, int] = dataclasses.field(default_factory=dict)
    """Peak resident memory in bytes by process kind: ``driver``, ``prepare`` (largest over prepare tasks)
    and ``actor`` (largest over inference actors, which also write the cubes)."""
    compute: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Model compute of the inference actors (see :func:`compute_stats`): ``batches``, ``busy_s`` (sum of
    compute times), ``statistics_s`` (the decode and statistics passes of images with gathered statistics,
    on the actors, before their batches), ``cpu_s`` (CPU time of the computing threads; below ``busy_s`` when the actor was
    descheduled mid-compute), ``span_s`` (first compute start to last compute end, over all actors) and
    ``busy_fraction`` (per actor, compute time ÷ its own first-start-to-last-end span, averaged): the
    share of its steady-state time an actor spent computing rather than waiting for work; ``all_active_s``
    and ``all_active_pixels``: the window in which every actor had started and none had finished, and the
    output pixels computed in it (batches pro-rated)."""

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"megapixels_per_s": self.megapixels_per_s}


def compute_stats(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the per-batch results of :meth:`pipeline.work.Predictor.run` (compute start/end, wall clock)."""
    spans = [r for r in results if "compute_start" in r]
    if not spans:
        return {}
    by_actor: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in spans:
        by_actor[(r.get("host"), r.get("pid"))].append(r)
    # The window in which every actor was computing (after the last one started, before the first one
    # ran out of work): throughput there is free of staggered actor start-up and of the tail.
    lo = max(min(r["compute_start"] for r in rs) for rs in by_actor.values())
    hi = min(max(r["compute_end"] for r in rs) for rs in by_actor.values())
    window_pixels = 0.0
    for r in spans:
        dur = r["compute_end"] - r["compute_start"]
        overlap = max(0.0, min(hi, r["compute_end"]) - max(lo, r["compute_start"]))
        window_pixels += r.get("pixels", 0) * (overlap / dur if dur > 0 else 0.0)
    fractions = []
    for rs in by_actor.values():
        span = max(r["compute_end"] for r in rs) - min(r["compute_start"] for r in rs)
        fractions.append(sum(r["infer_s"] for r in rs) / span if span > 0 else 1.0)
    first, last = min(r["compute_start"] for r in spans), max(r["compute_end"] for r in spans)
    return {
        "batches": len(spans),
        "actors": len(by_actor),
        "pixels": int(sum(r.get("pixels", 0) for r in spans)),
        "busy_s": float(sum(r["infer_s"] for r in spans)),
        "statistics_s": float(sum(r.get("statistics_s", 0.0) for r in spans)),
        "cpu_s": float(sum(r.get("infer_cpu_s", 0.0) for r in spans)),
        "first_start": first,
        "last_end": last,
        "span_s": last - first,
        "busy_fraction": sum(fractions) / len(fractions),
        "all_active_s": max(0.0, hi - lo),
        "all_active_pixels": window_pixels,
    }

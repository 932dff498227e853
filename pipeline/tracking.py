"""Counting each image's batch records until the image is settled; pure, no Ray (unit-tested).

The predictors return one :class:`~pipeline.work.BatchRecord` per :class:`~pipeline.work.PreparedBatch`, in
whatever order the pool finishes them (several actors, retries, nodes that come and go). An image is
*settled* once a record for each of its ``count`` batches has arrived (each index counted once, so a
record delivered twice changes nothing): only then may its completion marker be written, since each record
is sent after its batch's regions are written. An image with a failed batch settles as failed once all its
records are in, so no batch of it is still writing when the row is final.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import Any

from pipeline.work import BatchRecord, BatchResult, ImageMeta, Status

__all__ = ["ImageDone", "CompletionTracker", "compute_stats"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageDone:
    """A settled image: its meta, its batches' results in batch order, and the first batch error if any."""

    meta: ImageMeta
    results: tuple[BatchResult, ...] = ()
    error: str | None = None
    prepare_peak_rss: int = 0

    @property
    def needs_marker(self) -> bool:
        """Every batch written and none failed: the completion marker is due."""
        return self.meta.status is Status.RUN and self.error is None


@dataclasses.dataclass
class _Open:
    meta: ImageMeta
    count: int
    results: dict[int, BatchResult] = dataclasses.field(default_factory=dict)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)
    peak: int = 0

    def done(self, error: str | None = None) -> ImageDone:
        first = error or next((self.errors[i] for i in sorted(self.errors)), None)
        results = tuple(self.results[i] for i in sorted(self.results))
        return ImageDone(meta=self.meta, results=results, error=first, prepare_peak_rss=self.peak)


class CompletionTracker:
    """Collects batch records by image key; :meth:`add` returns the image once it is settled."""

    def __init__(self) -> None:
        self._open: dict[str, _Open] = {}
        self._settled: set[str] = set()

    def add(self, record: BatchRecord) -> ImageDone | None:
        """Count ``record``; the :class:`ImageDone` if this was the image's last outstanding batch, else None."""
        key = record.meta.ref.key
        if key in self._settled:
            return None  # a duplicate of a record already counted
        if record.count == 0:
            self._settled.add(key)
            return ImageDone(meta=record.meta, prepare_peak_rss=record.prepare_peak_rss)
        entry = self._open.setdefault(key, _Open(meta=record.meta, count=record.count))
        if record.count != entry.count or not 0 <= record.index < entry.count:
            raise ValueError(f"{key}: batch {record.index} of {record.count} does not fit {entry.count} batches")
        entry.peak = max(entry.peak, record.prepare_peak_rss)
        if record.index not in entry.results and record.index not in entry.errors:
            if record.error is not None:
                entry.errors[record.index] = record.error
            elif record.result is not None:
                entry.results[record.index] = record.result
            else:
                raise ValueError(f"{key}: batch {record.index} has neither a result nor an error")
        if len(entry.results) + len(entry.errors) < entry.count:
            return None
        del self._open[key]
        self._settled.add(key)
        return entry.done()

    def is_settled(self, key: str) -> bool:
        return key in self._settled

    @property
    def open_images(self) -> int:
        """Images with some batches counted and some still outstanding."""
        return len(self._open)

    def close(self) -> list[ImageDone]:
        """Settle every image still missing batches as failed (its records never came) and return them."""
        out = []
        for key, entry in sorted(self._open.items()):
            missing = sorted(set(range(entry.count)) - set(entry.results) - set(entry.errors))
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            out.append(entry.done(f"batches {shown} of {entry.count} never returned (lost after Ray's retries)"))
            self._settled.add(key)
        self._open.clear()
        return out


def compute_stats(results: Iterable[BatchResult]) -> dict[str, Any]:
    """Aggregate the per-batch results of :meth:`pipeline.work.Predictor.run` (compute start/end, wall clock).

    Keys: ``batches``, ``actors``, ``pixels``, ``busy_s`` (sum of compute times), ``cpu_s``, ``first_start``,
    ``last_end``, ``span_s``, ``busy_fraction`` (per actor, compute time ÷ its own first-start-to-last-end
    span, averaged), ``all_active_s`` and ``all_active_pixels`` (the window in which every actor had started
    and none had finished, and the output pixels computed in it, batches pro-rated).
    """
    spans = list(results)
    if not spans:
        return {}
    by_actor: dict[tuple[str, int], list[BatchResult]] = collections.defaultdict(list)
    for r in spans:
        by_actor[(r.host, r.pid)].append(r)
    # The window in which every actor was computing (after the last one started, before the first one
    # ran out of work): throughput there is free of staggered actor start-up and of the tail.
    lo = max(min(r.compute_start for r in rs) for rs in by_actor.values())
    hi = min(max(r.compute_end for r in rs) for rs in by_actor.values())
    window_pixels = 0.0
    for r in spans:
        dur = r.compute_end - r.compute_start
        overlap = max(0.0, min(hi, r.compute_end) - max(lo, r.compute_start))
        window_pixels += r.pixels * (overlap / dur if dur > 0 else 0.0)
    fractions = []
    for rs in by_actor.values():
        span = max(r.compute_end for r in rs) - min(r.compute_start for r in rs)
        fractions.append(sum(r.infer_s for r in rs) / span if span > 0 else 1.0)
    first, last = min(r.compute_start for r in spans), max(r.compute_end for r in spans)
    return {
        "batches": len(spans),
        "actors": len(by_actor),
        "pixels": int(sum(r.pixels for r in spans)),
        "busy_s": float(sum(r.infer_s for r in spans)),
        "cpu_s": float(sum(r.infer_cpu_s for r in spans)),
        "first_start": first,
        "last_end": last,
        "span_s": last - first,
        "busy_fraction": sum(fractions) / len(fractions),
        "all_active_s": max(0.0, hi - lo),
        "all_active_pixels": window_pixels,
    }

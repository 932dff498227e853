"""The records between the stages of a run, and counting each image's batch records until it is settled;
pure, no Ray (unit-tested).

The prepare stage cuts each image into :class:`PreparedBatch` es; the predictors return one
:class:`BatchRecord` per batch, in whatever order the pool finishes them (several actors, retries, nodes
that come and go). An image is *settled* once a record for each of its ``count`` batches has arrived (each
index counted once, so a record delivered twice changes nothing): only then may its completion marker be
written, since each record is sent after its batch's regions are written. An image with a failed batch
settles as failed once all its records are in, so no batch of it is still writing when the row is final.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import numpy as np

from pipeline.manifest import ManifestRow
from pipeline.tiling import Tile
from pipeline.work import ImageMeta

__all__ = ["PreparedBatch", "PreparedImage", "BatchRecord", "ImageDone", "CompletionTracker", "pack", "unpack"]


def pack(record: Any) -> bytes:
    """A record (or work item) as the bytes one dataset row carries between the stages of a run."""
    return pickle.dumps(record, protocol=5)


def unpack(data: Any) -> Any:
    return pickle.loads(data)  # noqa: S301 - records this job's own workers made


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedBatch:
    """The ``index``-th of an image's ``count`` batches in plan order: its tiles and their raw windows (h×w×3,
    as decoded). (An image that needs gathered statistics travels as one :class:`PreparedImage` instead.)

    ``count == 0``: nothing to infer: ``meta`` is a skipped or failed image, or ``row`` is the finished
    manifest row of something that is not an image (a rejected member, an unreadable or empty archive),
    under ``row_key`` (the member's key, the archive's normalised URL).
    ``meta.tiles`` is emptied in transit (``tiles_total`` keeps the number): each batch carries its own.
    ``peak_rss``: the prepare process's peak when this was made."""

    meta: ImageMeta | None = None
    row: ManifestRow | None = None
    row_key: str = ""
    index: int = 0
    count: int = 0
    tiles_total: int = 0
    tiles: tuple[Tile, ...] = ()
    windows: tuple[np.ndarray, ...] = ()
    peak_rss: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedImage:
    """An image whose tiles need its gathered statistics (``tiling.statistics = "global"``): one row for all
    its ``count`` batches. The actor that takes it decodes the image again (:func:`pipeline.work.redecode`,
    from ``encoded`` — the encoded bytes, when prepare held them in memory — or from storage), runs the
    statistics passes and then the ``count`` batches of ``ray.batch_size`` tiles in plan order, and returns
    one :class:`BatchRecord` per batch. ``meta.tiles`` is the whole plan. No window travels."""

    meta: ImageMeta
    count: int
    encoded: bytes | None = None
    peak_rss: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchRecord:
    """The small record one predictor call returns to the driver for one :class:`PreparedBatch`: ``result``
    (:meth:`pipeline.work.Predictor.run`'s timings and QA statistics) when its cores are written, ``error``
    when it failed for good; ``meta``/``row`` passed through."""

    meta: ImageMeta | None = None
    row: ManifestRow | None = None
    row_key: str = ""
    index: int = 0
    count: int = 0
    tiles_total: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    prepare_peak_rss: int = 0

    @property
    def key(self) -> str:
        if self.meta is not None:
            return self.meta.ref.key
        return self.row_key


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageDone:
    """A settled input: its meta (or finished row), its batches' results in batch order, and the first batch
    error if any."""

    meta: ImageMeta | None = None
    row: ManifestRow | None = None
    row_key: str = ""
    tiles_total: int = 0
    results: tuple[dict[str, Any], ...] = ()
    error: str | None = None
    prepare_peak_rss: int = 0

    @property
    def needs_marker(self) -> bool:
        """Every batch written and none failed: the completion marker is due."""
        return self.meta is not None and self.meta.status == "run" and self.error is None


@dataclasses.dataclass
class _Open:
    meta: ImageMeta
    count: int
    tiles_total: int
    results: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)
    peak: int = 0

    def done(self, error: str | None = None) -> ImageDone:
        first = error or next((self.errors[i] for i in sorted(self.errors)), None)
        results = tuple(self.results[i] for i in sorted(self.results))
        return ImageDone(
            meta=self.meta, tiles_total=self.tiles_total, results=results, error=first, prepare_peak_rss=self.peak
        )


class CompletionTracker:
    """Collects batch records by image key; :meth:`add` returns the image once it is settled."""

    def __init__(self) -> None:
        self._open: dict[str, _Open] = {}
        self._settled: set[str] = set()

    def add(self, record: BatchRecord) -> ImageDone | None:
        """Count ``record``; the :class:`ImageDone` if this was the image's last outstanding batch, else None."""
        key = record.key
        if key in self._settled:
            return None  # a duplicate of a record already counted
        if record.count == 0:
            self._settled.add(key)
            return ImageDone(
                meta=record.meta,
                row=record.row,
                row_key=record.row_key,
                tiles_total=record.tiles_total,
                prepare_peak_rss=record.prepare_peak_rss,
            )
        assert record.meta is not None
        entry = self._open.setdefault(key, _Open(meta=record.meta, count=record.count, tiles_total=record.tiles_total))
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

"""The prepare stage of a run (Ray Data's ``flat_map``, in CPU tasks): a work item in, its images'
prepared rows out. An image is read, hashed, checked for resume, decoded, tiled and its cube created
(:func:`pipeline.work.prepare_source`); then it leaves as per-image batches of windows in plan order, or
(global statistics) as one :class:`~pipeline.tracking.PreparedImage` for an inference actor to decode again.
A ``.tar.gz`` is streamed once, here: its members' bytes never leave the task."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from pipeline import storage
from pipeline.errors import InputError
from pipeline.planning import ImageTask
from pipeline.rows import NO_IMAGES, archive_row, rejected_row
from pipeline.sources import ImageRef, Rejected, iter_targz, normalize_url
from pipeline.statistics import needs_global
from pipeline.tiling import extract_window
from pipeline.tracking import PreparedBatch, PreparedImage, pack, unpack
from pipeline.work import JobContext, peak_rss, prepare_source, storage_options

__all__ = ["prepare_rows", "image_batches", "targz_batches"]


def prepare_rows(row: dict[str, Any], ctx: JobContext) -> Iterator[dict[str, Any]]:
    """A work item's prepared batches; a ``.tar.gz`` is streamed here, once, its members prepared in turn
    (their bytes never leave this task)."""
    item = unpack(row["item"])
    batches = image_batches(ctx, item.ref) if isinstance(item, ImageTask) else targz_batches(ctx, item.url)
    for batch in batches:
        yield {"batch": pack(batch)}


def targz_batches(ctx: JobContext, url: str) -> Iterator[PreparedBatch | PreparedImage]:
    """Stream a .tar.gz once: each image member's batches, a row per rejected member, and the archive's own
    row if it holds no image or breaks off."""
    rejected: list[Rejected] = []
    images = 0

    def drain() -> Iterator[PreparedBatch]:
        while rejected:
            rej = rejected.pop(0)
            yield PreparedBatch(row=rejected_row(ctx, rej), row_key=rej.ref.key, peak_rss=peak_rss())

    try:
        max_bytes = ctx.spec.decode.max_member_bytes
        for ref, data in iter_targz(url, storage_options(ctx), on_rejected=rejected.append, max_bytes=max_bytes):
            yield from drain()
            images += 1
            yield from image_batches(ctx, ref, data)
            del data
        yield from drain()
        if images == 0:
            yield PreparedBatch(row=archive_row(url, ctx.run_id, NO_IMAGES), row_key=normalize_url(url))
    except InputError as exc:
        yield from drain()
        problem = InputError(storage.describe_error(exc))
        yield PreparedBatch(row=archive_row(url, ctx.run_id, problem), row_key=normalize_url(url))


def image_batches(ctx: JobContext, ref: ImageRef, data: bytes | None = None) -> Iterator[PreparedBatch | PreparedImage]:
    """One image's batches (``ray.batch_size`` tiles each, in plan order), one settled batch, or (global
    statistics) one :class:`PreparedImage`.

    Windows are cut from the decoder's buffer one batch at a time (a consumer that stops pulling stops
    the cutting); batch composition depends only on the image and the spec, never on the workers."""
    meta, decoded, encoded = prepare_source(ctx, ref, data, keep_encoded=True)
    del data
    tiles = meta.tiles
    size = ctx.spec.ray.batch_size
    count = -(-len(tiles) // size)
    if decoded is not None and needs_global(ctx.spec.tiling.statistics, tiles):
        del decoded  # the actor decodes it again (see :mod:`pipeline.predict`)
        yield PreparedImage(meta=meta, count=count, encoded=encoded, peak_rss=peak_rss())
        return
    del encoded
    slim = dataclasses.replace(meta, tiles=[])  # each batch carries its own tiles
    if decoded is None:
        yield PreparedBatch(meta=slim, tiles_total=len(tiles), peak_rss=peak_rss())
        return
    for index in range(count):
        chunk = tuple(tiles[index * size : (index + 1) * size])
        windows = tuple(extract_window(decoded, t) for t in chunk)
        yield PreparedBatch(
            meta=slim,
            index=index,
            count=count,
            tiles_total=len(tiles),
            tiles=chunk,
            windows=windows,
            peak_rss=peak_rss(),
        )
        del windows
    del decoded

"""The manifest rows of a run's inputs: an image once settled, a rejected archive member, a whole archive
that cannot be read or holds no image."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.manifest import ManifestRow
from pipeline.sources import ImageRef, Rejected
from pipeline.tracking import ImageDone
from pipeline.work import JobContext

__all__ = ["SKIP_REASONS", "NO_IMAGES", "image_row", "archive_row", "rejected_row"]

SKIP_REASONS = ("not an image extension",)
"""A rejected archive entry with one of these reasons is ``skipped`` (not an error); any other fails."""

NO_IMAGES = "no-images"
"""What an archive without images is recorded as (:func:`archive_row`)."""


def _input_row(ctx: JobContext, ref: ImageRef, **kw: Any) -> ManifestRow:
    return ManifestRow(
        input=storage.redact(ref.key), source=storage.redact(ref.source), member=ref.member, run_id=ctx.run_id, **kw
    )


def image_row(ctx: JobContext, done: ImageDone) -> ManifestRow:
    """The manifest row of a settled image (``ok`` rows become final once their marker is written)."""
    meta = done.meta
    assert meta is not None
    row = _input_row(
        ctx,
        meta.ref,
        group=meta.group,
        source_sha256=meta.sha256,
        source_bytes=meta.nbytes,
        width=meta.width,
        height=meta.height,
        tiles=done.tiles_total,
        decode_s=meta.decode_s,
        # The image's own work (decode, compute, writes), not its wait in the streams.
        total_s=meta.decode_s
        + float(sum(r["infer_s"] + r["write_s"] + r.get("statistics_s", 0.0) for r in done.results)),
    )
    if meta.status == "run":
        row.infer_s = float(sum(r["infer_s"] for r in done.results))
        if done.error is not None:
            row.status, row.error_type, row.error, row.group = "failed", "InferenceError", done.error, None
        return row
    row.status, row.error_type, row.error = meta.status, meta.error_type, meta.error
    if meta.status == "failed":
        row.group = None
    return row


def archive_row(url: str, run_id: str, problem: Exception | str) -> ManifestRow:
    """The row of a whole archive: ``failed`` when it cannot be read, ``skipped`` when it holds no image."""
    name = storage.redact(url)
    if isinstance(problem, Exception):
        return ManifestRow(
            input=name, source=name, status="failed", error_type="ArchiveError", error=str(problem), run_id=run_id
        )
    return ManifestRow(
        input=name,
        source=name,
        status="skipped",
        error_type="NoImages",
        error=f"{name}: archive contains no images",
        run_id=run_id,
    )


def rejected_row(ctx: JobContext, rej: Rejected) -> ManifestRow:
    status = "skipped" if rej.reason in SKIP_REASONS else "failed"
    return _input_row(
        ctx, rej.ref, status=status, error_type="RejectedMember", error=f"{storage.redact(rej.ref.name)}: {rej.reason}"
    )

"""The completion tracker: an image settles once a record for each of its batches is in, whatever the order."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from pipeline.manifest import ManifestRow
from pipeline.sources import ImageRef
from pipeline.tracking import BatchRecord, CompletionTracker
from pipeline.work import ImageMeta


def _meta(name: str = "a.png") -> ImageMeta:
    return ImageMeta(ref=ImageRef(source=name, member=None, kind="file"), group=f"g/{name}")


def _result(i: int, *, pid: int = 1, start: float = 0.0) -> dict[str, Any]:
    return {
        "infer_s": 1.0, "write_s": 0.1, "infer_cpu_s": 0.9, "compute_start": start + i, "compute_end": start + i + 1.0,
        "pixels": 100, "device": "cpu", "host": "h", "pid": pid, "peak_rss": 10 + i,
    }  # fmt: skip


def _ok(meta: ImageMeta, i: int, count: int = 3) -> BatchRecord:
    return BatchRecord(
        meta=meta, index=i, count=count, tiles_total=2 * count, result=_result(i), prepare_peak_rss=100 + i
    )


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_settles_after_the_last_batch_in_any_order(order: tuple[int, ...]) -> None:
    t, meta = CompletionTracker(), _meta()
    got = [t.add(_ok(meta, i)) for i in order]
    assert got[:2] == [None, None]
    done = got[2]
    assert done is not None and done.needs_marker and done.error is None
    assert [r["compute_start"] for r in done.results] == [0.0, 1.0, 2.0]  # batch order, not arrival order
    assert done.prepare_peak_rss == 102 and done.tiles_total == 6
    assert t.is_settled(meta.ref.key) and t.open_images == 0


def test_interleaved_images_settle_independently() -> None:
    t, a, b = CompletionTracker(), _meta("a.png"), _meta("b.png")
    assert t.add(_ok(a, 0, 2)) is None
    assert t.add(_ok(b, 1, 2)) is None
    done_b = t.add(_ok(b, 0, 2))
    assert done_b is not None and done_b.meta is b
    assert t.open_images == 1 and not t.is_settled(a.ref.key)
    done_a = t.add(_ok(a, 1, 2))
    assert done_a is not None and done_a.meta is a


def test_a_duplicate_record_is_counted_once() -> None:
    t, meta = CompletionTracker(), _meta()
    assert t.add(_ok(meta, 0)) is None
    assert t.add(_ok(meta, 0)) is None  # delivered twice: still one of three
    assert t.add(_ok(meta, 1)) is None
    assert t.add(_ok(meta, 2)) is not None
    assert t.add(_ok(meta, 2)) is None  # after settling: ignored


def test_a_failed_batch_fails_its_image_only_once_all_its_batches_are_in() -> None:
    t, a, b = CompletionTracker(), _meta("a.png"), _meta("b.png")
    assert t.add(BatchRecord(meta=a, index=1, count=3, error="actor died 4 times")) is None  # others still writing
    assert t.add(_ok(b, 0, 1)) is not None
    assert t.add(_ok(a, 0)) is None
    done = t.add(_ok(a, 2))
    assert done is not None and not done.needs_marker and done.error == "actor died 4 times"
    assert len(done.results) == 2


def test_settled_meta_needs_no_batches() -> None:
    t = CompletionTracker()
    meta = ImageMeta(ref=ImageRef(source="x.png", member=None, kind="file"), group="g", status="skipped", error="same")
    done = t.add(BatchRecord(meta=meta, index=0, count=0))
    assert done is not None and not done.needs_marker and done.results == ()
    assert t.is_settled(meta.ref.key)


def test_a_finished_row_settles_under_its_key() -> None:
    """A rejected member or an archive's own row (found while streaming a .tar.gz) passes through as is."""
    t = CompletionTracker()
    row = ManifestRow(input="x.tar.gz!m.txt", source="x.tar.gz", status="skipped", run_id="r")
    done = t.add(BatchRecord(row=row, row_key="x.tar.gz!m.txt"))
    assert done is not None and done.row is row and done.row_key == "x.tar.gz!m.txt" and not done.needs_marker
    assert t.add(BatchRecord(row=row, row_key="x.tar.gz!m.txt")) is None  # delivered twice: once


def test_close_fails_images_with_missing_batches() -> None:
    t, meta = CompletionTracker(), _meta()
    t.add(_ok(meta, 1))
    (done,) = t.close()
    assert not done.needs_marker and "batches 0, 2 of 3 never returned" in (done.error or "")
    assert t.close() == [] and t.is_settled(meta.ref.key)


def test_inconsistent_records_are_a_programming_error() -> None:
    t, meta = CompletionTracker(), _meta()
    t.add(_ok(meta, 0, 3))
    with pytest.raises(ValueError, match="does not fit"):
        t.add(_ok(meta, 1, 4))
    with pytest.raises(ValueError, match="neither"):
        t.add(BatchRecord(meta=meta, index=2, count=3))


def test_compute_stats_all_active_window() -> None:
    from pipeline.summary import compute_stats

    # actor 1 computes 0..3 s, actor 2 starts at 1 s and computes 1..4 s: all active from 1 to 3 s.
    results = [_result(i, pid=1) for i in range(3)] + [_result(i, pid=2, start=1.0) for i in range(3)]
    s = compute_stats(results)
    assert (s["batches"], s["actors"], s["pixels"]) == (6, 2, 600)
    assert s["span_s"] == 4.0 and s["all_active_s"] == 2.0 and s["all_active_pixels"] == pytest.approx(400.0)
    assert s["busy_fraction"] == 1.0
    assert compute_stats([]) == {}

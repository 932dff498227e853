"""The predict stage of a run: Ray Data's class UDF over the inference actor pool (:class:`Predict`), one
:class:`~pipeline.work.Predictor` per actor, and the node-local attempt counts (:class:`BatchAttempts`) that
fail a batch which keeps killing its actor (a "poison batch") for its image only.

Global statistics (``tiling.statistics = "global"``, the default) run on the inference actors, on their
device, and an image is the unit: prepare sends such an image as one small row (:class:`PreparedImage`:
its plan and, when it held them in memory, its encoded bytes; no window), and the actor that takes it
decodes the image again (:func:`pipeline.work.redecode`; past ``decode.stream_pixels`` by region, so its
memory stays bounded), runs the passes over windows cut per batch, then the image's batches, and returns a
record per batch (:class:`_ImageCall`). Why this shape: the passes must see every window of the image,
several times in sequence, before its first inference batch. Spreading them over the pool needs every
window held somewhere until the passes end (memory that grows with the image) and a cycle between stages
that Ray Data has no operator for; gathering them in prepare runs the heaviest part of a tiled image on a
CPU, off the GPUs. One actor per image keeps the passes on the pool, needs no window in the object store,
and keeps every output byte independent of the number of actors: the passes and the batches are cut in
plan order, ``ray.batch_size`` tiles each. The costs: the image is decoded twice (prepare needs its
maximum, its size and the cube; decoding is small next to ``n_blocks`` + 1 passes of the model), and one
actor computes a whole image (a pool of several actors works on several images at once); an actor lost
mid-image redoes the whole image (writes are idempotent). ``tiling.statistics = "tile"`` avoids the
passes: its images travel as per-image batches of windows.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import os
import pickle
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np
import ray

from pipeline import storage
from pipeline.tiling import extract_window
from pipeline.tracking import BatchRecord, PreparedBatch, PreparedImage, pack, unpack
from pipeline.work import JobContext, Predictor, redecode

__all__ = ["MAX_BATCH_ATTEMPTS", "BatchAttempts", "Predict"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

MAX_BATCH_ATTEMPTS = 4
"""Attempts of one batch (the first and 3 retries) before its image fails: a batch that keeps killing its
actor (a tile that OOMs its worker, say) must not stall the job; Ray Data retries actor calls without
bound, so the predictor counts them (:class:`BatchAttempts`)."""


class BatchAttempts:
    """How many times each batch in flight has started on this node: a file per batch in this node's temp
    directory, one byte per start, removed when the batch returns. A file outlives the actor process that a
    poison batch kills, and Ray restarts the actor and retries the call on it.

    Files, not a counter actor: an actor costs a process of its own (0.8 CPU-s to start, during the job's
    start-up) and a blocking call per batch (2.7–3.9 ms wall and 0.9 ms of the predictor's CPU per batch,
    measured on the loaded 2-core box; these files: 0.27–0.34 ms and 0.08 ms), and every actor's calls
    would queue on the one counter. The price: starts are counted per node, so a batch whose actor is
    restarted on another node (its node was lost) starts there from 1; a batch is still failed after at
    most ``MAX_BATCH_ATTEMPTS`` starts on each node it is retried on. Images computed whole in one call
    (:class:`_ImageCall`) also keep their progress here (one mechanism for both), per node likewise: a
    retry that lands on another node restarts its image from scratch (still correct, writes are
    idempotent; only slower).
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._dir_made = False  # per process: each actor gets its own copy

    def _path(self, key: str) -> str:
        digest = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:20]
        return os.path.join(tempfile.gettempdir(), "drcr-batch-attempts", f"{self.run_id}.{digest}")

    def begin(self, key: str) -> int:
        """Count one start of ``key``; returns the starts so far (1 for the first)."""
        path = self._path(key)
        if not self._dir_made:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._dir_made = True
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, b".")
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def end(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    # The progress of an image computed in one call (_ImageCall), for a retry of that call: a pickle
    # of its gathered means and written batches' results (a few KiB) beside the counts.
    def _kept_path(self, image: str) -> str:
        # Not "<run>.*": those are the start counts (the poison-batch test watches them).
        head, tail = os.path.split(self._path(image))
        return os.path.join(head, "kept-" + tail)

    def start(self, image: str, count: int) -> tuple[dict[Any, Any], str | None, int]:
        """An image's call starts: what is kept of it, its next step (``statistics`` or a batch index) and
        that step's attempt, begun here."""
        kept = self.kept(image)
        steps = ([] if "means" in kept else ["statistics"]) + [str(i) for i in range(count) if i not in kept]
        if not steps:
            return kept, None, 0
        return kept, steps[0], self.begin(_step_key(image, steps[0]))

    def keep(self, image: str, what: Any, value: Any) -> None:
        kept = self.kept(image) | {what: value}
        path = self._kept_path(image)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            pickle.dump(kept, f, protocol=5)
        os.replace(path + ".tmp", path)  # a process killed mid-write leaves the previous progress

    def kept(self, image: str) -> dict[Any, Any]:
        try:
            with open(self._kept_path(image), "rb") as f:
                return dict(pickle.load(f))  # noqa: S301 - written by this run's actors on this node
        except FileNotFoundError:
            return {}

    def forget(self, image: str, count: int) -> None:
        for step in ["statistics", *map(str, range(count))]:
            self.end(_step_key(image, step))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._kept_path(image))


def _attempt_key(group: str, step: str) -> str:
    """The key the attempt counter keeps for one step (a batch's index, or a pass) of a group's work."""
    return f"{group}#{step}"


def _step_key(image: str, step: str) -> str:
    """The attempt key of one step of an image's call: the same key as its batch row would have."""
    return _attempt_key(image.removesuffix("#image"), step)


class _Poisoned(Exception):
    """A step of an image's call that lost its actor more than ``MAX_BATCH_ATTEMPTS`` times."""


class Predict:
    """Ray Data's class UDF over the actor pool: one :class:`Predictor` per actor (weights loaded once);
    each call takes one :class:`PreparedBatch` row, writes its cores and returns one :class:`BatchRecord`
    (or one :class:`PreparedImage` row and returns a record per batch, see :class:`_ImageCall`)."""

    def __init__(
        self, ctx: JobContext, num_cpus: float, predictor: Callable[..., Predictor], attempts: BatchAttempts
    ) -> None:
        self.ctx = ctx
        self.predictor = predictor(ctx, num_cpus=num_cpus)
        # A PreparedImage's batches (see _ImageCall): as many in flight as the calls Ray Data runs at once.
        self.calls = 2 if ctx.spec.ray.overlap_writes else 1
        self.writer = concurrent.futures.ThreadPoolExecutor(max_workers=self.calls, thread_name_prefix="image")
        # Batches of images in flight on this actor, over all its calls: as many as batch rows would be (one
        # per call), so an actor that dies takes at most that many batches' attempts with it.
        self.slots = threading.BoundedSemaphore(self.calls)
        self.attempts = attempts
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records: list[BatchRecord] = []
        for packed in rows["batch"]:
            b = unpack(packed)
            records.extend(_ImageCall(self, b).run() if isinstance(b, PreparedImage) else [self._one(b)])
        return {"record": np.array([pack(r) for r in records], dtype=object)}

    def _ask(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """``call``, a method of the attempt counter; ``None`` when the counter is unusable (the node's temp
        directory unwritable or full, a progress file unreadable): the attempt then counts as unknown,
        rather than the error escaping the UDF, which would stop the whole dataset."""
        try:
            return call(*args, **kwargs)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            log.warning("%s: attempt counter unavailable (%s); going on", args[0] if args else "", exc)
            return None

    def _one(self, b: PreparedBatch) -> BatchRecord:
        base = BatchRecord(
            meta=b.meta,
            row=b.row,
            row_key=b.row_key,
            index=b.index,
            count=b.count,
            tiles_total=b.tiles_total,
            prepare_peak_rss=b.peak_rss,
        )
        if b.count == 0:
            return base
        assert b.meta is not None
        key = _attempt_key(b.meta.group, str(b.index))
        attempt = self._ask(self.attempts.begin, key) or 0
        if attempt > 1:
            log.warning(
                "%s: batch %d of %d starts again (start %d): its actor was lost",
                b.meta.ref.name,
                b.index,
                b.count,
                attempt,
            )
        if attempt > MAX_BATCH_ATTEMPTS:
            self._ask(self.attempts.end, key)
            why = f"batch {b.index} of {b.count} lost its actor {attempt - 1} times (each attempt killed the worker)"
            return dataclasses.replace(base, error=why)
        try:
            result = self.predictor.run(b.meta.group, b.meta.scale, list(b.tiles), list(b.windows))
        except Exception as exc:  # the model or the write failed for this batch: its image fails, the job goes on
            log.warning("%s: batch %d failed: %s", b.meta.ref.name, b.index, storage.describe_error(exc))
            return dataclasses.replace(base, error=storage.describe_error(exc))
        finally:
            self._ask(self.attempts.end, key)
        return dataclasses.replace(base, result=result | {"node": self.node})


class _ImageCall:
    """One call on a :class:`PreparedImage`: decode it again, gather its statistics here (on this actor's
    device), then run its batches in plan order, two in flight with ``ray.overlap_writes`` (one computes
    while the other writes, as two calls would); one record per batch.

    Its progress (the gathered means, each written batch's result) is kept beside the attempt counts
    (:class:`BatchAttempts`), so a call retried after its actor died goes on where it stopped, and the
    statistics and each batch count their own attempts: the step that keeps killing its actor (a "poison
    batch") fails the image, as a batch row's does."""

    def __init__(self, udf: Predict, p: PreparedImage) -> None:
        self.udf, self.p, self.meta = udf, p, p.meta
        self.tiles = list(p.meta.tiles)
        self.size = udf.ctx.spec.ray.batch_size
        self.image = f"{p.meta.group}#image"
        # One round trip before anything else: a kill right after the call starts is counted. ``first`` is
        # the step whose attempt that began, ``attempt`` its number.
        started = udf._ask(udf.attempts.start, self.image, p.count) or ({}, None, 0)
        self.kept: dict[Any, Any] = started[0]
        self.first: str | None = started[1]
        self.attempt: int = started[2]
        self.results: dict[int, dict[str, Any]] = {i: r for i, r in self.kept.items() if isinstance(i, int)}
        self.in_flight: collections.deque[tuple[int, str, concurrent.futures.Future[dict[str, Any]]]] = (
            collections.deque()
        )

    def run(self) -> list[BatchRecord]:
        p, meta = self.p, self.meta
        slim = dataclasses.replace(meta, tiles=[])
        base = BatchRecord(meta=slim, count=p.count, tiles_total=len(self.tiles), prepare_peak_rss=p.peak_rss)
        error: str | None = None
        try:
            decoded = redecode(self.udf.ctx, meta, p.encoded) if len(self.results) < p.count else None
            means, statistics_s = self._statistics(decoded)
            self._batches(decoded, means)
            del decoded
            self.results[0] = self.results[0] | {"statistics_s": statistics_s}
        except Exception as exc:  # decode, passes, model or writes: this image fails, the job goes on
            error = str(exc) if isinstance(exc, _Poisoned) else storage.describe_error(exc)
            log.warning("%s: failed on the actor: %s", meta.ref.name, error)
            self._abandon()
        self.udf._ask(self.udf.attempts.forget, self.image, p.count)
        if error is not None:
            return [dataclasses.replace(base, index=i, error=error) for i in range(p.count)]
        node = self.udf.node
        return [dataclasses.replace(base, index=i, result=self.results[i] | {"node": node}) for i in range(p.count)]

    def _statistics(self, decoded: Any) -> tuple[np.ndarray | None, float]:
        """The image's gathered means and the time their passes took: kept from an earlier attempt of this
        call, or gathered now (``None`` when every batch was written already)."""
        means = self.kept.get("means")
        statistics_s = float(self.kept.get("statistics_s", 0.0))
        if means is not None or decoded is None:
            return means, statistics_s
        self._begin("statistics")
        t0 = time.perf_counter()
        means, passes = self.udf.predictor.gather_means(self.meta.scale, decoded, self.tiles, self.size)
        statistics_s = time.perf_counter() - t0
        log.info("%s: statistics gathered in %d passes, %.2f s", self.meta.ref.name, passes, statistics_s)
        ask, attempts = self.udf._ask, self.udf.attempts
        ask(attempts.keep, self.image, "means", means)
        ask(attempts.keep, self.image, "statistics_s", statistics_s)
        ask(attempts.end, _step_key(self.image, "statistics"))
        return means, statistics_s

    def _batches(self, decoded: Any, means: np.ndarray | None) -> None:
        """The batches not written yet, in plan order, each in the actor's writer threads once it has a
        slot; returns when all are written."""
        udf = self.udf
        for index in range(self.p.count):
            if index in self.results:
                continue
            self._take_slot()
            try:
                self._begin(str(index))
            except BaseException:
                udf.slots.release()
                raise
            chunk = self.tiles[index * self.size : (index + 1) * self.size]
            assert decoded is not None  # a batch still to run
            windows = [extract_window(decoded, t) for t in chunk]
            fut = udf.writer.submit(udf.predictor.run, self.meta.group, self.meta.scale, chunk, windows, means)
            self.in_flight.append((index, _step_key(self.image, str(index)), fut))
            del windows
        while self.in_flight:
            self._settle(*self.in_flight.popleft())

    def _take_slot(self) -> None:
        """One of the actor's batch slots for the next batch; this call's own batches in flight are settled
        first while it has its share of them, or while another call holds the other slot."""
        udf = self.udf
        while len(self.in_flight) >= udf.calls:
            self._settle(*self.in_flight.popleft())
        while self.in_flight and not udf.slots.acquire(blocking=False):
            self._settle(*self.in_flight.popleft())  # another call holds the other slot: finish ours first
        if not self.in_flight:
            udf.slots.acquire()

    def _begin(self, step: str) -> None:
        """Count an attempt of ``step`` (``statistics`` or a batch index; the call's first step was counted
        as it started); past ``MAX_BATCH_ATTEMPTS`` the step is poisoned."""
        if step != self.first:
            self.attempt = self.udf._ask(self.udf.attempts.begin, _step_key(self.image, step)) or 0
        self.first = None
        if self.attempt > MAX_BATCH_ATTEMPTS:
            what = "the statistics passes" if step == "statistics" else f"batch {step} of {self.p.count}"
            raise _Poisoned(f"{what} lost its actor {self.attempt - 1} times (each attempt killed the worker)")

    def _settle(self, index: int, key: str, fut: concurrent.futures.Future[dict[str, Any]]) -> None:
        """Wait for a batch in flight; its result is kept as the call's progress, its attempt ended."""
        try:
            self.results[index] = fut.result()
        finally:
            self.udf.slots.release()
        self.udf._ask(self.udf.attempts.keep, self.image, index, self.results[index])
        self.udf._ask(self.udf.attempts.end, key)

    def _abandon(self) -> None:
        """After a failure: the batches still writing end before the image is settled; their slots are freed."""
        for _, _, fut in self.in_flight:
            fut.exception()
            self.udf.slots.release()

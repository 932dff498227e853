"""The work of one job, as plain functions, one plain class and the typed records between them, without Ray.

The stages :mod:`pipeline.execution` runs on Ray Data, in order:

* :func:`expand_item` (a task): a :data:`WorkItem` → :class:`ImageTask` per image (archives listed, a
  ``.tar.gz`` streamed once) and settled :class:`ImageMeta` for what is not converted;
* :func:`prepare_image` (a CPU task): read, hash, resume check, decode, plan tiles, create the cube →
  the image's :class:`PreparedBatch` es, in plan order;
* :class:`Predictor` (an actor): weights loaded once, a batch → model → cores written to zarr → a
  :class:`BatchResult`;
* :func:`finish_image` (the driver, once every batch of the image is written): the completion marker.

Data errors of one input become a settled ``FAILED`` meta; programming errors propagate.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import logging
import os
import resource
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline import cubes, storage
from pipeline.config import JobSpec
from pipeline.errors import InputError
from pipeline.provenance import host_info, now_utc, software_versions
from pipeline.sources import ImageRef, Kind, Rejected, iter_targz, list_members, read_member
from pipeline.tiling import Tile, crop_core, extract_window, plan_tiles

__all__ = [
    "JobContext",
    "Status",
    "ImageTask",
    "ArchiveTask",
    "WorkItem",
    "ImageMeta",
    "PreparedBatch",
    "BatchResult",
    "BatchRecord",
    "settled",
    "expand_item",
    "prepare_image",
    "Predictor",
    "finish_image",
    "storage_options",
    "bound_heap",
    "release_free_memory",
    "peak_rss",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobContext:
    """What every task and actor of a job needs; small, picklable, free of secrets.

    ``weights`` is a :meth:`drcr_model.Weights.to_record` dict; storage secrets are resolved inside each
    worker from the environment (``spec.storage`` names the variables).
    """

    spec: JobSpec
    weights: Mapping[str, Any]
    fingerprint: str
    run_id: str

    @property
    def bands_nm(self) -> tuple[float, ...]:
        return tuple(self.weights["bands_nm"])


def storage_options(ctx: JobContext) -> dict[str, Any]:
    """The job's fsspec options, secrets read from this process's environment."""
    return storage.resolve_storage_options(ctx.spec.storage)


class Status(enum.StrEnum):
    """What became of one input. ``RUN``: prepared, its batches go to the predictors."""

    RUN = "run"
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageTask:
    """One image to prepare: its ref and, for a streamed ``.tar.gz`` member, its bytes (read already)."""

    ref: ImageRef
    data: bytes | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchiveTask:
    """An archive whose members become :class:`ImageTask` (tar, zip: listed; tar.gz: streamed once)."""

    url: str
    kind: Kind


WorkItem = ImageTask | ArchiveTask
"""What the job's work list holds (:func:`pipeline.execution.plan_work`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageMeta:
    """One input as prepared: ``status`` ``RUN`` (batches follow), or settled (``SKIPPED``/``FAILED``, with the
    reason). Archive-level outcomes (unreadable archive, no images) and rejected members are settled metas
    too, with the archive or member as ``ref`` and no group."""

    ref: ImageRef
    group: str = ""
    status: Status = Status.RUN
    error_type: str | None = None
    error: str | None = None
    sha256: str | None = None
    nbytes: int | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    scale: float = 1.0
    tiles: int = 0
    whole: bool = False
    decode_s: float = 0.0
    started: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedBatch:
    """``count`` batches of one image, this one the ``index``-th in plan order: its tiles and their raw
    windows (n × h × w × 3, uint8/uint16, as decoded). ``count == 0``: a settled meta, nothing to infer.
    Batches are cut per image in :func:`prepare_image`, so their composition (and every output byte) does
    not depend on how many workers run. ``peak_rss``: the prepare process's peak when this was made."""

    meta: ImageMeta
    index: int = 0
    count: int = 0
    tiles: tuple[Tile, ...] = ()
    windows: np.ndarray | None = None
    peak_rss: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchResult:
    """What :meth:`Predictor.run` reports for a batch whose cores are written: timings (``compute_start``/
    ``compute_end`` wall clock, s), output pixels, where it ran, the process's peak RSS (bytes)."""

    infer_s: float
    write_s: float
    infer_cpu_s: float
    compute_start: float
    compute_end: float
    pixels: int
    device: str
    host: str
    pid: int
    peak_rss: int
    node: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchRecord:
    """The small record one predictor call returns to the driver for one :class:`PreparedBatch`:
    ``result`` when its cores are written, ``error`` when it failed for good."""

    meta: ImageMeta
    index: int
    count: int
    result: BatchResult | None = None
    error: str | None = None
    prepare_peak_rss: int = 0


def settled(ref: ImageRef, status: Status, error_type: str, error: str, *, group: str = "") -> ImageMeta:
    """A meta with nothing left to do (skipped or failed), for ``ref``."""
    return ImageMeta(ref=ref, group=group, status=status, error_type=error_type, error=error)


def _provenance(ctx: JobContext, meta: ImageMeta, decoded: Any) -> dict[str, Any]:
    spec = ctx.spec
    w = ctx.weights
    return {
        "source": {
            "url": storage.redact(meta.ref.source),
            "archive": storage.redact(meta.ref.source) if meta.ref.member is not None else None,
            "member": meta.ref.member,
            "kind": meta.ref.kind,
            "sha256": meta.sha256,
            "bytes": meta.nbytes,
            "width": meta.width,
            "height": meta.height,
            "mode": meta.mode,
            "bit_depth": getattr(decoded, "bit_depth", None),
            "decode_notes": list(getattr(decoded, "notes", []) or []),
        },
        "model": {
            "name": "DRCR Net (Li et al., CVPR Workshops 2022)",
            "config": dict(w["config"]),
            "weights": {
                "name": w["name"],
                "location": storage.redact(w["url"]),
                "sha256": w["sha256"],
                "meta": dict(w.get("meta", {})),
            },
            "untrained": bool(w.get("meta", {}).get("untrained", False)),
        },
        "preprocessing": {
            "method": w["preprocessing"],
            "scale": meta.scale,
            "note": "RGB divided by the image's own maximum over all pixels and channels, as the authors do",
        },
        "inference": dataclasses.asdict(spec.inference),
        "tiling": dataclasses.asdict(spec.tiling) | {"tiles": meta.tiles, "whole_image": meta.whole},
        "output": dataclasses.asdict(spec.output_options) | {"bands_nm": list(ctx.bands_nm)},
        "batch_size": spec.ray.batch_size,
        "job": {"name": spec.name, "run_id": ctx.run_id, "fingerprint": ctx.fingerprint},
        "software": software_versions(),
        "storage": storage.safe_options_for_record(storage_options(ctx)),
        "started": meta.started,
        "prepared_on": host_info(),
    }


def expand_item(ctx: JobContext, item: WorkItem) -> Iterator[ImageTask | ImageMeta]:
    """The images of one work item, in archive order, and settled metas for what is not converted.

    A plain image passes through. A tar or zip is listed (headers / central directory only); a ``.tar.gz``
    is streamed once and each image member comes with its bytes. Rejected members become settled metas
    (``skipped`` for a file that simply is not an image, ``failed`` otherwise); an archive that cannot be
    read is one ``failed`` meta (after any members streamed before it broke off), one without images one
    ``skipped`` meta.
    """
    if isinstance(item, ImageTask):
        yield item
        return
    archive = ImageRef(source=item.url, member=None, kind=item.kind)
    rejected: list[Rejected] = []
    images = 0
    try:
        if item.kind == "targz":
            for ref, data in iter_targz(item.url, storage_options(ctx), on_rejected=rejected.append):
                yield from map(_rejected, _drain(rejected))
                images += 1
                yield ImageTask(ref=ref, data=data)
        else:
            refs, rejected = list_members(item.url, item.kind, storage_options(ctx))
            images = len(refs)
            yield from (ImageTask(ref=r) for r in refs)
    except InputError as exc:
        yield from map(_rejected, _drain(rejected))
        yield settled(archive, Status.FAILED, "ArchiveError", storage.describe_error(exc))
        return
    yield from map(_rejected, _drain(rejected))
    if images == 0:
        name = storage.redact(item.url)
        yield settled(archive, Status.SKIPPED, "NoImages", f"{name}: archive contains no images")


SKIP_REASONS = ("not an image extension",)
"""A rejected archive entry with one of these reasons is ``skipped`` (not an error); any other fails."""


def _drain(items: list[Rejected]) -> Iterator[Rejected]:
    while items:
        yield items.pop(0)


def _rejected(rej: Rejected) -> ImageMeta:
    status = Status.SKIPPED if rej.reason in SKIP_REASONS else Status.FAILED
    return settled(rej.ref, status, "RejectedMember", f"{storage.redact(rej.ref.name)}: {rej.reason}")


def prepare_image(ctx: JobContext, task: ImageTask) -> Iterator[PreparedBatch]:
    """The image's batches (``spec.ray.batch_size`` tiles each, in plan order), or one settled batch.

    Reads the bytes (unless the task carries them), hashes them, skips the image when its group is
    complete with the same source hash and job fingerprint, decodes, plans the tiles and creates the
    cube's metadata. Windows are the raw decoded pixels, cut from the decoder's buffer one batch at a time
    (no whole-image array is made, and a consumer that stops pulling stops the cutting); the predictor
    divides them by ``meta.scale`` (the whole image's maximum), so tiles see exactly the whole image's
    preprocessing.
    """
    try:
        meta, decoded, tiles = _prepare(ctx, task)
    except InputError as exc:
        group = cubes.group_path(task.ref.source, task.ref.member, task.ref.key)
        meta = settled(task.ref, Status.FAILED, type(exc).__name__, storage.describe_error(exc), group=group)
        yield PreparedBatch(meta=meta, peak_rss=peak_rss())
        return
    if decoded is None:
        yield PreparedBatch(meta=meta, peak_rss=peak_rss())
        return
    size = ctx.spec.ray.batch_size
    count = -(-len(tiles) // size)
    for index in range(count):
        chunk = tuple(tiles[index * size : (index + 1) * size])
        windows = np.stack([extract_window(decoded, tile) for tile in chunk])
        yield PreparedBatch(meta=meta, index=index, count=count, tiles=chunk, windows=windows, peak_rss=peak_rss())
        del windows
    del decoded


def _prepare(ctx: JobContext, task: ImageTask) -> tuple[ImageMeta, Any, list[Tile]]:
    """``(meta, decoded image, tiles)``; the decoded image is ``None`` when the image is skipped."""
    from pipeline.decode import decode_image

    t0 = time.perf_counter()
    ref = task.ref
    meta = ImageMeta(ref=ref, group=cubes.group_path(ref.source, ref.member, ref.key), started=now_utc())
    opts = storage_options(ctx)
    data = task.data if task.data is not None else read_member(ref, opts)
    meta = dataclasses.replace(meta, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))
    store = cubes.open_cubes(ctx.spec.output, opts)
    attrs = cubes.read_status(store, meta.group)
    record = (attrs or {}).get(cubes.ATTR, {})
    if (
        attrs
        and attrs.get("complete") is True
        and record.get("source", {}).get("sha256") == meta.sha256
        and record.get("job", {}).get("fingerprint") == ctx.fingerprint
    ):
        source = record["source"]
        why = "already complete with the same source sha256 and job fingerprint"
        done = dataclasses.replace(
            meta, status=Status.SKIPPED, error=why, width=source.get("width"), height=source.get("height")
        )
        return done, None, []
    decoded = decode_image(data, name=ref.name)
    del data
    peak = float(decoded.max())
    t = ctx.spec.tiling
    tiles = plan_tiles(
        decoded.height, decoded.width, max_tile_pixels=t.max_tile_pixels, tile_core=t.tile_core, halo=t.halo
    )
    meta = dataclasses.replace(
        meta,
        height=decoded.height,
        width=decoded.width,
        mode=decoded.mode,
        scale=peak if peak > 0 else 1.0,
        tiles=len(tiles),
        whole=len(tiles) == 1 and tiles[0].whole,
    )
    # A retried or lineage-reconstructed prepare task of this same run (its windows lost with a node)
    # must not recreate the group: that would delete regions the actors already wrote.
    same_run = (
        record.get("job", {}).get("run_id") == ctx.run_id and record.get("source", {}).get("sha256") == meta.sha256
    )
    if not same_run:
        cubes.create_cube(
            store,
            meta.group,
            height=decoded.height,
            width=decoded.width,
            bands_nm=ctx.bands_nm,
            spec=ctx.spec.output_options,
            provenance=_provenance(ctx, meta, decoded),
        )
    return dataclasses.replace(meta, decode_s=time.perf_counter() - t0), decoded, tiles


@functools.cache
def bound_heap() -> None:
    """Map every buffer of 1 MiB or more on its own and unmap it when freed (glibc ``M_MMAP_THRESHOLD``).

    By default glibc raises its mmap threshold each time a large mapped block is freed, so later batch-sized
    buffers (1–32 MiB: windows, outputs, encoded chunks) come from heaps that fragment and rarely shrink;
    with two batches in flight (``ray.overlap_writes``) an actor held ~60 MB more than the buffers in use
    (1.32× from a 1024² to an 8192² image, README "Performance"). A fixed threshold (which also turns the
    adjustment off) removes that. Used in actors whose model does not compute on the CPU (GPU, or the
    benchmark stand-in): CPU convolutions allocate such buffers by the hundred per forward pass, and mapping
    and zero-filling each anew made CPU inference 1.55× slower (CPU actors trim instead, see
    :func:`release_free_memory`). Not in tasks: Ray reuses their worker processes for other tasks, and the
    setting cannot be undone. Idempotent; a no-op off glibc.
    """
    mallopt = getattr(_libc(), "mallopt", None)  # musl has a no-op, macOS none
    if mallopt is not None:
        mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3 in glibc's malloc.h


TRIM_EVERY = 8
"""A CPU predictor gives its heaps' free pages back every this many batches (:func:`release_free_memory`)."""


def release_free_memory() -> None:
    """Give the heaps' free pages back to the OS (glibc ``malloc_trim(0)``); a no-op off glibc.

    CPU predictors, which keep glibc's dynamic mmap threshold (see :func:`bound_heap`), call it every
    ``TRIM_EVERY`` batches: their heaps otherwise creep up with the batches processed (tiny model, 1024² →
    4096² image: 1030 → 1415 MB). Not after every batch: the next batch faults the pages back in, which cost
    ~25 % of a tiny-model batch on this CPU."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> Any:
    """This process's C library (``None`` where it cannot be loaded)."""
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux ``ru_maxrss`` is in KiB; it never goes down)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _torch_threads(num_cpus: float) -> int:
    return max(1, int(num_cpus))


class Predictor:
    """Loads the weights once; turns batches of raw tile windows into cube regions written to zarr.

    Args:
        ctx: the job context.
        num_cpus: CPUs this predictor may use (torch threads are sized to it; 1-CPU Ray actors also get
            ``OMP_NUM_THREADS=1``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; defaults to the spec's.
    """

    def __init__(self, ctx: JobContext, *, num_cpus: float = 1, device: str | None = None) -> None:
        import torch

        from drcr_model import Weights
        from drcr_model.inference import select_device

        self.ctx = ctx
        torch.set_num_threads(_torch_threads(num_cpus))
        self.device = select_device(device or ctx.spec.inference.device)
        self._heap_bounded = self.bounds_heap()
        if self._heap_bounded:
            bound_heap()  # not for CPU compute: see bound_heap
        self._batches, self._count_lock = 0, threading.Lock()
        self._opts = storage_options(ctx)
        weights = Weights.from_record(ctx.weights)
        self.model = weights.load(device=self.device, storage_options=self._opts)
        if ctx.spec.inference.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.store = cubes.open_cubes(ctx.spec.output, self._opts)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        # Calls may run in two threads (``ray.overlap_writes``): one computes while the other writes its
        # cores; the lock keeps computes one at a time, so torch's threads are never oversubscribed.
        self._compute = threading.Lock()

    def bounds_heap(self) -> bool:
        """Whether this predictor fixes glibc's mmap threshold (:func:`bound_heap`): when its model does not
        compute on the CPU. A stand-in without compute (``benchmarks/stand_in.py``) returns True."""
        return bool(self.device.type != "cpu")

    def run(
        self, group: str, scale: float, tiles: Sequence[Tile], windows: Sequence[np.ndarray] | np.ndarray
    ) -> BatchResult:
        """Run one batch (tiles of one image, in plan order; windows h × w × 3 each) and write each core.

        Thread-safe: computes are serialised, the zarr writes of one call overlap the next call's compute.
        Returns only after this batch's writes finished.
        """
        with self._compute:
            start = time.time()  # wall clock, comparable across the processes of one host
            t0, c0 = time.perf_counter(), time.thread_time()
            outputs = self._compute_batch(scale, tiles, windows)
            t1, c1 = time.perf_counter(), time.thread_time()
        cubes.write_regions(
            self.store, group, [(tile.core_y0, tile.core_x0, core) for tile, core in zip(tiles, outputs)]
        )
        if not self._heap_bounded:
            with self._count_lock:
                self._batches += 1
                trim = self._batches % TRIM_EVERY == 0
            if trim:
                del outputs
                release_free_memory()  # outside the compute lock: overlaps the next batch's compute
        t2 = time.perf_counter()
        return BatchResult(
            infer_s=t1 - t0,
            write_s=t2 - t1,
            infer_cpu_s=c1 - c0,
            compute_start=start,
            compute_end=start + (t1 - t0),
            pixels=int(sum(t.core_h * t.core_w for t in tiles)),
            device=self.device_name,
            host=host_info()["hostname"],
            pid=os.getpid(),
            peak_rss=peak_rss(),
        )

    def _compute_batch(
        self, scale: float, tiles: Sequence[Tile], windows: Sequence[np.ndarray] | np.ndarray
    ) -> list[np.ndarray]:
        """Each tile's core of the model output, bands × core_h × core_w float32."""
        from drcr_model.inference import forward, reconstruct

        inf = self.ctx.spec.inference
        scale32 = np.float32(scale)
        if len(tiles) == 1 and tiles[0].whole:
            x = windows[0].astype(np.float32) / scale32
            cube = reconstruct(
                x,
                self.model,
                mode=inf.mode,  # type: ignore[arg-type]
                precision=inf.precision,
                channels_last=inf.channels_last,
                preprocessed=True,
            )
            outputs = [np.ascontiguousarray(cube.transpose(2, 0, 1))]
        else:
            batch = np.stack([w.astype(np.float32).transpose(2, 0, 1) / scale32 for w in windows])
            y = forward(self.model, batch, precision=inf.precision, channels_last=inf.channels_last)
            outputs = [crop_core(y[i], tile) for i, tile in enumerate(tiles)]
        return outputs


def finish_image(ctx: JobContext, meta: ImageMeta, results: Sequence[BatchResult]) -> None:
    """Write the completion marker, with the finish time, devices, workers and timings. Called once every
    batch of the image is written (:class:`pipeline.tracking.CompletionTracker`)."""
    store = cubes.open_cubes(ctx.spec.output, storage_options(ctx))
    extra = {
        "finished": now_utc(),
        "device": sorted({r.device for r in results}),
        "workers": sorted({f"{r.host}:{r.pid}" for r in results} | {f"node:{r.node}" for r in results if r.node}),
        "timings": {
            "decode_s": meta.decode_s,
            "infer_s": float(sum(r.infer_s for r in results)),
            "write_s": float(sum(r.write_s for r in results)),
        },
    }
    cubes.mark_complete(store, meta.group, extra)

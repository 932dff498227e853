"""Running a job on Ray, as one Ray Data streaming dataset: the one module that imports ray.

The run, stage by stage (rows are pickled typed records of :mod:`pipeline.tracking`)::

    plan      driver      inputs expanded; tar/zip listed in tasks;      ImageTask | TarGzTask, settled rows
                          the catalog Planner drops unchanged inputs
      → prepare  tasks      a .tar.gz streamed once; per image: read,    PreparedBatch (one per image batch)
                            hash, resume check, decode, tile, create
                            the cube, global statistics, batches
      → predict  actor pool weights once; model; cores → zarr           BatchRecord (small)
      → driver   iterates the records; CompletionTracker settles each image; finish_image (QA, marker) in
                 threads; then manifest, catalog, publish_run — all inside one JobRun (try/finally).

Ray Data streams the stages with backpressure (blocks of windows wait in the object store within its
budget; a prepare task whose output is not taken pauses), sizes the actor pool between ``ray.min_actors``
and ``ray.max_actors`` as work queues and the cluster grows, and shows per-stage progress and stats. Source
and window bytes never reach the driver; cubes never do. A batch whose actor dies is retried by Ray; the
predictor counts attempts per batch (:class:`_BatchAttempts`) and fails a batch that keeps killing its
worker (a "poison batch") for its image only.

Global statistics (``tiling.statistics = "global"``, the default) run on the inference actors, on their
device, and an image is the unit: prepare sends such an image as one small row (:class:`PreparedImage`:
its plan and, when it held them in memory, its encoded bytes; no window), and the actor that takes it
decodes the image again (:func:`pipeline.work.redecode`; past ``decode.stream_pixels`` by region, so its
memory stays bounded), runs the passes over windows cut per batch, then the image's batches, and returns a
record per batch. Why this shape: the passes must see every window of the image, several times in
sequence, before its first inference batch. Spreading them over the pool (as the hand-written executor
did) needs every window held somewhere until the passes end (memory that grows with the image) and a cycle
between stages that Ray Data has no operator for; gathering them in prepare runs the heaviest part of a
tiled image on a CPU, off the GPUs. One actor per image keeps the passes on the pool, needs no window in
the object store, and keeps every output byte independent of the number of actors: the passes and the
batches are cut in plan order, ``ray.batch_size`` tiles each, as before. The costs: the image is decoded
twice (prepare needs its maximum, its size and the cube; decoding is small next to ``n_blocks`` + 1
passes of the model), and one actor computes a whole image (a pool of several actors works on several
images at once); an actor lost mid-image redoes the whole image (writes are idempotent). ``tiling.
statistics = "tile"`` avoids the passes: its images travel as per-image batches of windows.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import pickle
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import ray
import ray.data

from pipeline import __version__, cubes, qa, storage
from pipeline.catalog import CatalogRow, merge, read_catalog, write_catalog
from pipeline.config import JobSpec
from pipeline.errors import ConfigError, InputError
from pipeline.incremental import Planner, RunFacts, catalog_updates, unchanged_row
from pipeline.lease import Lease, hold_lease
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.provenance import now_utc, software_versions
from pipeline.publish import publish_run
from pipeline.sources import ImageRef, Kind, Rejected, expand, iter_targz, list_members, normalize_url
from pipeline.statistics import needs_global
from pipeline.tiling import extract_window
from pipeline.tracking import BatchRecord, CompletionTracker, ImageDone, PreparedBatch, PreparedImage
from pipeline.work import (
    ImageMeta,
    JobContext,
    Predictor,
    finish_image,
    peak_rss,
    prepare_source,
    redecode,
    storage_options,
)

__all__ = [
    "RunSummary",
    "ImageTask",
    "TarGzTask",
    "WorkPlan",
    "PoolPlan",
    "JobRun",
    "run_job",
    "init_ray",
    "resolve_weights",
    "plan_pool",
    "new_run_id",
]

log = logging.getLogger(__name__)

FINISH_THREADS = 4
"""Threads that write completion markers beside the driver loop, so it never waits on storage (0: inline;
the benchmarks compare)."""

MAX_BATCH_ATTEMPTS = 4
"""Attempts of one batch (the first and 3 retries) before its image fails: a batch that keeps killing its
actor (a tile that OOMs its worker, say) must not stall the job; Ray Data retries actor calls without
bound, so the predictor counts them (:class:`_BatchAttempts`)."""

BLOCK_BYTES = 32 * 1024 * 1024
"""Ray Data's target block size for this job: a prepare task hands over its windows in blocks of about this
many bytes (then pauses when they are not taken), so what waits in a task or in the object store stays
bounded whatever the image size."""

SKIP_REASONS = ("not an image extension",)
"""A rejected archive entry with one of these reasons is ``skipped`` (not an error); any other fails."""


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


def init_ray(address: str = "", *, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray without the dashboard on loopback."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    # Ray's workers must find this package; a job submitted with a working_dir already has it.
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            _node_ip_address="127.0.0.1",
        )


def resolve_weights(spec: JobSpec) -> dict[str, Any]:
    """The weights record of a spec (its path, or the package default), with the file's sha256 checked."""
    from drcr_model import Weights
    from drcr_model.checkpoint import extract_state_dict, infer_config, read_checkpoint
    from drcr_model.weights import check_config_for_job, default_weights

    opts = storage.resolve_storage_options(spec.storage)
    if spec.weights.path:
        obj, digest = read_checkpoint(spec.weights.path, sha256=spec.weights.sha256 or None, storage_options=opts)
        config = infer_config(extract_state_dict(obj, source=spec.weights.path), source=spec.weights.path)
        check_config_for_job(config, spec.weights.path)  # 3 channels in, 31 bands out, or the job stops here
        name = os.path.basename(spec.weights.path.rstrip("/")) or "weights"
        w = Weights(name=name, url=spec.weights.path, sha256=digest, config=config, meta={"given_by": "job spec"})
    else:
        w = default_weights()
        _, digest = read_checkpoint(w.url or "", sha256=w.sha256)
    w.check_job()
    return w.to_record()


# --- Ray tasks ---------------------------------------------------------------------------------------------


@ray.remote(max_retries=3)
def _list_task(url: str, kind: str, ctx: JobContext) -> tuple[list[ImageRef], list[Rejected]] | Exception:
    try:
        return list_members(url, kind, storage_options(ctx), max_bytes=ctx.spec.decode.max_member_bytes)  # type: ignore[arg-type]
    except InputError as exc:
        return InputError(storage.describe_error(exc))


# --- planning (driver, before the dataset starts) ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageTask:
    """One image to prepare (a file, or a tar/zip member listed already)."""

    ref: ImageRef


@dataclasses.dataclass(frozen=True, kw_only=True)
class TarGzTask:
    """A ``.tar.gz`` archive, streamed once inside its prepare task (its members are found there)."""

    url: str


WorkItem = ImageTask | TarGzTask


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkPlan:
    """What a run will do, known before its dataset starts: ``work`` (what is to be read), ``rows`` (inputs
    decided already: unconverted files, rejected members, unreadable or empty archives, unchanged inputs),
    the image refs by key and the catalog the plan was made against."""

    work: tuple[WorkItem, ...]
    rows: dict[str, ManifestRow]
    refs: dict[str, ImageRef]
    planner: Planner
    previous: dict[str, CatalogRow]


def plan_work(ctx: JobContext, found: Sequence[tuple[str, Kind]], unconverted: Sequence[Rejected]) -> WorkPlan:
    """The run's work: tar and zip archives listed in parallel Ray tasks (headers / central directory
    only); ``.tar.gz`` archives left whole, to be streamed once; every input planned against the output's
    catalog (issue 12), so unchanged inputs are skipped without being read."""
    opts = storage_options(ctx)
    run_id = ctx.run_id
    rows: dict[str, ManifestRow] = {r.ref.key: _rejected_row(ctx, r) for r in unconverted}  # every file gets a row
    work: list[WorkItem] = []
    listings = []
    previous = read_catalog(ctx.spec.output, opts)
    planner = Planner(ctx.spec.output, previous, ctx.fingerprint, opts)
    listed: list[ImageRef] = []
    for url, kind in planner.inputs(found):
        if kind == "file":
            listed.append(planner.file_ref(url))
        elif kind == "targz":
            work.append(TarGzTask(url=url))
        else:
            listings.append((url, _list_task.remote(url, kind, ctx)))
    for url, ref in listings:
        listed_now = ray.get(ref)
        if isinstance(listed_now, Exception):
            rows[normalize_url(url)] = _archive_row(url, run_id, listed_now)
            continue
        images, rejected = listed_now
        listed.extend(images)
        if not images:
            rows[normalize_url(url)] = _archive_row(url, run_id, NO_IMAGES)
        for rej in rejected:
            rows[rej.ref.key] = _rejected_row(ctx, rej)
    work.extend(ImageTask(ref=r) for r in planner.refs(listed))
    for cat_row in planner.unchanged:
        rows[cat_row.input] = unchanged_row(cat_row, run_id)
    log.info("planned %d work items, %d inputs settled while planning", len(work), len(rows))
    return WorkPlan(work=tuple(work), rows=rows, refs={r.key: r for r in listed}, planner=planner, previous=previous)


NO_IMAGES = "no-images"
"""What an archive without images is recorded as (:func:`_archive_row`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolPlan:
    """The inference actor pool: between ``min_size`` and ``max_size`` actors of ``num_cpus`` CPUs and
    ``num_gpus`` GPUs each."""

    min_size: int
    max_size: int
    num_gpus: float
    num_cpus: float


GPU_POLL_S = 1.0


def plan_pool(spec: JobSpec, *, sleep: Callable[[float], None] = time.sleep) -> PoolPlan:
    """The actor pool for ``spec`` on the connected cluster, waiting for a GPU when one is asked for.

    ``num_gpus_per_actor = -1`` (auto): one GPU per actor if the cluster has a GPU now, else CPU actors; it
    never waits. A value > 0 on a cluster without a GPU asks the autoscaler for the pool's minimum
    (``ray.autoscaler.sdk.request_resources``) and waits up to ``ray.gpu_wait_s``; then fails (a job that
    asked for GPUs must not run on CPUs unnoticed).

    Raises:
        ConfigError: no GPU came in time, half precision without GPUs, or the pool's minimum plus one prepare
            task does not fit the cluster's CPUs.
    """
    r = spec.ray
    low, high = r.pool_size
    gpus = float(ray.cluster_resources().get("GPU", 0))
    num_gpus = r.num_gpus_per_actor if r.num_gpus_per_actor >= 0 else (1.0 if gpus > 0 else 0.0)
    if num_gpus > 0 and gpus < num_gpus:
        _wait_for_gpus(num_gpus, low, r.num_cpus_per_actor, r.gpu_wait_s, sleep)
    if spec.inference.precision != "fp32" and num_gpus == 0:
        raise ConfigError(
            f"inference.precision = {spec.inference.precision!r}: half precision needs GPU actors, and this cluster has none"
        )
    cpus = float(ray.cluster_resources().get("CPU", 0))
    need = low * r.num_cpus_per_actor + r.decode_num_cpus
    if cpus < need:
        # Actors hold their CPUs for the whole job; with none left for decode tasks the job would wait forever.
        raise ConfigError(
            f"ray.actors × ray.num_cpus_per_actor + ray.decode_num_cpus = {need:g} CPUs, but the cluster has {cpus:g}; "
            "lower ray.actors (or ray.min_actors) or ray.num_cpus_per_actor (fractions are allowed), or ray.decode_num_cpus"
        )
    return PoolPlan(min_size=low, max_size=high, num_gpus=num_gpus, num_cpus=r.num_cpus_per_actor)


def _wait_for_gpus(per_actor: float, actors: int, cpus: float, wait_s: float, sleep: Callable[[float], None]) -> None:
    from ray.autoscaler.sdk import request_resources

    log.info("waiting up to %.0f s for GPUs (ray.num_gpus_per_actor = %g)", wait_s, per_actor)
    request_resources(bundles=[{"GPU": per_actor, "CPU": cpus}] * actors)
    deadline = time.monotonic() + wait_s
    while float(ray.cluster_resources().get("GPU", 0)) < per_actor:
        if time.monotonic() >= deadline:
            request_resources(bundles=[])
            raise ConfigError(
                f"ray.num_gpus_per_actor = {per_actor:g}: the cluster has no GPU after waiting {wait_s:g} s "
                "(ray.gpu_wait_s); add GPU nodes, raise ray.gpu_wait_s, or set ray.num_gpus_per_actor = 0 for CPU actors"
            )
        sleep(min(GPU_POLL_S, max(0.0, deadline - time.monotonic())))


# --- the dataset -------------------------------------------------------------------------------------------


def _pack(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=5)


def _unpack(data: Any) -> Any:
    return pickle.loads(data)  # noqa: S301 - records this job's own workers made


def _prepare_rows(row: dict[str, Any], ctx: JobContext) -> Iterator[dict[str, Any]]:
    """A work item's prepared batches; a ``.tar.gz`` is streamed here, once, its members prepared in turn
    (their bytes never leave this task)."""
    item = _unpack(row["item"])
    batches = _image_batches(ctx, item.ref) if isinstance(item, ImageTask) else _targz_batches(ctx, item.url)
    for batch in batches:
        yield {"batch": _pack(batch)}


def _targz_batches(ctx: JobContext, url: str) -> Iterator[PreparedBatch | PreparedImage]:
    """Stream a .tar.gz once: each image member's batches, a row per rejected member, and the archive's own
    row if it holds no image or breaks off."""
    rejected: list[Rejected] = []
    images = 0

    def drain() -> Iterator[PreparedBatch]:
        while rejected:
            rej = rejected.pop(0)
            yield PreparedBatch(row=_rejected_row(ctx, rej), row_key=rej.ref.key, peak_rss=peak_rss())

    try:
        max_bytes = ctx.spec.decode.max_member_bytes
        for ref, data in iter_targz(url, storage_options(ctx), on_rejected=rejected.append, max_bytes=max_bytes):
            yield from drain()
            images += 1
            yield from _image_batches(ctx, ref, data)
            del data
        yield from drain()
        if images == 0:
            yield PreparedBatch(row=_archive_row(url, ctx.run_id, NO_IMAGES), row_key=normalize_url(url))
    except InputError as exc:
        yield from drain()
        problem = InputError(storage.describe_error(exc))
        yield PreparedBatch(row=_archive_row(url, ctx.run_id, problem), row_key=normalize_url(url))


def _image_batches(
    ctx: JobContext, ref: ImageRef, data: bytes | None = None
) -> Iterator[PreparedBatch | PreparedImage]:
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
        del decoded  # the actor decodes it again (see the module docstring)
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


class _BatchAttempts:
    """How many times each batch in flight has started on this node: a file per batch in this node's temp
    directory, one byte per start, removed when the batch returns. A file outlives the actor process that a
    poison batch kills, and Ray restarts the actor and retries the call on it.

    Files, not a counter actor: an actor costs a process of its own (0.8 CPU-s to start, during the job's
    start-up) and a blocking call per batch (2.7–3.9 ms wall and 0.9 ms of the predictor's CPU per batch,
    measured on the loaded 2-core box; these files: 0.27–0.34 ms and 0.08 ms), and every actor's calls
    would queue on the one counter. The price: starts are counted per node, so a batch whose actor is
    restarted on another node (its node was lost) starts there from 1; a batch is still failed after at
    most ``MAX_BATCH_ATTEMPTS`` starts on each node it is retried on. Images computed whole in one call
    (:meth:`_Predict._image`) also keep their progress here (one mechanism for both), per node likewise: a
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

    # The progress of an image computed in one call (_Predict._image), for a retry of that call: a pickle
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


def _step_key(image: str, step: str) -> str:
    """The attempt key of one step of an image's call: the same key as its batch row would have."""
    return image.removesuffix("#image") + "#" + step


class _Poisoned(Exception):
    """A step of an image's call that lost its actor more than ``MAX_BATCH_ATTEMPTS`` times."""


class _Predict:
    """Ray Data's class UDF over the actor pool: one :class:`Predictor` per actor (weights loaded once);
    each call takes one :class:`PreparedBatch` row, writes its cores and returns one :class:`BatchRecord`
    (or one :class:`PreparedImage` row and returns a record per batch, see :meth:`_image`)."""

    def __init__(self, ctx: JobContext, num_cpus: float, predictor: Callable[..., Predictor], attempts: Any) -> None:
        self.ctx = ctx
        self.predictor = predictor(ctx, num_cpus=num_cpus)
        # A PreparedImage's batches (see _image): as many in flight as the calls Ray Data runs at once.
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
            b = _unpack(packed)
            records.extend(self._image(b) if isinstance(b, PreparedImage) else [self._one(b)])
        return {"record": np.array([_pack(r) for r in records], dtype=object)}

    def _image(self, p: PreparedImage) -> list[BatchRecord]:
        """A :class:`PreparedImage`: decode it again, gather its statistics here (on this actor's device),
        then run its batches in plan order, two in flight with ``ray.overlap_writes`` (one computes while
        the other writes, as two calls would); one record per batch.

        Its progress (the gathered means, each written batch's result) is kept in the attempt counter
        (:class:`_BatchAttempts`), so a call retried after its actor died goes on where it stopped, and the
        statistics and each batch count their own attempts: the step that keeps killing its actor (a
        "poison batch") fails the image, as a batch row's does."""
        meta = p.meta
        tiles = list(meta.tiles)
        slim = dataclasses.replace(meta, tiles=[])
        size = self.ctx.spec.ray.batch_size
        base = BatchRecord(meta=slim, count=p.count, tiles_total=len(tiles), prepare_peak_rss=p.peak_rss)
        image = f"{meta.group}#image"
        # One round trip before anything else: a kill right after the call starts is counted.
        started: tuple[dict[Any, Any], str | None, int] = self._ask("start", image, p.count) or ({}, None, 0)
        kept: dict[Any, Any] = started[0]
        first: str | None = started[1]
        attempt: int = started[2]
        results: dict[int, dict[str, Any]] = {i: r for i, r in kept.items() if isinstance(i, int)}
        error: str | None = None
        in_flight: collections.deque[tuple[int, str, concurrent.futures.Future[dict[str, Any]]]] = collections.deque()

        def begin(step: str) -> None:
            nonlocal first, attempt
            if step != first:
                attempt = self._ask("begin", _step_key(image, step)) or 0
            first = None
            if attempt > MAX_BATCH_ATTEMPTS:
                what = "the statistics passes" if step == "statistics" else f"batch {step} of {p.count}"
                raise _Poisoned(f"{what} lost its actor {attempt - 1} times (each attempt killed the worker)")

        def settle(i: int, key: str, fut: concurrent.futures.Future[dict[str, Any]]) -> None:
            try:
                results[i] = fut.result()
            finally:
                self.slots.release()
            self._ask("keep", image, i, results[i])
            self._ask("end", key)

        statistics_s = float(kept.get("statistics_s", 0.0))
        try:
            decoded = redecode(self.ctx, meta, p.encoded) if len(results) < p.count else None
            means = kept.get("means")
            if means is None and decoded is not None:
                begin("statistics")
                t0 = time.perf_counter()
                means, passes = self.predictor.gather_means(meta.scale, decoded, tiles, size)
                statistics_s = time.perf_counter() - t0
                log.info("%s: statistics gathered in %d passes, %.2f s", meta.ref.name, passes, statistics_s)
                self._ask("keep", image, "means", means)
                self._ask("keep", image, "statistics_s", statistics_s)
                self._ask("end", _step_key(image, "statistics"))
            for index in range(p.count):
                if index in results:
                    continue
                while len(in_flight) >= self.calls:
                    settle(*in_flight.popleft())
                while in_flight and not self.slots.acquire(blocking=False):
                    settle(*in_flight.popleft())  # another call holds the other slot: finish ours first
                if not in_flight:
                    self.slots.acquire()
                try:
                    begin(str(index))
                except BaseException:
                    self.slots.release()
                    raise
                chunk = tiles[index * size : (index + 1) * size]
                assert decoded is not None  # a batch still to run
                windows = [extract_window(decoded, t) for t in chunk]
                fut = self.writer.submit(self.predictor.run, meta.group, meta.scale, chunk, windows, means)
                in_flight.append((index, _step_key(image, str(index)), fut))
                del windows
            while in_flight:
                settle(*in_flight.popleft())
            del decoded
            results[0] = results[0] | {"statistics_s": statistics_s}
        except Exception as exc:  # decode, passes, model or writes: this image fails, the job goes on
            error = str(exc) if isinstance(exc, _Poisoned) else storage.describe_error(exc)
            log.warning("%s: failed on the actor: %s", meta.ref.name, error)
            for _, _, fut in in_flight:
                fut.exception()  # let the batches still writing end before the image is settled
                self.slots.release()
        self._ask("forget", image, p.count)
        if error is not None:
            return [dataclasses.replace(base, index=i, error=error) for i in range(p.count)]
        return [dataclasses.replace(base, index=i, result=results[i] | {"node": self.node}) for i in range(p.count)]

    def _ask(self, method: str, *args: Any) -> Any:
        """Call the attempt counter; ``None`` when it is unusable (as in :meth:`_one`)."""
        try:
            return getattr(self.attempts, method)(*args)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            log.warning("%s: attempt counter unavailable (%s); going on", args[0], exc)
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
        key = f"{b.meta.group}#{b.index}"
        try:
            attempt = self.attempts.begin(key)
        except OSError as exc:
            # The node's temp directory is unwritable or full: count this attempt as unknown rather than let
            # the error escape the UDF, which would stop the whole dataset.
            log.warning("%s: attempt counter unavailable (%s); running the batch", b.meta.ref.name, exc)
            attempt = 0
        if attempt > 1:
            log.warning(
                "%s: batch %d of %d starts again (start %d): its actor was lost",
                b.meta.ref.name,
                b.index,
                b.count,
                attempt,
            )
        if attempt > MAX_BATCH_ATTEMPTS:
            self.attempts.end(key)
            why = f"batch {b.index} of {b.count} lost its actor {attempt - 1} times (each attempt killed the worker)"
            return dataclasses.replace(base, error=why)
        try:
            result = self.predictor.run(b.meta.group, b.meta.scale, list(b.tiles), list(b.windows))
        except Exception as exc:  # the model or the write failed for this batch: its image fails, the job goes on
            log.warning("%s: batch %d failed: %s", b.meta.ref.name, b.index, storage.describe_error(exc))
            return dataclasses.replace(base, error=storage.describe_error(exc))
        finally:
            self.attempts.end(key)
        return dataclasses.replace(base, result=result | {"node": self.node})


def build_dataset(
    ctx: JobContext, work: Sequence[WorkItem], pool: PoolPlan, predictor: Callable[..., Predictor], attempts: Any
) -> ray.data.Dataset:
    """The job's dataset: work items → prepare → predict; its rows are packed :class:`BatchRecord` s."""
    r = ctx.spec.ray
    # One work item per block: one image (or .tar.gz) per prepare task, so images decode in parallel.
    ds: ray.data.Dataset = ray.data.from_items([{"item": _pack(w)} for w in work], override_num_blocks=len(work))
    # At most max_images_in_flight images are decoded at once (their decoded pixels are what prepare holds).
    # Their batches leave in blocks of about BLOCK_BYTES, which Ray Data's backpressure holds back.
    # (Never more than there are items: Ray Data warns about a cap it cannot reach.)
    prepare = ray.data.TaskPoolStrategy(size=max(1, min(r.max_images_in_flight, len(work))))
    ds = ds.flat_map(_prepare_rows, fn_args=(ctx,), num_cpus=r.decode_num_cpus, compute=prepare)  # type: ignore[arg-type]
    # overlap_writes: two calls per actor, the UDF running in both (Predictor serialises compute with a
    # lock): one call writes its cores to zarr while the next computes.
    calls = 2 if r.overlap_writes else 1
    actors = ray.data.ActorPoolStrategy(
        min_size=pool.min_size,
        max_size=pool.max_size,
        max_tasks_in_flight_per_actor=_tasks_in_flight(r.max_batches_per_actor, calls, pool),
        max_concurrent_calls_per_actor=calls,
        enable_true_multi_threading=r.overlap_writes,
    )
    return ds.map_batches(
        _Predict,
        fn_constructor_args=(ctx, pool.num_cpus, predictor, attempts),
        # One PreparedBatch row per call: batches were cut per image in prepare, so what a call computes does
        # not depend on how rows fall into blocks.
        batch_size=1,
        batch_format="numpy",
        compute=actors,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )


def _tasks_in_flight(per_actor: int, calls: int, pool: PoolPlan) -> int:
    """Tasks Ray Data may queue on one actor: ``ray.max_batches_per_actor`` (at least the concurrent calls);
    an elastic pool queues more (see :data:`UPSCALE_QUEUE`)."""
    n = max(calls, per_actor)
    return max(n, UPSCALE_QUEUE * calls) if pool.max_size > pool.min_size else n


UPSCALE_QUEUE = 2
"""An elastic pool queues this many calls per concurrency slot: Ray Data grows a pool only while tasks in
flight exceed ``actor_pool_util_upscaling_threshold`` (1.75 in Ray 2.60) × its slots, which a queue of one
per slot never reaches."""


def _configure_data_context() -> None:
    data = ray.data.DataContext.get_current()
    data.target_max_block_size = BLOCK_BYTES
    data.execution_options.preserve_order = False  # records may come in any order; the tracker counts them


# --- the run -----------------------------------------------------------------------------------------------


class JobRun:
    """One run's lifecycle, in the manner of Ray Data's ``Datasink`` hooks; use as a context manager.

    ``on_start`` (on enter): root attributes ``status = running``. :meth:`on_planned`: the settled rows.
    :meth:`on_record`: each batch record → :class:`CompletionTracker`; a settled image → :meth:`on_image`
    (its QA reduced and its marker written by :func:`pipeline.work.finish_image`, in threads).
    :meth:`on_complete`: the manifest, the catalog, root ``finished`` with the summary, then
    :func:`pipeline.publish.publish_run`. ``on_failed`` (an exception escaped): root ``failed`` with the
    error. The marker threads are joined either way.
    """

    def __init__(
        self, ctx: JobContext, opts: dict[str, Any], progress: Callable[[str, int], None] | None, lease: Lease
    ) -> None:
        self.ctx, self.opts, self.progress, self.lease = ctx, opts, progress, lease
        self.t0 = time.perf_counter()
        self.tracker = CompletionTracker()
        self.rows: dict[str, ManifestRow] = {}
        self.results: list[dict[str, Any]] = []
        self.nodes: set[str] = set()
        self.megapixels = 0.0
        self.peaks = {"prepare": 0, "actor": 0}
        self.finisher = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, FINISH_THREADS), thread_name_prefix="finish"
        )
        self.finishing: list[tuple[concurrent.futures.Future[dict[str, Any]], ImageDone, ManifestRow]] = []
        self.root: Any = None
        self.pool: PoolPlan | None = None
        self.plan: WorkPlan | None = None
        self.attempts: _BatchAttempts | None = None
        self.seen: set[str] = set()
        self.planned: set[str] = set()
        self.refs: dict[str, ImageRef] = {}
        self.prepared = 0
        self.finished = False

    # hooks --------------------------------------------------------------------------------------------
    def on_start(self) -> None:
        store = cubes.open_cubes(self.ctx.spec.output, self.opts)
        self.root = cubes.zarr.open_group(store, mode="a")
        self.root.attrs.update(
            {
                "drcr_pipeline_job": storage.redact(self.ctx.spec.to_dict()),
                "drcr_pipeline_run": self._run_attrs("running", started=now_utc()),
            }
        )
        log.info("run %s started: output %s", self.ctx.run_id, storage.redact(self.ctx.spec.output))

    def on_planned(self, plan: WorkPlan) -> None:
        """The work list is known: its images and settled rows count towards the progress total now (a
        .tar.gz's members as they are found); settled rows are recorded."""
        self.plan = plan
        self.planned = {w.ref.key for w in plan.work if isinstance(w, ImageTask)}
        self.refs = dict(plan.refs)
        self._progress("total", len(self.planned) + len(plan.rows))
        for key, row in plan.rows.items():
            self._final(key, row)
        self.attempts = _BatchAttempts(self.ctx.run_id)

    def on_record(self, record: BatchRecord) -> None:
        if record.key not in self.seen:
            self.seen.add(record.key)
            self.prepared += record.meta is not None
            if record.key not in self.planned:  # found inside a .tar.gz
                self._progress("total", 1)
        done = self.tracker.add(record)
        if done is not None:
            self.on_image(done)
        self._settle(block=False)

    def on_image(self, done: ImageDone) -> None:
        """A settled input: its row, final at once or once its marker is written (in a thread)."""
        self.peaks["prepare"] = max(self.peaks["prepare"], done.prepare_peak_rss)
        self.peaks["actor"] = max([self.peaks["actor"], *(int(r.get("peak_rss", 0)) for r in done.results)])
        self.results.extend(done.results)
        if done.row is not None:
            self._final(done.row_key, done.row)
            return
        assert done.meta is not None
        self.refs.setdefault(done.meta.ref.key, done.meta.ref)
        row = _manifest_row(self.ctx, done)
        if done.needs_marker:
            log.info("%s: %d batches written; marking complete", done.meta.ref.name, len(done.results))
            fut = self._finish(done)
            self.finishing.append((fut, done, row))
            return
        if row.status != "skipped":
            log.info("%s: %s (%s)", done.meta.ref.name, row.status, row.error)
        self._final(done.meta.ref.key, row)

    def on_complete(self, started: float) -> RunSummary:
        """Every record is in: images still missing batches, and planned images never heard of, fail (no
        input leaves the run unaccounted); then the manifest, catalog, root attributes and publication."""
        plan = self.plan
        assert plan is not None
        lost = [
            ImageDone(meta=ImageMeta(ref=w.ref, group="", status="failed", error_type="LostInput", error=f"{storage.redact(w.ref.name)}: no record came back"))
            for w in plan.work
            if isinstance(w, ImageTask) and not self.tracker.is_settled(w.ref.key) and w.ref.key not in self.rows
        ]  # fmt: skip
        lost += [
            ImageDone(
                row=_archive_row(w.url, self.ctx.run_id, InputError("no record of the archive came back")),
                row_key=normalize_url(w.url),
            )
            for w in plan.work
            if isinstance(w, TarGzTask) and not self._targz_heard_of(w.url)
        ]
        for done in [*self.tracker.close(), *lost]:
            log.error("%s", done.error or (done.meta.error if done.meta else done.row.error if done.row else ""))
            self.on_image(done)
        self._settle(block=True)
        summary = RunSummary(
            run_id=self.ctx.run_id,
            elapsed_s=time.perf_counter() - started,
            megapixels=self.megapixels,
            nodes=sorted(self.nodes),
            peak_rss={"driver": peak_rss(), **self.peaks},
            compute=compute_stats(self.results),
            pool=dataclasses.asdict(self.pool) if self.pool else {},
            actors=len({(r.get("host"), r.get("pid")) for r in self.results}),
            prepared=self.prepared,
            unchanged=len(plan.planner.unchanged),
        )
        for row in self.rows.values():
            setattr(summary, row.status, getattr(summary, row.status) + 1)
        self.lease.check()  # a run that lost the output to another must not overwrite its manifest and catalog
        summary.manifest = write_manifest(self.ctx.spec.output, list(self.rows.values()), self.ctx.run_id, self.opts)
        facts = RunFacts(
            output=self.ctx.spec.output,
            run_id=self.ctx.run_id,
            fingerprint=self.ctx.fingerprint,
            weights_sha256=str(self.ctx.weights["sha256"]),
            package_version=__version__,
            bands=len(self.ctx.bands_nm),
            output_spec=self.ctx.spec.output_options,
            tiling=self.ctx.spec.tiling,
            when=datetime.datetime.now(datetime.UTC),
        )
        updates = catalog_updates(
            facts, plan.previous, self.rows.values(), self.refs, plan.planner.unchanged, plan.planner.versions
        )
        summary.catalog = write_catalog(self.ctx.spec.output, merge(plan.previous, updates), self.opts)
        self.root.attrs.update(
            {"drcr_pipeline_run": self._run_attrs("finished", finished=now_utc(), summary=summary.to_dict())}
        )
        summary.published = publish_run(self.ctx.spec.output, self.opts)  # consolidated metadata, STAC, report
        log.info(
            "run %s finished: %d ok, %d failed, %d skipped",
            self.ctx.run_id,
            summary.ok,
            summary.failed,
            summary.skipped,
        )
        self.finished = True
        return summary

    def on_failed(self, exc: BaseException) -> None:
        if self.root is not None:
            error = f"{type(exc).__name__}: {storage.describe_error(exc)}"
            self.root.attrs.update({"drcr_pipeline_run": self._run_attrs("failed", finished=now_utc(), error=error)})
        log.error("run %s failed: %s", self.ctx.run_id, storage.describe_error(exc))

    # plumbing -----------------------------------------------------------------------------------------
    def __enter__(self) -> JobRun:
        self.on_start()
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc is not None and not self.finished:
                self.on_failed(exc)
        finally:
            self.finisher.shutdown(wait=True)

    def _finish(self, done: ImageDone) -> concurrent.futures.Future[dict[str, Any]]:
        """:func:`finish_image` in a marker thread, or here when ``FINISH_THREADS`` is 0 (benchmarks compare)."""
        meta = done.meta
        assert meta is not None
        if FINISH_THREADS > 0:
            return self.finisher.submit(finish_image, self.ctx, meta, list(done.results))
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        try:
            fut.set_result(finish_image(self.ctx, meta, list(done.results)))
        except Exception as exc:  # settled like a thread's failure: the row fails, the run goes on
            fut.set_exception(exc)
        return fut

    def _targz_heard_of(self, url: str) -> bool:
        """Whether any record of a .tar.gz came back (its members' or its own)."""
        url = normalize_url(url)
        return any(k == url or k.startswith(url + "!") for k in self.seen)

    def _run_attrs(self, status: str, **extra: Any) -> dict[str, Any]:
        return {"run_id": self.ctx.run_id, "software": software_versions(), "status": status, **extra}

    def _settle(self, block: bool) -> None:
        for item in list(self.finishing):
            fut, done, row = item
            if not block and not fut.done():
                continue
            self.finishing.remove(item)
            assert done.meta is not None
            try:
                for name, value in (fut.result() or {}).items():  # the qa_* columns (pipeline.qa)
                    setattr(row, name, value)
                row.status = "ok"
                self.megapixels += (done.meta.width or 0) * (done.meta.height or 0) / 1e6
                self.nodes.update(r["node"] for r in done.results if r.get("node"))
            except Exception as exc:  # QA failed, or storage failure at the marker: the cube is not complete
                row.status, row.error_type, row.error = "failed", type(exc).__name__, storage.describe_error(exc)
                for name, value in qa.manifest_columns(getattr(exc, "qa", {})).items():
                    setattr(row, name, value)
            self._final(done.meta.ref.key, row)

    def _final(self, key: str, row: ManifestRow) -> None:
        self.rows[key] = row
        self._progress("done", 1)

    def _progress(self, event: str, n: int) -> None:
        if self.progress is not None and n:
            self.progress(event, n)


def _row(ctx: JobContext, ref: ImageRef, **kw: Any) -> ManifestRow:
    return ManifestRow(
        input=storage.redact(ref.key), source=storage.redact(ref.source), member=ref.member, run_id=ctx.run_id, **kw
    )


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _manifest_row(ctx: JobContext, done: ImageDone) -> ManifestRow:
    """The manifest row of a settled image (``ok`` rows become final once their marker is written)."""
    meta = done.meta
    assert meta is not None
    row = _row(
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


def _records(ds: ray.data.Dataset) -> Iterator[BatchRecord]:
    for row in ds.iter_rows():
        yield _unpack(row["record"])


def run_job(
    spec: JobSpec,
    *,
    progress: Callable[[str, int], None] | None = None,
    lease: Lease | None = None,
    wait_s: float = 0.0,
    predictor: Callable[..., Predictor] = Predictor,
) -> RunSummary:
    """Run ``spec`` on the Ray cluster this process is connected to (``init_ray`` first).

    Args:
        spec: the job.
        progress: called with ("total", n) as inputs become known and ("done", 1) per settled input.
        lease: the output's lease (:mod:`pipeline.lease`) if the caller took it; else it is taken here,
            waiting up to ``wait_s`` for another run to finish (``LeaseHeldError`` after that).
        predictor: makes each actor's predictor, called as ``predictor(ctx, num_cpus=...)``: a
            :class:`~pipeline.work.Predictor` subclass or a partial of one (the benchmarks' stand-in).

    Returns the run summary; the manifest, catalog and root attributes are written before returning.
    Raises what stops the whole job (bad spec, unreadable weights, no GPU in time, a lost lease), after
    marking the run ``failed`` if it had started.
    """
    if lease is None:
        opts = storage.resolve_storage_options(spec.storage)
        with hold_lease(spec.output, new_run_id(), opts, wait_s=wait_s) as held:
            return _run_job(spec, progress, held, predictor)
    return _run_job(spec, progress, lease, predictor)


def _run_job(
    spec: JobSpec, progress: Callable[[str, int], None] | None, lease: Lease, predictor: Callable[..., Predictor]
) -> RunSummary:
    started = time.perf_counter()
    weights = resolve_weights(spec)
    spec = spec.with_halo_for(weights["config"])  # before the fingerprint: it holds the halo the cubes used
    ctx = JobContext(spec=spec, weights=weights, fingerprint=spec.fingerprint(weights["sha256"]), run_id=lease.run_id)
    opts = storage_options(ctx)
    pool = plan_pool(spec)
    # Expanded before anything is written: a mistyped input leaves the output (and its last summary) as it was.
    found, unconverted = expand(list(spec.inputs), opts)
    with JobRun(ctx, opts, progress, lease) as run:
        run.pool = pool
        plan = plan_work(ctx, found, unconverted)
        run.on_planned(plan)
        if plan.work:  # nothing new or changed: no dataset, no actor starts
            _configure_data_context()
            ds = build_dataset(ctx, plan.work, pool, predictor, run.attempts)
            log.info(
                "pool: %d..%d actors, %g GPU and %g CPU each",
                pool.min_size,
                pool.max_size,
                pool.num_gpus,
                pool.num_cpus,
            )
            for record in _records(ds):
                run.on_record(record)
                if lease.lost:  # another run took the output over: take nothing more (on_complete raises)
                    log.error("run %s: lease lost; stopping", ctx.run_id)
                    break
            log.info("Ray Data stats:\n%s", ds.stats())
        return run.on_complete(started)


def _archive_row(url: str, run_id: str, problem: Exception | str) -> ManifestRow:
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


def _rejected_row(ctx: JobContext, rej: Rejected) -> ManifestRow:
    status = "skipped" if rej.reason in SKIP_REASONS else "failed"
    return _row(
        ctx, rej.ref, status=status, error_type="RejectedMember", error=f"{storage.redact(rej.ref.name)}: {rej.reason}"
    )

"""Running a job on Ray, as one Ray Data streaming dataset: the one module that imports ray.

The dataset, stage by stage (every row is one pickled typed record from :mod:`pipeline.work`)::

    plan_work  driver      input URLs expanded; tar/zip listed in tasks  WorkPlan (ImageTask | .tar.gz, settled)
      → prepare  tasks      a .tar.gz streamed once; per image: read,    PreparedBatch (one per image batch)
                            hash, resume check, decode, tile, create
                            the cube, cut per-image batches
      → predict  actor pool weights once; model; cores → zarr           BatchRecord (small)
      → driver   iterates the records; CompletionTracker settles each image; finish_image (in threads)
                 writes its marker; then the manifest — all inside one JobRun (try/finally).

Ray Data streams the stages with backpressure (blocks of windows wait in the object store within its
budget; a prepare task whose output is not taken pauses), sizes the actor pool between ``ray.min_actors``
and ``ray.max_actors`` as work queues and the cluster grows, and shows per-stage progress and stats. Source
and window bytes never reach the driver; cubes never do. A batch whose actor dies is retried by Ray; the
predictor counts attempts per batch (:class:`_BatchAttempts`) and fails a batch that keeps killing its
worker (a "poison batch") for its image only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pickle
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import cubes, storage
from pipeline.config import JobSpec
from pipeline.errors import ConfigError
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.provenance import now_utc, software_versions
from pipeline.sources import ImageRef, expand_inputs
from pipeline.tracking import CompletionTracker, ImageDone, compute_stats
from pipeline.work import (
    ArchiveTask,
    BatchRecord,
    ImageMeta,
    ImageTask,
    JobContext,
    Predictor,
    PreparedBatch,
    Status,
    WorkItem,
    expand_item,
    finish_image,
    peak_rss,
    prepare_image,
    settled,
    storage_options,
)

__all__ = [
    "RunSummary",
    "WorkPlan",
    "PoolPlan",
    "JobRun",
    "run_job",
    "init_ray",
    "resolve_weights",
    "plan_work",
    "plan_pool",
]

log = logging.getLogger(__name__)

FINISH_THREADS = 4
"""Threads that write completion markers beside the driver loop, so it never waits on storage."""

MAX_BATCH_ATTEMPTS = 4
"""Attempts of one batch (the first and 3 retries) before its image fails: a batch that keeps killing its
actor (a tile that OOMs its worker, say) must not stall the job; Ray's own retries of actor calls are
unbounded in Ray Data, so the predictor counts them (:class:`_BatchAttempts`)."""

BLOCK_BYTES = 32 * 1024 * 1024
"""Ray Data's target block size for this job: a prepare task hands over its windows in blocks of about this
many bytes (then pauses when they are not taken), so what waits in a task or in the object store stays
bounded whatever the image size."""


@dataclasses.dataclass(kw_only=True)
class RunSummary:
    run_id: str
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    megapixels: float = 0.0
    elapsed_s: float = 0.0
    manifest: str = ""
    nodes: list[str] = dataclasses.field(default_factory=list)
    peak_rss: dict[str, int] = dataclasses.field(default_factory=dict)
    """Peak resident memory in bytes by process kind: ``driver``, ``prepare`` (largest over prepare tasks)
    and ``actor`` (largest over inference actors, which also write the cubes)."""
    compute: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Model compute of the inference actors: :func:`pipeline.tracking.compute_stats`."""
    pool: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The actor pool asked for: ``min``, ``max``, ``num_gpus``, ``num_cpus`` per actor."""

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"megapixels_per_s": self.megapixels_per_s}


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
    from drcr_model.weights import default_weights

    opts = storage.resolve_storage_options(spec.storage)
    if spec.weights.path:
        obj, digest = read_checkpoint(spec.weights.path, sha256=spec.weights.sha256 or None, storage_options=opts)
        config = infer_config(extract_state_dict(obj, source=spec.weights.path), source=spec.weights.path)
        name = os.path.basename(spec.weights.path.rstrip("/")) or "weights"
        w = Weights(name=name, url=spec.weights.path, sha256=digest, config=config, meta={"given_by": "job spec"})
    else:
        w = default_weights()
        _, digest = read_checkpoint(w.url or "", sha256=w.sha256)
    return w.to_record()


# --- planning (driver, before the dataset starts) ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkPlan:
    """What a run will do, known before its dataset starts: ``work`` (plain images, tar/zip members, and
    ``.tar.gz`` archives, whose members are found while streaming them) and ``settled`` (inputs decided
    already: rejected members, unreadable or empty archives)."""

    work: tuple[WorkItem, ...]
    settled: tuple[ImageMeta, ...] = ()


# One CPU each (as every task): 0-CPU tasks would all start at once, a worker process per archive.
@ray.remote(max_retries=3)
def _list_archive(ctx: JobContext, item: ArchiveTask) -> list[ImageTask | ImageMeta]:
    return list(expand_item(ctx, item))


def plan_work(ctx: JobContext) -> WorkPlan:
    """The run's work: the input URLs expanded (globs, prefixes); tar and zip archives listed in parallel
    Ray tasks (headers / central directory only); ``.tar.gz`` archives left whole, to be streamed once.

    The place to drop or reorder work before anything is read (a catalog that knows what is done, a lease):
    every item left in ``work`` is prepared and accounted for in the manifest."""
    opts = storage_options(ctx)
    work: list[WorkItem] = []
    listings = []
    for url, kind in expand_inputs(list(ctx.spec.inputs), opts):
        if kind == "file":
            work.append(ImageTask(ref=ImageRef(source=url, member=None, kind="file")))
        elif kind == "targz":
            work.append(ArchiveTask(url=url, kind=kind))
        else:
            listings.append(_list_archive.remote(ctx, ArchiveTask(url=url, kind=kind)))
    done: list[ImageMeta] = []
    for listed in ray.get(listings):
        work.extend(x for x in listed if isinstance(x, ImageTask))
        done.extend(x for x in listed if isinstance(x, ImageMeta))
    log.info("planned %d work items, %d inputs settled while listing", len(work), len(done))
    return WorkPlan(work=tuple(work), settled=tuple(done))


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
        gpus = _wait_for_gpus(num_gpus, low, r.num_cpus_per_actor, r.gpu_wait_s, sleep)
    if spec.inference.precision != "fp32" and num_gpus == 0:
        raise ConfigError(
            f"inference.precision = {spec.inference.precision!r}: half precision needs GPU actors, and this cluster has none"
        )
    cpus = float(ray.cluster_resources().get("CPU", 0))
    need = low * r.num_cpus_per_actor + r.decode_num_cpus
    if cpus < need:
        # Actors hold their CPUs for the whole job; with none left for decode tasks the job would wait forever.
        raise ConfigError(
            f"ray.actors (or ray.min_actors) × ray.num_cpus_per_actor + ray.decode_num_cpus = {need:g} CPUs, but "
            f"the cluster has {cpus:g}; lower ray.actors or ray.num_cpus_per_actor (fractions are allowed), "
            "or ray.decode_num_cpus"
        )
    return PoolPlan(min_size=low, max_size=high, num_gpus=num_gpus, num_cpus=r.num_cpus_per_actor)


def _wait_for_gpus(per_actor: float, actors: int, cpus: float, wait_s: float, sleep: Callable[[float], None]) -> float:
    from ray.autoscaler.sdk import request_resources

    log.info("waiting up to %.0f s for GPUs (ray.num_gpus_per_actor = %g)", wait_s, per_actor)
    request_resources(bundles=[{"GPU": per_actor, "CPU": cpus}] * actors)
    deadline = time.monotonic() + wait_s
    while True:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus >= per_actor:
            return gpus
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
    for item in expand_item(ctx, _unpack(row["item"])):
        if isinstance(item, ImageMeta):  # a rejected member, or the archive's own outcome
            yield {"batch": _pack(PreparedBatch(meta=item))}
            continue
        for batch in prepare_image(ctx, item):
            yield {"batch": _pack(batch)}


@ray.remote(num_cpus=0, max_restarts=-1)
class _BatchAttempts:
    """How many times each batch in flight has started; forgets a batch once it returns."""

    def __init__(self) -> None:
        self._started: dict[str, int] = {}

    def begin(self, key: str) -> int:
        self._started[key] = self._started.get(key, 0) + 1
        return self._started[key]

    def end(self, key: str) -> None:
        self._started.pop(key, None)


class _Predict:
    """Ray Data's class UDF over the actor pool: one :class:`Predictor` per actor (weights loaded once);
    each call takes one :class:`PreparedBatch` row, writes its cores and returns one :class:`BatchRecord`."""

    def __init__(self, ctx: JobContext, num_cpus: float, predictor: Callable[..., Predictor], attempts: Any) -> None:
        self.predictor = predictor(ctx, num_cpus=num_cpus)
        self.attempts = attempts
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [self._one(_unpack(b)) for b in rows["batch"]]
        return {"record": np.array([_pack(r) for r in records], dtype=object)}

    def _one(self, b: PreparedBatch) -> BatchRecord:
        if b.count == 0:
            return BatchRecord(meta=b.meta, index=0, count=0, prepare_peak_rss=b.peak_rss)
        key = f"{b.meta.group}#{b.index}"
        try:
            attempt = ray.get(self.attempts.begin.remote(key))
        except ray.exceptions.RayError as exc:
            # The counter is out of reach (seen when this actor's node was dying): count this attempt as
            # unknown rather than let the error escape the UDF, which would stop the whole dataset.
            log.warning("%s: attempt counter unavailable (%s); running the batch", b.meta.ref.name, exc)
            attempt = 0
        base = BatchRecord(meta=b.meta, index=b.index, count=b.count, prepare_peak_rss=b.peak_rss)
        if attempt > MAX_BATCH_ATTEMPTS:
            why = f"batch {b.index} of {b.count} lost its actor {attempt - 1} times (each attempt killed the worker)"
            return dataclasses.replace(base, error=why)
        assert b.windows is not None
        try:
            result = self.predictor.run(b.meta.group, b.meta.scale, b.tiles, b.windows)
        except Exception as exc:  # the model or the write failed for this batch: its image fails, the job goes on
            log.warning("%s: batch %d failed: %s", b.meta.ref.name, b.index, storage.describe_error(exc))
            return dataclasses.replace(base, error=storage.describe_error(exc))
        finally:
            self.attempts.end.remote(key)
        return dataclasses.replace(base, result=dataclasses.replace(result, node=self.node))


def build_dataset(
    ctx: JobContext, work: Sequence[WorkItem], pool: PoolPlan, predictor: Callable[..., Predictor], attempts: Any
) -> ray.data.Dataset:
    """The job's dataset: work items → prepare → predict; its rows are packed :class:`BatchRecord` s."""
    r = ctx.spec.ray
    # One work item per block: one image (or .tar.gz) per prepare task, so images decode in parallel.
    ds: ray.data.Dataset = ray.data.from_items(
        [{"item": _pack(w)} for w in work], override_num_blocks=max(1, len(work))
    )
    # At most max_images_in_flight images are decoded at once (their decoded pixels are what prepare holds).
    # Their batches leave in blocks of about BLOCK_BYTES, which Ray Data's backpressure holds back.
    # (Never more than there are items: Ray Data warns about a cap it cannot reach.)
    prepare = ray.data.TaskPoolStrategy(size=max(1, min(r.max_images_in_flight, len(work))))
    # Ray Data's hint for flat_map does not know fn_args.
    ds = ds.flat_map(_prepare_rows, fn_args=(ctx,), num_cpus=r.decode_num_cpus, compute=prepare)  # type: ignore[arg-type]
    # overlap_writes: two calls per actor, the UDF running in both (Predictor serialises compute with a
    # lock): one call writes its cores to zarr while the next computes.
    calls = 2 if r.overlap_writes else 1
    in_flight = max(calls, r.max_batches_per_actor)
    if pool.max_size > pool.min_size:
        # Ray Data grows a pool once tasks in flight exceed 1.75 × what its actors run at once
        # (DataContext.autoscaling_config.actor_pool_util_upscaling_threshold); with only `calls` queued per
        # actor that never happens (measured: the pool did not grow onto a node that joined), so an elastic
        # pool queues twice that.
        in_flight = max(in_flight, 2 * calls)
    actors = ray.data.ActorPoolStrategy(
        min_size=pool.min_size,
        max_size=pool.max_size,
        max_tasks_in_flight_per_actor=in_flight,
        max_concurrent_calls_per_actor=calls,
        enable_true_multi_threading=r.overlap_writes,
    )
    return ds.map_batches(
        _Predict,
        fn_constructor_args=(ctx, pool.num_cpus, predictor, attempts),
        # One PreparedBatch row per call: batches were cut per image in prepare, so what a call computes does
        # not depend on how rows fall into blocks; an actor task takes a block of them.
        batch_size=1,
        batch_format="numpy",
        compute=actors,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )


def _configure_data_context() -> None:
    data = ray.data.DataContext.get_current()
    data.target_max_block_size = BLOCK_BYTES
    data.execution_options.preserve_order = False  # records may come in any order; the tracker counts them


# --- the run -----------------------------------------------------------------------------------------------


class JobRun:
    """One run's lifecycle, in the manner of Ray Data's ``Datasink`` hooks; use as a context manager.

    ``on_start`` (on enter): root attributes ``status = running``. :meth:`on_record`: each batch record →
    :class:`CompletionTracker`; a settled image → :meth:`on_image`. ``on_complete``: the manifest, root
    ``finished`` with the summary. ``on_failed`` (an exception escaped): root ``failed`` with the error; the
    marker threads are joined and the attempt counter released either way.
    """

    def __init__(self, ctx: JobContext, opts: dict[str, Any], progress: Callable[[str, int], None] | None) -> None:
        self.ctx, self.opts, self.progress = ctx, opts, progress
        self.t0 = time.perf_counter()
        self.tracker = CompletionTracker()
        self.rows: dict[str, ManifestRow] = {}
        self.results: list[Any] = []
        self.nodes: set[str] = set()
        self.megapixels = 0.0
        self.peaks = {"prepare": 0, "actor": 0}
        self.finisher = concurrent.futures.ThreadPoolExecutor(max_workers=FINISH_THREADS, thread_name_prefix="finish")
        self.finishing: list[tuple[concurrent.futures.Future[None], ImageDone, ManifestRow]] = []
        self.root: Any = None
        self.summary: RunSummary | None = None
        self.pool: PoolPlan | None = None
        self.attempts: Any = None
        self.planned: dict[str, ImageRef] = {}

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
        # The driver's node: a worker node lost mid-job takes no count with it.
        here = ray.get_runtime_context().get_node_id()
        affinity = NodeAffinitySchedulingStrategy(node_id=here, soft=True)
        self.attempts = _BatchAttempts.options(scheduling_strategy=affinity).remote()  # type: ignore[attr-defined]
        log.info("run %s started: output %s", self.ctx.run_id, storage.redact(self.ctx.spec.output))

    def on_planned(self, plan: WorkPlan) -> None:
        """The work list is known: its images count towards the progress total now (a .tar.gz's members as
        they are found); inputs settled while listing are recorded."""
        self.planned = {w.ref.key: w.ref for w in plan.work if isinstance(w, ImageTask)}
        self._progress("total", len(self.planned))
        for meta in plan.settled:
            self.on_image(ImageDone(meta=meta))

    def on_record(self, record: BatchRecord) -> None:
        done = self.tracker.add(record)
        if done is not None:
            self.on_image(done)
        self._settle(block=False)

    def on_image(self, done: ImageDone) -> None:
        """A settled image: the place where an image's batch results are reduced before its marker (the
        marker is written by :func:`pipeline.work.finish_image`, in a thread; the row is final once it is)."""
        meta = done.meta
        self.peaks["prepare"] = max(self.peaks["prepare"], done.prepare_peak_rss)
        self.peaks["actor"] = max([self.peaks["actor"], *(r.peak_rss for r in done.results)])
        self.results.extend(done.results)
        row = _manifest_row(self.ctx, done)
        if meta.ref.key not in self.planned:  # found inside an archive, or the archive's own row
            self._progress("total", 1)
        if done.needs_marker:
            log.info("%s: %d batches written; marking complete", meta.ref.name, len(done.results))
            self.finishing.append((self.finisher.submit(finish_image, self.ctx, meta, done.results), done, row))
            return
        if meta.status is not Status.SKIPPED:
            log.info("%s: %s (%s)", meta.ref.name, row.status, row.error)
        self._final(row)

    def on_complete(self) -> RunSummary:
        """Every record is in: images still missing batches, and planned images never heard of, fail (no
        input leaves the run unaccounted); then the manifest and the root attributes."""
        lost = [
            ImageDone(meta=settled(ref, Status.FAILED, "LostInput", f"{storage.redact(ref.name)}: no record came back"))
            for key, ref in self.planned.items()
            if not self.tracker.is_settled(key)
        ]
        for done in [*self.tracker.close(), *lost]:
            log.error("%s: %s", done.meta.ref.name, done.error or done.meta.error)
            self.on_image(done)
        self._settle(block=True)
        summary = RunSummary(
            run_id=self.ctx.run_id,
            elapsed_s=time.perf_counter() - self.t0,
            megapixels=self.megapixels,
            nodes=sorted(self.nodes),
            peak_rss={"driver": peak_rss(), **self.peaks},
            compute=compute_stats(self.results),
            pool=dataclasses.asdict(self.pool) if self.pool else {},
        )
        for row in self.rows.values():
            setattr(summary, row.status, getattr(summary, row.status) + 1)
        summary.manifest = write_manifest(self.ctx.spec.output, list(self.rows.values()), self.ctx.run_id, self.opts)
        self.root.attrs.update(
            {"drcr_pipeline_run": self._run_attrs("finished", finished=now_utc(), summary=summary.to_dict())}
        )
        log.info(
            "run %s finished: %d ok, %d failed, %d skipped",
            self.ctx.run_id,
            summary.ok,
            summary.failed,
            summary.skipped,
        )
        self.summary = summary
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
            if exc is not None:
                self.on_failed(exc)
        finally:
            self.finisher.shutdown(wait=True)
            if self.attempts is not None:
                ray.kill(self.attempts)

    def _run_attrs(self, status: str, **extra: Any) -> dict[str, Any]:
        return {"run_id": self.ctx.run_id, "software": software_versions(), "status": status, **extra}

    def _settle(self, block: bool) -> None:
        for item in list(self.finishing):
            fut, done, row = item
            if not block and not fut.done():
                continue
            self.finishing.remove(item)
            try:
                fut.result()
                row.status = Status.OK.value
                self.megapixels += (done.meta.width or 0) * (done.meta.height or 0) / 1e6
                self.nodes.update(r.node for r in done.results if r.node)
            except Exception as exc:  # storage failure at the marker: the cube is not complete
                row.status, row.error_type, row.error = (
                    Status.FAILED.value,
                    type(exc).__name__,
                    storage.describe_error(exc),
                )
                row.group = None
            self._final(row)

    def _final(self, row: ManifestRow) -> None:
        self.rows[row.input] = row
        self._progress("done", 1)

    def _progress(self, event: str, n: int) -> None:
        if self.progress is not None and n:
            self.progress(event, n)


def _manifest_row(ctx: JobContext, done: ImageDone) -> ManifestRow:
    """The manifest row of a settled image (``ok`` rows become final once their marker is written)."""
    meta = done.meta
    row = ManifestRow(
        input=storage.redact(meta.ref.key),
        source=storage.redact(meta.ref.source),
        member=meta.ref.member,
        run_id=ctx.run_id,
        group=meta.group or None,
        source_sha256=meta.sha256,
        source_bytes=meta.nbytes,
        width=meta.width,
        height=meta.height,
        tiles=meta.tiles or None,
        decode_s=meta.decode_s or None,
        infer_s=float(sum(r.infer_s for r in done.results)) if done.results else None,
    )
    if meta.status is Status.RUN:
        if done.error is not None:
            row.status, row.error_type, row.error, row.group = "failed", "InferenceError", done.error, None
        return row
    row.status, row.error_type, row.error = meta.status.value, meta.error_type, meta.error
    if meta.status is Status.FAILED:
        row.group = None
    return row


def _records(ds: ray.data.Dataset) -> Iterator[BatchRecord]:
    for row in ds.iter_rows():
        yield _unpack(row["record"])


def run_job(
    spec: JobSpec,
    *,
    progress: Callable[[str, int], None] | None = None,
    predictor: Callable[..., Predictor] = Predictor,
) -> RunSummary:
    """Run ``spec`` on the Ray cluster this process is connected to (``init_ray`` first).

    Args:
        spec: the job.
        progress: called with ("total", n) as inputs become known and ("done", 1) per settled input.
        predictor: makes each actor's predictor, called as ``predictor(ctx, num_cpus=...)``: a
            :class:`~pipeline.work.Predictor` subclass or a partial of one (the benchmarks' stand-in model).

    Returns the run summary; the manifest and root attributes are written before returning. Raises what
    stops the whole job (bad spec, unreadable weights, no GPU in time), after marking the run ``failed``.
    """
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    weights = resolve_weights(spec)
    ctx = JobContext(spec=spec, weights=weights, fingerprint=spec.fingerprint(weights["sha256"]), run_id=run_id)
    opts = storage_options(ctx)
    pool = plan_pool(spec)
    with JobRun(ctx, opts, progress) as run:
        run.pool = pool
        plan = plan_work(ctx)
        run.on_planned(plan)
        if plan.work:  # (an empty work list needs no dataset: everything was settled while listing)
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
            log.info("Ray Data stats:\n%s", ds.stats())
        return run.on_complete()

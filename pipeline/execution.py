"""Running a job on Ray, as one Ray Data streaming dataset: :func:`run_job`, its dataset
(:func:`build_dataset`) and its lifecycle (:class:`JobRun`).

The run, stage by stage (rows are packed typed records of :mod:`pipeline.tracking`)::

    plan      driver      inputs expanded; tar/zip listed in tasks;      ImageTask | TarGzTask, settled rows
              (planning)  the catalog Planner drops unchanged inputs
      → prepare  tasks      a .tar.gz streamed once; per image: read,    PreparedBatch (one per image batch)
         (prepare)          hash, resume check, decode, tile, create     or PreparedImage
                            the cube, batches
      → predict  actor pool weights once; (global statistics: decode     BatchRecord (small)
         (predict)          again, passes) model; cores → zarr
      → driver   iterates the records; CompletionTracker settles each image; finish_image (QA, marker) in
                 threads; then manifest, catalog, publish_run — all inside one JobRun (try/finally).

Ray Data streams the stages with backpressure (blocks of windows wait in the object store within its
budget; a prepare task whose output is not taken pauses), sizes the actor pool between ``ray.min_actors``
and ``ray.max_actors`` as work queues and the cluster grows, and shows per-stage progress and stats. Source
and window bytes never reach the driver; cubes never do. A batch whose actor dies is retried by Ray; the
predictor counts attempts per batch (:class:`pipeline.predict.BatchAttempts`) and fails a batch that keeps
killing its worker (a "poison batch") for its image only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
import ray.data

from pipeline import __version__, cubes, qa, storage
from pipeline.catalog import merge, write_catalog
from pipeline.config import JobSpec
from pipeline.errors import InputError
from pipeline.incremental import RunFacts, catalog_updates
from pipeline.lease import Lease, hold_lease
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.planning import ImageTask, PoolPlan, TarGzTask, WorkItem, WorkPlan, plan_pool, plan_work
from pipeline.predict import BatchAttempts, Predict
from pipeline.prepare import prepare_rows
from pipeline.provenance import now_utc, software_versions
from pipeline.publish import publish_run
from pipeline.rows import archive_row, image_row
from pipeline.sources import ImageRef, expand, normalize_url
from pipeline.summary import RunSummary, compute_stats
from pipeline.tracking import BatchRecord, CompletionTracker, ImageDone, pack, unpack
from pipeline.work import ImageMeta, JobContext, Predictor, finish_image, peak_rss, storage_options

__all__ = ["JobRun", "build_dataset", "run_job", "init_ray", "resolve_weights", "new_run_id"]

log = logging.getLogger(__name__)

FINISH_THREADS = 4
"""Threads that write completion markers beside the driver loop, so it never waits on storage (0: inline;
the benchmarks compare)."""

BLOCK_BYTES = 32 * 1024 * 1024
"""Ray Data's target block size for this job: a prepare task hands over its windows in blocks of about this
many bytes (then pauses when they are not taken), so what waits in a task or in the object store stays
bounded whatever the image size."""


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


# --- the dataset -------------------------------------------------------------------------------------------


def build_dataset(
    ctx: JobContext,
    work: Sequence[WorkItem],
    pool: PoolPlan,
    predictor: Callable[..., Predictor],
    attempts: BatchAttempts,
) -> ray.data.Dataset:
    """The job's dataset: work items → prepare → predict; its rows are packed :class:`BatchRecord` s."""
    r = ctx.spec.ray
    # One work item per block: one image (or .tar.gz) per prepare task, so images decode in parallel.
    ds: ray.data.Dataset = ray.data.from_items([{"item": pack(w)} for w in work], override_num_blocks=len(work))
    # At most max_images_in_flight images are decoded at once (their decoded pixels are what prepare holds).
    # Their batches leave in blocks of about BLOCK_BYTES, which Ray Data's backpressure holds back.
    # (Never more than there are items: Ray Data warns about a cap it cannot reach.)
    prepare = ray.data.TaskPoolStrategy(size=max(1, min(r.max_images_in_flight, len(work))))
    ds = ds.flat_map(prepare_rows, fn_args=(ctx,), num_cpus=r.decode_num_cpus, compute=prepare)  # type: ignore[arg-type]
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
        Predict,
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
        self.attempts = BatchAttempts(ctx.run_id)
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
        row = image_row(self.ctx, done)
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
        for done in [*self.tracker.close(), *self._lost(plan)]:
            log.error("%s", done.error or (done.meta.error if done.meta else done.row.error if done.row else ""))
            self.on_image(done)
        self._settle(block=True)
        summary = self._summary(started, plan)
        self.lease.check()  # a run that lost the output to another must not overwrite its manifest and catalog
        summary.manifest = write_manifest(self.ctx.spec.output, list(self.rows.values()), self.ctx.run_id, self.opts)
        summary.catalog = self._write_catalog(plan)
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

    def _lost(self, plan: WorkPlan) -> list[ImageDone]:
        """Planned images and .tar.gz archives of which no record came back, settled as failed."""
        lost = [
            ImageDone(meta=ImageMeta(ref=w.ref, group="", status="failed", error_type="LostInput", error=f"{storage.redact(w.ref.name)}: no record came back"))
            for w in plan.work
            if isinstance(w, ImageTask) and not self.tracker.is_settled(w.ref.key) and w.ref.key not in self.rows
        ]  # fmt: skip
        lost += [
            ImageDone(
                row=archive_row(w.url, self.ctx.run_id, InputError("no record of the archive came back")),
                row_key=normalize_url(w.url),
            )
            for w in plan.work
            if isinstance(w, TarGzTask) and not self._targz_heard_of(w.url)
        ]
        return lost

    def _summary(self, started: float, plan: WorkPlan) -> RunSummary:
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
        return summary

    def _write_catalog(self, plan: WorkPlan) -> str:
        """The output's catalog with this run's rows merged in (:mod:`pipeline.incremental`); its URL."""
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
        return write_catalog(self.ctx.spec.output, merge(plan.previous, updates), self.opts)

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


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _records(ds: ray.data.Dataset) -> Iterator[BatchRecord]:
    for row in ds.iter_rows():
        yield unpack(row["record"])


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

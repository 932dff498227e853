"""Running a job on Ray: the one module that imports ray.

Reading, decoding and tiling run as Ray tasks on CPUs (:func:`pipeline.work.prepare_image` as a
streaming generator, so tiles are owned by the driver and reconstructable, yet never fetched by it);
DRCR runs in a pool of actors (:class:`pipeline.work.Predictor`) that load the weights once, take
batches of tiles and use a GPU each when the cluster has them. Backpressure: at most
``ray.max_images_in_flight`` images are prepared or inferred at once, at most
``ray.max_batches_per_actor`` batches wait on each actor, and a prepare task's tiles are only pulled
when a batch slot is free. Full cubes never pass through the driver: actors write regions to zarr.
Actor restarts and task retries are on; an image whose batches still fail is recorded as ``failed``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray

from pipeline import __version__, cubes, qa, storage
from pipeline.catalog import merge, read_catalog, write_catalog
from pipeline.config import TILE_STATISTICS_HALO, JobSpec
from pipeline.errors import ConfigError, InputError
from pipeline.incremental import Planner, RunFacts, catalog_updates, unchanged_row
from pipeline.lease import Lease, hold_lease
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.provenance import now_utc, software_versions
from pipeline.publish import publish_run
from pipeline.sources import ImageRef, Rejected, expand, iter_targz, list_members, normalize_url
from pipeline.statistics import needs_global
from pipeline.work import ImageMeta, JobContext, Predictor, finish_image, peak_rss, prepare_image, storage_options

__all__ = ["RunSummary", "run_job", "init_ray", "resolve_weights"]

log = logging.getLogger(__name__)

NO_IMAGES = "no-images"
"""Marker a .tar.gz stream ends with when it held no image."""

FINISH_THREADS = 4
"""Threads that write completion markers beside the driver loop (0: inline, as before; benchmarks compare)."""

# A listing entry is skipped (not an error) when it simply is not an image; every other rejection fails.
SKIP_REASONS = ("not an image extension",)


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
    peak_rss: dict[str, int] = dataclasses.field(default_factory=dict)
    """Peak resident memory in bytes by process kind: ``driver``, ``prepare`` (largest over prepare tasks)
    and ``actor`` (largest over inference actors, which also write the cubes)."""
    compute: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Model compute of the inference actors (see :func:`compute_stats`): ``batches``, ``busy_s`` (sum of
    compute times), ``cpu_s`` (CPU time of the computing threads; below ``busy_s`` when the actor was
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


# --- Ray remote wrappers ---------------------------------------------------------------------------------


@ray.remote(max_retries=3)
def _list_task(url: str, kind: str, ctx: JobContext) -> tuple[list[ImageRef], list[Rejected]] | Exception:
    try:
        return list_members(url, kind, storage_options(ctx), max_bytes=ctx.spec.decode.max_member_bytes)  # type: ignore[arg-type]
    except InputError as exc:
        return InputError(storage.describe_error(exc))


@ray.remote(num_returns="streaming", max_retries=3)
def _prepare_task(ctx: JobContext, ref: ImageRef | None, pair: tuple[Any, bytes | None] | None = None):
    if pair is not None:
        item, data = pair
        if isinstance(item, Rejected):
            yield item
            return
        ref = item
    assert ref is not None
    yield from prepare_image(ctx, ref, data if pair is not None else None)
    yield {"peak_rss": peak_rss()}  # after every window: the task's own peak, for RunSummary.peak_rss


@ray.remote(num_returns="streaming", max_retries=0)
def _targz_task(ctx: JobContext, url: str):
    """Stream a .tar.gz once: one (ImageRef | Rejected, bytes | None) object per entry, then
    ``(NO_IMAGES, None)`` if it held no image, or ``(InputError, None)`` if it broke off."""
    rejected: list[Rejected] = []
    images = 0
    try:
        max_bytes = ctx.spec.decode.max_member_bytes
        for ref, data in iter_targz(url, storage_options(ctx), on_rejected=rejected.append, max_bytes=max_bytes):
            while rejected:
                yield (rejected.pop(0), None)
            images += 1
            yield (ref, data)
        while rejected:
            yield (rejected.pop(0), None)
        if images == 0:
            yield (NO_IMAGES, None)
    except InputError as exc:
        while rejected:
            yield (rejected.pop(0), None)
        yield (InputError(storage.describe_error(exc)), None)


@ray.remote(max_restarts=-1, max_task_retries=3)
class _PredictorActor:
    def __init__(self, ctx: JobContext, num_cpus: float) -> None:
        self.predictor = Predictor(ctx, num_cpus=num_cpus)

    def run(self, group: str, scale: float, tiles: list[Any], *windows: Any, state: Any = None) -> dict[str, Any]:
        out = self.predictor.run(group, scale, tiles, list(windows), None if state is None else state.means)
        out["node"] = ray.get_runtime_context().get_node_id()
        return out

    def partial_sums(self, scale: float, height: int, width: int, tiles: list[Any], state: Any, *windows: Any) -> Any:
        return self.predictor.partial_sums(scale, height, width, tiles, list(windows), state)

    def ready(self) -> str:
        return self.predictor.device_name


@ray.remote(num_cpus=0, max_retries=3)  # adds a few [n_blocks, C] arrays: no CPU worth reserving
def _reduce_statistics(state: Any, *parts: Any) -> Any:
    from pipeline.statistics import add_sums

    return add_sums(state, parts)


def _submit_statistics(ctx: JobContext, actors: list[Any], meta: ImageMeta, chunks: list[list[Any]]) -> Any:
    """Submit every statistics pass of one image (``tiling.statistics = "global"``); the final state's ref.

    Pass ``p`` maps the image's batches of ``(tile, window ref)`` over the actors (``partial_sums``) and
    reduces them in one small task; pass ``p + 1`` takes that state. All passes are submitted at once (each
    task depends only on tasks submitted before it): once the state is done, later passes return at once.
    """
    from drcr_model.recalibration import GatherState

    state = ray.put(GatherState(n_blocks=int(ctx.weights["config"]["n_blocks"])))
    for _ in range(int(ctx.weights["config"]["n_blocks"])):
        parts = [
            actors[k % len(actors)].partial_sums.remote(
                meta.scale, meta.height, meta.width, [t for t, _ in chunk], state, *[w for _, w in chunk]
            )
            for k, chunk in enumerate(chunks)
        ]
        state = _reduce_statistics.remote(state, *parts)
    return state


# --- driver ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class _Slot:
    """One image in flight."""

    gen: Any
    label: ImageRef
    meta: ImageMeta | None = None
    pending: list[Any] = dataclasses.field(default_factory=list)  # (tile, window ref) not yet batched
    next_tile: int = 0
    outstanding: int = 0
    exhausted: bool = False
    failed: str | None = None
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    t0: float = 0.0
    statistics: Any = None  # ref to the image's gathered GatherState (tiling.statistics = "global")


def _row(ctx: JobContext, ref: ImageRef, **kw: Any) -> ManifestRow:
    return ManifestRow(
        input=storage.redact(ref.key), source=storage.redact(ref.source), member=ref.member, run_id=ctx.run_id, **kw
    )


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def run_job(
    spec: JobSpec,
    *,
    progress: Callable[[str, int], None] | None = None,
    lease: Lease | None = None,
    wait_s: float = 0.0,
) -> RunSummary:
    """Run ``spec`` on the Ray cluster this process is connected to (``init_ray`` first).

    ``progress(event, n)`` is called with ("total", n) once the inputs are known and ("done", 1) per input.
    Returns the run summary; the manifest, catalog and root attributes are written before returning.
    The output's lease (:mod:`pipeline.lease`) is held for the run: ``lease`` if the caller took it, else
    taken here, waiting up to ``wait_s`` for another run to finish (``LeaseHeldError`` after that).
    """
    if lease is None:
        opts = storage.resolve_storage_options(spec.storage)
        with hold_lease(spec.output, new_run_id(), opts, wait_s=wait_s) as held:
            return _run_job(spec, progress, held)
    return _run_job(spec, progress, lease)


def _run_job(spec: JobSpec, progress: Callable[[str, int], None] | None, lease: Lease) -> RunSummary:
    t_start = time.perf_counter()
    run_id = lease.run_id
    weights = resolve_weights(spec)
    spec = spec.with_halo_for(weights["config"])  # before the fingerprint: it holds the halo the cubes used
    ctx = JobContext(spec=spec, weights=weights, fingerprint=spec.fingerprint(weights["sha256"]), run_id=run_id)
    opts = storage_options(ctx)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    num_gpus = spec.ray.num_gpus_per_actor if spec.ray.num_gpus_per_actor >= 0 else (1.0 if gpus > 0 else 0.0)
    if spec.inference.precision != "fp32" and num_gpus == 0:
        raise ConfigError(
            f"inference.precision = {spec.inference.precision!r}: half precision needs GPU actors, and this cluster has none"
        )

    cpus = float(ray.cluster_resources().get("CPU", 0))
    need = spec.ray.actors * spec.ray.num_cpus_per_actor + spec.ray.decode_num_cpus
    if cpus < need:
        # Actors hold their CPUs for the whole job; with none left for decode tasks the job would wait forever.
        raise ConfigError(
            f"ray.actors × ray.num_cpus_per_actor + ray.decode_num_cpus = {need:g} CPUs, but the cluster has {cpus:g}; "
            "lower ray.actors or ray.num_cpus_per_actor (fractions are allowed), or ray.decode_num_cpus"
        )

    # Expanded before anything is written: a mistyped input leaves the output (and its last summary) as it was.
    found, unconverted = expand(list(spec.inputs), opts)
    store = cubes.open_cubes(spec.output, opts)
    root = cubes.zarr.open_group(store, mode="a")
    root.attrs.update(
        {
            "drcr_pipeline_job": storage.redact(spec.to_dict()),
            "drcr_pipeline_run": {
                "run_id": run_id,
                "started": now_utc(),
                "software": software_versions(),
                "status": "running",
            },
        }
    )

    rows: dict[str, ManifestRow] = {r.ref.key: _rejected_row(ctx, r) for r in unconverted}  # every file gets a row
    work: collections.deque[Any] = collections.deque()
    listings = []
    # Issue 12: plan against the catalog, so unchanged inputs are skipped without being read.
    previous = read_catalog(spec.output, opts)
    planner = Planner(spec.output, previous, ctx.fingerprint, opts)
    listed: list[ImageRef] = []
    for url, kind in planner.inputs(found):
        if kind == "file":
            listed.append(planner.file_ref(url))
        elif kind == "targz":
            work.append(("targz", url))
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
    refs = {r.key: r for r in listed}
    work.extend(("ref", r) for r in planner.refs(listed))
    for cat_row in planner.unchanged:
        rows[cat_row.input] = unchanged_row(cat_row, run_id)
    if progress:
        progress("total", len(work) + len(rows))
        progress("done", len(rows))

    # max_concurrency=2 (ray.overlap_writes): one call writes its cores while the next one computes.
    concurrency = 2 if spec.ray.overlap_writes else 1
    actors = [
        _PredictorActor.options(  # type: ignore[attr-defined]
            num_cpus=spec.ray.num_cpus_per_actor, num_gpus=num_gpus, max_concurrency=concurrency
        ).remote(ctx, spec.ray.num_cpus_per_actor)
        for _ in range(spec.ray.actors if work else 0)  # nothing new or changed: no actor starts
    ]
    load = [0] * len(actors)
    batches: collections.deque[tuple[_Slot, list[Any]]] = collections.deque()
    inflight: dict[Any, tuple[_Slot, int]] = {}
    slots: dict[Any, _Slot] = {}
    targz_gens: list[Any] = []
    megapixels = 0.0
    nodes: set[str] = set()
    peaks = {"prepare": 0, "actor": 0}
    capacity = len(actors) * spec.ray.max_batches_per_actor
    all_results: list[dict[str, Any]] = []
    # Completion markers are storage writes: a few threads do them so the driver loop never waits on
    # storage before dispatching the next batch. A row is final once its marker is written.
    finisher = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, FINISH_THREADS), thread_name_prefix="finish")
    finishing: list[tuple[concurrent.futures.Future[Any], ManifestRow, ImageMeta, list[dict[str, Any]]]] = []

    def settle(block: bool) -> None:
        nonlocal megapixels
        for item in list(finishing):
            fut, row, meta, results = item
            if not block and not fut.done():
                continue
            finishing.remove(item)
            try:
                for name, value in (fut.result() or {}).items():  # the qa_* columns (pipeline.qa)
                    setattr(row, name, value)
                row.status = "ok"
                row.infer_s = float(sum(r["infer_s"] for r in results))
                megapixels += (meta.width or 0) * (meta.height or 0) / 1e6
                nodes.update(r["node"] for r in results)
            except Exception as exc:  # QA failed, or storage failure at the marker: the cube is not complete
                row.status, row.error_type, row.error = "failed", type(exc).__name__, storage.describe_error(exc)
                for name, value in qa.manifest_columns(getattr(exc, "qa", {})).items():
                    setattr(row, name, value)
            rows[meta.ref.key] = row
            if progress:
                progress("done", 1)

    prepare = _prepare_remote(spec)
    counters = {"prepared": 0}

    def start_image(item: Any) -> None:
        kind, value = item
        gen = prepare.remote(ctx, value) if kind == "ref" else prepare.remote(ctx, None, value)
        counters["prepared"] += 1
        label = value if kind == "ref" else ImageRef(source=f"<tar.gz entry {id(gen):x}>", member=None, kind="targz")
        slot = _Slot(gen=gen, label=label, t0=time.perf_counter())
        slots[gen] = slot

    def close(slot: _Slot) -> None:
        meta = slot.meta
        if meta is None:
            return
        del slots[slot.gen]
        refs.setdefault(meta.ref.key, meta.ref)
        peaks["actor"] = max([peaks["actor"]] + [int(r.get("peak_rss", 0)) for r in slot.results])
        row = _row(
            ctx,
            meta.ref,
            group=meta.group,
            source_sha256=meta.sha256,
            source_bytes=meta.nbytes,
            width=meta.width,
            height=meta.height,
            tiles=len(meta.tiles),
            decode_s=meta.decode_s,
            total_s=time.perf_counter() - slot.t0,
        )
        if meta.status != "run":
            row.status, row.error_type, row.error = meta.status, meta.error_type, meta.error
            if meta.status == "failed":
                row.group = None
        elif slot.failed:
            row.status, row.error_type, row.error = "failed", "InferenceError", slot.failed
        else:
            fut: concurrent.futures.Future[Any]
            if FINISH_THREADS > 0:
                fut = finisher.submit(finish_image, ctx, meta, slot.results)
            else:
                fut = concurrent.futures.Future()
                try:
                    fut.set_result(finish_image(ctx, meta, slot.results))
                except Exception as exc:
                    fut.set_exception(exc)
            finishing.append((fut, row, meta, slot.results))
            return
        rows[meta.ref.key] = row
        if progress:
            progress("done", 1)

    def flush(slot: _Slot, final: bool) -> None:
        meta = slot.meta
        if meta is not None and needs_global(spec.tiling.statistics, meta.tiles) and not slot.failed:
            if not final:
                return  # the passes need every window of the image first
            if slot.statistics is None and slot.pending:
                size = spec.ray.batch_size
                chunks = [slot.pending[i : i + size] for i in range(0, len(slot.pending), size)]
                slot.statistics = _submit_statistics(ctx, actors, meta, chunks)
        while len(slot.pending) >= spec.ray.batch_size or (final and slot.pending):
            chunk, slot.pending = slot.pending[: spec.ray.batch_size], slot.pending[spec.ray.batch_size :]
            batches.append((slot, chunk))
            slot.outstanding += 1

    def next_work() -> Any | None:
        if lease.lost:  # another run took the output over: start nothing more
            return None
        if work:
            return work.popleft()
        return None

    last_progress, longest = time.perf_counter(), 0.0

    def stalled() -> bool:
        """Nothing moved (no batch finished, no item taken) for a while. Prepare tasks paused by
        backpressure keep their CPUs, so an actor restarting after a crash or a node loss, or the prepare
        tasks a paused .tar.gz stream feeds, may be waiting for a CPU that only they can free; then items
        are taken regardless of room, the paused tasks run to their end, and their CPUs come back."""
        return time.perf_counter() - last_progress > max(STALL_S, 3 * longest)

    while work or slots or targz_gens or batches or inflight:
        settle(block=False)
        # 1. Start images while there is room.
        while len(slots) < spec.ray.max_images_in_flight:
            item = next_work()
            if item is None:
                break
            if item[0] == "targz":
                targz_gens.append(
                    (
                        item[1],
                        # No CPU reserved: the stream pauses (backpressure) until the driver takes its entries,
                        # and a paused task holding a decode CPU would starve the prepare tasks it feeds.
                        # Gunzip and reading are light next to decoding.
                        _targz_task.options(
                            num_cpus=0,
                            _generator_backpressure_num_objects=2 * spec.ray.max_images_in_flight,
                        ).remote(ctx, item[1]),
                    )
                )
                continue
            start_image(item)
        # 2. Dispatch ready batches to the least-loaded actor with room.
        while batches:
            i = min(range(len(actors)), key=lambda k: load[k])
            if load[i] >= spec.ray.max_batches_per_actor:
                break
            slot, chunk = batches.popleft()
            if slot.failed:
                slot.outstanding -= 1
                if slot.exhausted and slot.outstanding == 0:
                    close(slot)
                continue
            assert slot.meta is not None
            tiles = [t for t, _ in chunk]
            ref = actors[i].run.remote(
                slot.meta.group, slot.meta.scale, tiles, *[w for _, w in chunk], state=slot.statistics
            )
            inflight[ref] = (slot, i)
            load[i] += 1
        # 3. Wait for something: finished batches, new tiles (only when batches have room), targz entries.
        waitables = list(inflight)
        stuck = stalled()
        if len(batches) < capacity or stuck:
            waitables += [s.gen for s in slots.values() if not s.exhausted]
        if len(slots) < spec.ray.max_images_in_flight or stuck:
            waitables += [g for _, g in targz_gens]
        if not waitables:
            continue
        ready, _ = ray.wait(waitables, num_returns=1, timeout=5.0)
        if ready:
            last_progress = time.perf_counter()
        for obj in ready:
            if obj in inflight:
                slot, i = inflight.pop(obj)
                load[i] -= 1
                slot.outstanding -= 1
                try:
                    result = ray.get(obj)
                    slot.results.append(result)
                    all_results.append(result)
                    longest = max(longest, float(result["infer_s"]) + float(result["write_s"]))
                except Exception as exc:  # actor gone after its restarts, or an error in the model
                    slot.failed = slot.failed or storage.describe_error(exc)
                if slot.exhausted and slot.outstanding == 0:
                    close(slot)
                continue
            targz = next(((u, g) for u, g in targz_gens if g is obj), None)
            if targz is not None:
                try:
                    pair_ref = next(obj)  # type: ignore[arg-type]
                except StopIteration:
                    targz_gens.remove(targz)
                    continue
                pair = ray.get(pair_ref)
                if isinstance(pair[0], Exception) or pair[0] == NO_IMAGES:
                    rows[normalize_url(targz[0])] = _archive_row(targz[0], run_id, pair[0])
                    if progress:
                        progress("total", 1)
                        progress("done", 1)
                elif isinstance(pair[0], Rejected):
                    rows[pair[0].ref.key] = _rejected_row(ctx, pair[0])
                    if progress:
                        progress("total", 1)
                        progress("done", 1)
                else:
                    if progress:
                        progress("total", 1)
                    start_image(("pair", pair_ref))
                continue
            slot = slots[obj]
            try:
                item_ref = next(obj)  # type: ignore[arg-type]
            except StopIteration:
                slot.exhausted = True
                if slot.meta is not None and slot.meta.status == "run" and slot.next_tile < len(slot.meta.tiles):
                    # e.g. a retried task that failed this time after earlier windows were taken
                    slot.failed = (
                        slot.failed or f"prepare task ended after {slot.next_tile} of {len(slot.meta.tiles)} windows"
                    )
                flush(slot, final=True)
                if slot.outstanding == 0:
                    close(slot)
                continue
            if slot.meta is None:
                try:
                    first = ray.get(item_ref)
                except Exception as exc:  # the prepare task failed after its retries
                    slot.exhausted = True
                    slot.meta = ImageMeta(
                        ref=slot.label,
                        group="",
                        status="failed",
                        error_type=type(exc).__name__,
                        error=storage.describe_error(exc),
                    )
                    close(slot)
                    continue
                if isinstance(first, Rejected):
                    rows[first.ref.key] = _rejected_row(ctx, first)
                    del slots[obj]
                    if progress:
                        progress("done", 1)
                    continue
                slot.meta = first
                continue
            assert slot.meta is not None
            if slot.meta.status != "run" or slot.next_tile >= len(slot.meta.tiles):  # the last item: peak memory
                # A figure, not a result: if it was lost with a node, it is simply not counted.
                with contextlib.suppress(Exception):
                    peaks["prepare"] = max(peaks["prepare"], int(ray.get(item_ref)["peak_rss"]))
                continue
            slot.pending.append((slot.meta.tiles[slot.next_tile], item_ref))
            slot.next_tile += 1
            flush(slot, final=False)

    settle(block=True)
    finisher.shutdown()
    summary = RunSummary(
        run_id=run_id,
        elapsed_s=time.perf_counter() - t_start,
        megapixels=megapixels,
        nodes=sorted(nodes),
        peak_rss={"driver": peak_rss(), **peaks},
        compute=compute_stats(all_results),
        actors=len(actors),
        prepared=counters["prepared"],
        unchanged=len(planner.unchanged),
    )
    for row in rows.values():
        setattr(summary, row.status, getattr(summary, row.status) + 1)
    lease.check()  # a run that lost the output to another must not overwrite its manifest and catalog
    summary.manifest = write_manifest(spec.output, list(rows.values()), run_id, opts)
    facts = RunFacts(
        output=spec.output,
        run_id=run_id,
        fingerprint=ctx.fingerprint,
        weights_sha256=str(weights["sha256"]),
        package_version=__version__,
        bands=len(ctx.bands_nm),
        output_spec=spec.output_options,
        tiling=spec.tiling,
        when=datetime.datetime.now(datetime.UTC),
    )
    updates = catalog_updates(facts, previous, rows.values(), refs, planner.unchanged, planner.versions)
    summary.catalog = write_catalog(spec.output, merge(previous, updates), opts)
    root.attrs.update(
        {
            "drcr_pipeline_run": {
                "run_id": run_id,
                "finished": now_utc(),
                "software": software_versions(),
                "status": "finished",
                "summary": summary.to_dict(),
            }
        }
    )
    summary.published = publish_run(spec.output, opts)  # consolidated metadata, STAC, report.html
    for a in actors:
        ray.kill(a)
    return summary


STALL_S = 5.0
"""Seconds without progress (or 3 × the longest batch, if longer) after which the driver takes tiles
regardless of room (see ``stalled`` in :func:`run_job`)."""


def _prepare_remote(spec: JobSpec) -> Any:
    """The prepare task with the job's resources. It runs at most :func:`tiles_ahead` windows ahead of the
    driver, which takes them only as batches find room: windows waiting in the object store stay bounded
    whatever the image size."""
    return _prepare_task.options(
        num_cpus=spec.ray.decode_num_cpus, _generator_backpressure_num_objects=tiles_ahead(spec)
    )


WINDOWS_AHEAD_BYTES = 32 * 1024 * 1024
"""About how many bytes of windows one prepare task may have waiting in the object store (see
:func:`tiles_ahead`)."""


def tiles_ahead(spec: JobSpec) -> int:
    """How many items a prepare task may yield beyond those the driver has taken before it pauses: about
    ``WINDOWS_AHEAD_BYTES`` of windows (8-bit RGB), and never fewer than fill every actor's queue once more
    (``actors × max_batches_per_actor × batch_size``), plus its first and last items.

    Small and medium images never pause, so their tasks end and free their CPUs while the actors work
    (decode overlaps inference); a big image's windows never sit in the object store all at once.
    """
    t = spec.tiling
    halo = t.halo if t.halo is not None else TILE_STATISTICS_HALO  # run_job resolves it first; a sizing guess
    window = (t.tile_core + 2 * halo) ** 2 * 3
    return (
        max(spec.ray.actors * spec.ray.max_batches_per_actor * spec.ray.batch_size, WINDOWS_AHEAD_BYTES // window) + 2
    )


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

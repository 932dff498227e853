"""Planning a run on the driver, before its dataset starts: the work (:func:`plan_work`: archives listed in
Ray tasks, inputs planned against the output's catalog) and the inference actor pool (:func:`plan_pool`,
waiting for the autoscaler when GPUs are asked for and the cluster has none yet)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import ray

from pipeline import storage
from pipeline.catalog import CatalogRow, read_catalog
from pipeline.config import JobSpec
from pipeline.errors import ConfigError, InputError
from pipeline.incremental import Planner, unchanged_row
from pipeline.manifest import ManifestRow
from pipeline.rows import NO_IMAGES, archive_row, rejected_row
from pipeline.sources import ImageRef, Kind, Rejected, list_members, normalize_url
from pipeline.work import JobContext, storage_options

__all__ = ["ImageTask", "TarGzTask", "WorkItem", "WorkPlan", "plan_work", "PoolPlan", "plan_pool", "GPU_POLL_S"]

log = logging.getLogger(__name__)


# --- the work --------------------------------------------------------------------------------------------


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


@ray.remote(max_retries=3)
def _list_task(url: str, kind: str, ctx: JobContext) -> tuple[list[ImageRef], list[Rejected]] | Exception:
    try:
        return list_members(url, kind, storage_options(ctx), max_bytes=ctx.spec.decode.max_member_bytes)  # type: ignore[arg-type]
    except InputError as exc:
        return InputError(storage.describe_error(exc))


def plan_work(ctx: JobContext, found: Sequence[tuple[str, Kind]], unconverted: Sequence[Rejected]) -> WorkPlan:
    """The run's work: tar and zip archives listed in parallel Ray tasks (headers / central directory
    only); ``.tar.gz`` archives left whole, to be streamed once; every input planned against the output's
    catalog (issue 12), so unchanged inputs are skipped without being read."""
    opts = storage_options(ctx)
    run_id = ctx.run_id
    rows: dict[str, ManifestRow] = {r.ref.key: rejected_row(ctx, r) for r in unconverted}  # every file gets a row
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
            rows[normalize_url(url)] = archive_row(url, run_id, listed_now)
            continue
        images, rejected = listed_now
        listed.extend(images)
        if not images:
            rows[normalize_url(url)] = archive_row(url, run_id, NO_IMAGES)
        for rej in rejected:
            rows[rej.ref.key] = rejected_row(ctx, rej)
    work.extend(ImageTask(ref=r) for r in planner.refs(listed))
    for cat_row in planner.unchanged:
        rows[cat_row.input] = unchanged_row(cat_row, run_id)
    log.info("planned %d work items, %d inputs settled while planning", len(work), len(rows))
    return WorkPlan(work=tuple(work), rows=rows, refs={r.key: r for r in listed}, planner=planner, previous=previous)


# --- the actor pool --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolPlan:
    """The inference actor pool: between ``min_size`` and ``max_size`` actors of ``num_cpus`` CPUs and
    ``num_gpus`` GPUs each."""

    min_size: int
    max_size: int
    num_gpus: float
    num_cpus: float


GPU_POLL_S = 1.0
"""How often the GPU wait looks at the cluster's resources."""


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

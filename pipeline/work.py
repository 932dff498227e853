"""The work of one job, as plain functions and one plain class, without Ray.

:func:`prepare_image` (a CPU task: read, hash, resume check, decode, plan tiles, create the cube) and
:class:`Predictor` (an actor: weights loaded once, batches of tiles → model → cores written to zarr) and
:func:`finish_image` (completion marker) are what :mod:`pipeline.execution` runs on Ray. Data errors of
one input become a ``failed`` :class:`ImageMeta`; programming errors propagate.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import resource
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from pipeline import cubes, preview, qa, storage
from pipeline.config import JobSpec
from pipeline.errors import InputError
from pipeline.incremental import expected_chunks
from pipeline.provenance import host_info, now_utc, software_versions
from pipeline.sources import ImageRef
from pipeline.tiling import Tile, crop_core, extract_window, plan_tiles

__all__ = [
    "JobContext",
    "ImageMeta",
    "prepare_image",
    "prepare_decoded",
    "prepare_source",
    "redecode",
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


@dataclasses.dataclass(kw_only=True)
class ImageMeta:
    """The outcome of preparing one image. ``status``: ``run`` (tiles follow), ``skipped`` or ``failed``."""

    ref: ImageRef
    group: str
    status: str = "run"
    error_type: str | None = None
    error: str | None = None
    sha256: str | None = None
    nbytes: int | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    scale: float = 1.0
    tiles: list[Tile] = dataclasses.field(default_factory=list)
    decode_s: float = 0.0
    started: str = ""


def _provenance(ctx: JobContext, meta: ImageMeta, decoded: Any) -> dict[str, Any]:
    spec = ctx.spec
    w = ctx.weights
    return {
        "source": {
            "url": storage.redact(meta.ref.source),
            "key": storage.redact(meta.ref.key),  # the owner of the group (cubes.check_owner)
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
        "tiling": dataclasses.asdict(spec.tiling)
        | {"tiles": len(meta.tiles), "whole_image": len(meta.tiles) == 1 and meta.tiles[0].whole},
        "output": dataclasses.asdict(spec.output_options) | {"bands_nm": list(ctx.bands_nm)},
        "batch_size": spec.ray.batch_size,
        "job": {"name": spec.name, "run_id": ctx.run_id, "fingerprint": ctx.fingerprint},
        "software": software_versions(),
        "storage": storage.safe_options_for_record(storage_options(ctx)),
        "started": meta.started,
        "prepared_on": host_info(),
    }


def prepare_image(ctx: JobContext, ref: ImageRef, data: bytes | None = None) -> Iterator[ImageMeta | np.ndarray]:
    """Yield the image's :class:`ImageMeta`, then (status ``run``) each tile's raw window (h×w×3, uint8/16).

    :func:`prepare_decoded`, then the windows cut from the decoder's buffer one at a time (no whole-image
    array is made). Windows are the raw decoded pixels; the predictor divides them by ``meta.scale`` (the
    whole image's maximum), so tiles see exactly the whole image's preprocessing.
    """
    meta, decoded = prepare_decoded(ctx, ref, data)
    del data
    yield meta
    if decoded is None:
        return
    for tile in meta.tiles:
        yield extract_window(decoded, tile)
    del decoded


def prepare_decoded(ctx: JobContext, ref: ImageRef, data: bytes | None = None) -> tuple[ImageMeta, Any]:
    """The image's :class:`ImageMeta` and its decoded pixels (``None`` unless the status is ``run``).

    Reads the bytes (unless given), hashes them, skips the image when its group is complete with the same
    source hash and job fingerprint, decodes, plans the tiles and creates the cube's metadata. The decoded
    image is the decoder's buffer (:mod:`pipeline.bigdecode`): windows are cropped from it.
    """
    meta, decoded, _ = prepare_source(ctx, ref, data)
    return meta, decoded


def prepare_source(
    ctx: JobContext, ref: ImageRef, data: bytes | None = None, *, keep_encoded: bool = False
) -> tuple[ImageMeta, Any, bytes | None]:
    """:func:`prepare_decoded`, and with ``keep_encoded`` the encoded bytes when they were read into memory
    (small files, archive members) and the image needs gathered statistics (:func:`redecode` takes them:
    the actor decodes the image again without reading it again); ``None`` otherwise."""
    from pipeline.bigdecode import decode_encoded, fetch_encoded
    from pipeline.statistics import needs_global

    t0 = time.perf_counter()
    group = cubes.group_path(ref.source, ref.member, ref.key)
    meta = ImageMeta(ref=ref, group=group, started=now_utc())
    opts = storage_options(ctx)
    try:
        # Small images come back as bytes in memory; big ones hashed on the way to where they stream from.
        encoded = fetch_encoded(ref, opts, data, ctx.spec.decode)
        del data
        meta.sha256, meta.nbytes = encoded.sha256, encoded.nbytes
        store = cubes.open_cubes(ctx.spec.output, opts)
        attrs = cubes.read_status(store, group)
        cubes.check_owner(attrs, group, ref.key)
        if attrs and attrs.get("complete") is True:
            record = attrs.get(cubes.ATTR, {})
            if (
                record.get("source", {}).get("sha256") == meta.sha256
                and record.get("job", {}).get("fingerprint") == ctx.fingerprint
            ):
                meta.status = "skipped"
                meta.error = "already complete with the same source sha256 and job fingerprint"
                meta.width, meta.height = record["source"].get("width"), record["source"].get("height")
                return meta, None, None
        decoded = decode_encoded(encoded, ctx.spec.decode)
        kept = encoded.data if keep_encoded else None
        del encoded
        meta.height, meta.width = decoded.height, decoded.width
        meta.mode = decoded.mode
        peak = float(decoded.max())
        meta.scale = peak if peak > 0 else 1.0
        t = ctx.spec.tiling
        meta.tiles = plan_tiles(
            meta.height,
            meta.width,
            max_tile_pixels=t.max_tile_pixels,
            tile_core=t.tile_core,
            halo=t.halo_for(int(ctx.weights["config"]["n_blocks"])),
        )
        record = (attrs or {}).get(cubes.ATTR, {})
        # A retried or lineage-reconstructed prepare task of this same run (its tiles lost with a node)
        # must not recreate the group: that would delete regions the actors already wrote.
        same_run = (
            record.get("job", {}).get("run_id") == ctx.run_id and record.get("source", {}).get("sha256") == meta.sha256
        )
        if not same_run:
            cubes.create_cube(
                store,
                group,
                height=meta.height,
                width=meta.width,
                bands_nm=ctx.bands_nm,
                spec=ctx.spec.output_options,
                provenance=_provenance(ctx, meta, decoded),
                tiling=ctx.spec.tiling,
            )
    except InputError as exc:
        meta.status, meta.error_type, meta.error = "failed", type(exc).__name__, storage.describe_error(exc)
        return meta, None, None
    meta.decode_s = time.perf_counter() - t0
    return meta, decoded, kept if needs_global(ctx.spec.tiling.statistics, meta.tiles) else None


def redecode(ctx: JobContext, meta: ImageMeta, data: bytes | None) -> Any:
    """An image :func:`prepare_source` prepared, decoded again where its statistics are gathered (the
    inference actor): from ``data`` (the encoded bytes it kept) or read again from storage (big files,
    which stream by region: memory stays bounded), the same decoder choosing the same path, so the pixels
    are the ones prepare planned.

    Raises:
        InputError: the source changed since it was prepared (another hash or size).
    """
    from pipeline.bigdecode import EncodedImage, decode_encoded, fetch_encoded

    name = storage.redact(meta.ref.name)
    if data is not None:
        encoded = EncodedImage(name=meta.ref.name, sha256=meta.sha256 or "", nbytes=len(data), data=data)
    else:
        encoded = fetch_encoded(meta.ref, storage_options(ctx), None, ctx.spec.decode)
        if encoded.sha256 != meta.sha256:
            raise InputError(
                f"{name}: changed while the job ran (sha256 {encoded.sha256[:12]}…, was {str(meta.sha256)[:12]}…)"
            )
    decoded = decode_encoded(encoded, ctx.spec.decode)
    del encoded
    if (decoded.height, decoded.width) != (meta.height, meta.width):
        raise InputError(f"{name}: decoded as {decoded.width}×{decoded.height}, prepared as {meta.width}×{meta.height}")
    return decoded


@functools.cache
def bound_heap() -> None:
    """Map every buffer of 1 MiB or more on its own and unmap it when freed (glibc ``M_MMAP_THRESHOLD``).

    By default glibc raises its mmap threshold each time a large mapped block is freed, so later batch-sized
    buffers (1–32 MiB: windows, outputs, encoded chunks) come from heaps that fragment and rarely shrink;
    with two batches in flight (``ray.overlap_writes``) an actor held ~60 MB more than the buffers in use
    (1.32× from a 1024² to an 8192² image, README "Performance"). A fixed threshold (which also turns the
    adjustment off) removes that. Used in actors whose model does not compute on the CPU (GPU, or the
    benchmarks' stand-in, ``benchmarks/standin.py``): CPU convolutions allocate such buffers by the hundred per forward pass, and mapping
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
        encode_on_device: quantise and predict error-bounded chunks on the device (the GPU path);
            ``None``: on CUDA devices.
    """

    def __init__(
        self, ctx: JobContext, *, num_cpus: float = 1, device: str | None = None, encode_on_device: bool | None = None
    ) -> None:
        import torch

        from drcr_model import Weights
        from drcr_model.inference import select_device

        self.ctx = ctx
        torch.set_num_threads(_torch_threads(num_cpus))
        self._encode_threads = _torch_threads(num_cpus)  # chunk encoding (cubes.write_regions) uses the same CPUs
        self.device = select_device(device or ctx.spec.inference.device)
        # The GPU path: quantise and predict error-bounded chunks on the device (pipeline.residuals); by
        # default on CUDA only (on a CPU device numpy does it faster, README "Error-bounded cubes").
        on_device = self.device.type == "cuda" if encode_on_device is None else encode_on_device
        self._device_encode = on_device and ctx.spec.output_options.max_error > 0
        if not self._device_encode:
            cubes.warm_encoder(ctx.spec.output_options)  # numba compiles here, not in the first write
        self._stream: Any = None
        self._heap_bounded = self._bounds_heap()
        if self._heap_bounded:
            bound_heap()  # not for CPU compute: see bound_heap
        self._batches, self._count_lock = 0, threading.Lock()
        self._opts = storage_options(ctx)
        weights = Weights.from_record(ctx.weights)
        from drcr_model.camera import camera_response

        self._response = camera_response(weights.camera, list(weights.bands_nm)).astype(np.float32)  # for qa
        self.model = weights.load(device=self.device, storage_options=self._opts)
        if ctx.spec.inference.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.store = cubes.open_cubes(ctx.spec.output, self._opts)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        # Calls may run in two threads (``ray.overlap_writes``): one computes while the other writes its
        # cores; the lock keeps computes one at a time, so torch's threads are never oversubscribed.
        self._compute = threading.Lock()
        self._warm_up()

    def _bounds_heap(self) -> bool:
        """Whether this predictor fixes glibc's mmap threshold (:func:`bound_heap`): off the CPU, where no
        convolution pays for the fixed threshold; a CPU predictor trims its heaps every ``TRIM_EVERY``
        batches instead."""
        return self.device.type != "cpu"

    def _warm_up(self) -> None:
        """One forward of a small input before the first batch. A fresh process's first forward (torch's
        thread pool and allocator; on a GPU the CUDA context and kernels) took 2–3× a batch's time on the
        fault tests' restarted actors (0.7–1.15 s vs 0.2–0.4 s, 48² images, load ~10): it fell in the
        retry of the batch whose actor had died, the one batch a restart should get through quickly. Then
        one read of the output's root, for the same reason."""
        from drcr_model.inference import forward

        inf = self.ctx.spec.inference
        x = np.zeros((1, 3, 32, 32), dtype=np.float32)
        forward(self.model, x, precision=inf.precision, channels_last=inf.channels_last)
        # The store's client and first connection (an S3 session: ~0.5 s under load), not in the first write.
        try:
            cubes.zarr.open_group(self.store, mode="r")
        except Exception as exc:  # the output may be unreachable for a moment: the batches' writes retry
            log.info("warm-up read of the output failed (%s); going on", storage.describe_error(exc))

    def run(
        self, group: str, scale: float, tiles: list[Tile], windows: list[np.ndarray], means: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Run one batch (tiles of one image, in plan order) and write each core; returns timings.

        ``means``: the image's gathered re-calibration statistics (``tiling.statistics = "global"``,
        :meth:`partial_sums`), ``None``: each tile's own. Thread-safe: computes are serialised, the zarr
        writes of one call overlap the next call's compute. Returns only after this batch's writes finished.
        """
        with self._compute:
            start = time.time()  # wall clock, comparable across the processes of one host
            t0, c0 = time.perf_counter(), time.thread_time()
            outputs, on_device = self._compute_batch(scale, tiles, windows, means)
            t1, c1 = time.perf_counter(), time.thread_time()
        t_qa = time.perf_counter()
        inputs = _core_inputs(scale, tiles, windows)
        qa_stats = qa.tile_stats(inputs, outputs, self._response)
        regions = [(t.core_y0, t.core_x0, o, x) for t, o, x in zip(tiles, outputs, inputs)]
        preview.write_preview_regions(self.store, group, regions, self.ctx.bands_nm)
        qa_s = time.perf_counter() - t_qa
        with self._encode_stream():
            cubes.write_regions(
                self.store,
                group,
                [(tile.core_y0, tile.core_x0, core) for tile, core in zip(tiles, on_device or outputs)],
                threads=self._encode_threads,
            )
        del on_device, outputs
        self._count_batch()
        t2 = time.perf_counter()
        return {
            "infer_s": t1 - t0,
            "write_s": t2 - t1,
            "infer_cpu_s": c1 - c0,
            "compute_start": start,
            "compute_end": start + (t1 - t0),
            "pixels": int(sum(t.core_h * t.core_w for t in tiles)),
            "device": self.device_name,
            "host": host_info()["hostname"],
            "pid": os.getpid(),
            "peak_rss": peak_rss(),
            "qa": qa_stats,
            "qa_s": qa_s,  # QA statistics + preview rendering and writes
        }

    def partial_sums(
        self, scale: float, height: int, width: int, tiles: list[Tile], windows: list[np.ndarray], state: Any
    ) -> tuple[np.ndarray, int] | None:
        """One batch's share of a statistics pass (:func:`pipeline.statistics.tile_sums`) of an H×W image.

        ``state`` is the :class:`~drcr_model.recalibration.GatherState` after the passes so far. Returns
        ``None`` when it is already done: passes are submitted ahead, before convergence is known.
        """
        from pipeline.statistics import tile_sums, windows_to_batch

        if state.done:
            return None
        with self._compute:
            batch = windows_to_batch(windows, scale)
            sums = tile_sums(
                self.model,
                batch,
                tiles,
                height,
                width,
                state.means,
                channels_last=self.ctx.spec.inference.channels_last,
            )
        del batch
        self._count_batch()  # a pass's batches grow the heap as the prediction's do
        return sums

    def _count_batch(self) -> None:
        """Count a batch (prediction or statistics pass); a CPU predictor trims its heaps every
        ``TRIM_EVERY`` of them, outside the compute lock, so the trim overlaps the next batch's compute."""
        if self._heap_bounded:
            return
        with self._count_lock:
            self._batches += 1
            trim = self._batches % TRIM_EVERY == 0
        if trim:
            release_free_memory()

    def gather_means(self, scale: float, image: Any, tiles: list[Tile], batch_size: int) -> tuple[np.ndarray, int]:
        """The image's gathered re-calibration means [n_blocks, C] and the passes it took: the passes of
        :func:`pipeline.statistics.gather_statistics` (batches of ``batch_size`` tiles in plan order, windows
        cut from ``image`` per batch) on this predictor's device."""
        from drcr_model.recalibration import GatherState
        from pipeline.statistics import add_sums

        height, width = image.shape[:2]
        state = GatherState(n_blocks=int(self.ctx.weights["config"]["n_blocks"]))
        while not state.done:
            parts = []
            for i in range(0, len(tiles), batch_size):
                group = tiles[i : i + batch_size]
                windows = [extract_window(image, t) for t in group]
                parts.append(self.partial_sums(scale, height, width, group, windows, state))
                del windows
            state = add_sums(state, parts)
        assert state.means is not None
        return state.means, state.passes

    def _encode_stream(self) -> Any:
        """Where the device path's quantise and predict run: a side CUDA stream, so that copying the
        integers back waits for them only, not for the next batch's compute queued on the default stream."""
        import contextlib

        import torch

        if not self._device_encode or self.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._stream)

    def _compute_batch(
        self, scale: float, tiles: list[Tile], windows: list[np.ndarray], means: np.ndarray | None = None
    ) -> tuple[list[np.ndarray], list[Any] | None]:
        """Each tile's core of the model output, bands × core_h × core_w float32; and, on the GPU path
        (an error-bounded cube on a CUDA device; an image run whole in ``inference.mode = "pad"`` only),
        the same cores as device tensors, which
        :func:`pipeline.cubes.write_regions` quantises and predicts there before copying int16 back."""
        outputs = self._compute_outputs(scale, tiles, windows, means)
        if isinstance(outputs, list):
            return outputs, None
        host = outputs.cpu().numpy()  # the float32 copy QA and the previews read; also syncs the device
        return [crop_core(host[i], t) for i, t in enumerate(tiles)], [
            crop_core(outputs[i], t) for i, t in enumerate(tiles)
        ]

    def _compute_outputs(
        self, scale: float, tiles: list[Tile], windows: list[np.ndarray], means: np.ndarray | None = None
    ) -> Any:
        """The cores as numpy arrays, or (GPU path) the batch's whole output as a device tensor."""
        from drcr_model.inference import forward, forward_tensor, pad_chw, reconstruct

        inf = self.ctx.spec.inference
        scale32 = np.float32(scale)
        if len(tiles) == 1 and tiles[0].whole:
            x = windows[0].astype(np.float32) / scale32
            if self._device_encode and inf.mode == "pad":
                # The GPU path for an image run whole: reconstruct's "pad" pass (the same input, layout
                # included, so the same output), kept on the device; the core crop drops the padding.
                return forward_tensor(
                    self.model,
                    pad_chw(x.transpose(2, 0, 1))[None],
                    precision=inf.precision,
                    channels_last=inf.channels_last,
                    ensemble=inf.ensemble,
                )
            cube = reconstruct(
                x,
                self.model,
                mode=inf.mode,  # type: ignore[arg-type]
                precision=inf.precision,
                channels_last=inf.channels_last,
                preprocessed=True,
                ensemble=inf.ensemble,
            )
            outputs = [np.ascontiguousarray(cube.transpose(2, 0, 1))]
        else:
            batch = np.stack([w.astype(np.float32).transpose(2, 0, 1) / scale32 for w in windows])
            if self._device_encode:
                return forward_tensor(
                    self.model,
                    batch,
                    precision=inf.precision,
                    channels_last=inf.channels_last,
                    means=means,
                    ensemble=inf.ensemble,
                )
            y = forward(
                self.model,
                batch,
                precision=inf.precision,
                channels_last=inf.channels_last,
                means=means,
                ensemble=inf.ensemble,
            )
            outputs = [crop_core(y[i], tile) for i, tile in enumerate(tiles)]
        return outputs


def _core_inputs(scale: float, tiles: list[Tile], windows: list[np.ndarray]) -> list[np.ndarray]:
    """The model's input over each tile's core, 3 × core_h × core_w float32 (what QA compares with)."""
    return [
        (w[tile.core_in_window].transpose(2, 0, 1) / np.float32(scale)).astype(np.float32)
        for tile, w in zip(tiles, windows)
    ]


def finish_image(ctx: JobContext, meta: ImageMeta, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Check the image's QA, then write the completion marker (finish time, devices, workers, timings, QA).

    Returns the manifest's ``qa_*`` columns. Raises :class:`pipeline.qa.QAError` (the cube stays
    incomplete) for non-finite output, or a threshold exceeded with ``qa.on_exceed = "fail"``.
    """
    store = cubes.open_cubes(ctx.spec.output, storage_options(ctx))
    result = qa.summarize(qa.reduce_stats([r["qa"] for r in results]), ctx.spec.qa.thresholds())
    qa.check(result, fail_on_flags=ctx.spec.qa.on_exceed == "fail", label=storage.redact(meta.ref.key))
    preview.write_thumbnails(store, ctx.spec.output, meta.group, storage_options(ctx))
    extra = {
        "qa": result.to_dict(),
        "preview": preview.describe(),
        "finished": now_utc(),
        "device": sorted({r["device"] for r in results}),
        "workers": sorted(
            {f"{r['host']}:{r['pid']}" for r in results} | {f"node:{r['node']}" for r in results if r.get("node")}
        ),
        "timings": {
            "decode_s": meta.decode_s,
            "infer_s": float(sum(r["infer_s"] for r in results)),
            "write_s": float(sum(r["write_s"] for r in results)),
            "qa_s": float(sum(r.get("qa_s", 0.0) for r in results)),
        },
        # Checked by a rerun against one listing of the store (pipeline.incremental.ChunkCounts).
        "chunks": expected_chunks(meta.height or 0, meta.width or 0, ctx.spec.output_options, ctx.spec.tiling),
    }
    # Two inputs whose prepare tasks raced for one group: only the one the group records is marked complete.
    cubes.check_owner(cubes.read_status(store, meta.group), meta.group, meta.ref.key)
    cubes.mark_complete(store, meta.group, extra, run_id=ctx.run_id)
    return qa.manifest_columns(result.to_dict())

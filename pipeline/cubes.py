"""The zarr v3 output: one group per input image under ``<output>/cubes.zarr``.

Distributed writes follow xarray's recipe: the group and its arrays' metadata are written once
(:func:`create_cube`), then each tile writes its own region (:func:`write_region`), regions never sharing
a chunk, and a completion marker is written last (:func:`mark_complete`). A group without
``complete = true`` in its attributes is never reported as done, and unwritten chunks read as NaN.

Each group holds ``cube`` (bands × y × x, error-bounded float32 by default) with ``dimension_names``
``("wavelength", "y", "x")`` and a ``wavelength`` coordinate in nm, so ``xarray.open_zarr(store,
group=...)`` and ``xarray.open_datatree(root, engine="zarr")`` just work.

Attributes follow the CF conventions (:data:`CONVENTIONS`) and stay netCDF-valid, so an opened group goes
straight to ``ds.to_netcdf()``: ``complete`` is an integer (0/1) and the provenance record one JSON string
(``ATTR``). :func:`read_status` decodes both back (``complete`` as a bool, the record as a dict).

With ``output_options.max_error`` > 0 (the default) the cube is error-bounded (:class:`Quantiser`):
quantised to a step just under ``2 · max_error``, predicted from its upper and left neighbours in each
band, and blosc-compressed, all as stock zarr v3 + numcodecs codecs, so readers need nothing of ours.
This module encodes those chunks itself (:mod:`pipeline.residuals`: one numba pass on the host, or
torch on the device of a tensor region, then blosc on a thread pool) and stores their bytes: about 6x faster than
zarr's own encoder, which cannot encode this chain at all (its numcodecs filters hand the
next codec a flat array, so the second transpose fails); zarr decodes it.

``output_options.layout = "sharded"`` stores the same chunks in zarr v3 ``sharding_indexed`` shards, one
object per tile core (:func:`shard_shape`: the image when it runs whole): fewer, larger objects for object
stores. A tile writes whole shards only, so regions still never share an object; error-bounded shards are
assembled here (:func:`assemble_shard`: the encoded chunks, then their ``(offset, nbytes)`` index with its
crc32c, as the spec lays it out) and read by stock zarr.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import re
import threading
import unicodedata
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
import zarr.codecs
import zarr.codecs.numcodecs
from anyascii import anyascii
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline import preview, residuals, storage
from pipeline.config import OutputSpec, TilingSpec
from pipeline.errors import GroupCollisionError, InputError, PipelineError

__all__ = [
    "CUBES_DIR",
    "ATTR",
    "CONVENTIONS",
    "open_cubes",
    "group_path",
    "check_owner",
    "sanitize_component",
    "create_cube",
    "write_region",
    "write_regions",
    "mark_complete",
    "read_status",
    "consolidate_archives",
    "codecs_for",
    "Quantiser",
    "encode_chunk",
    "warm_encoder",
    "shard_shape",
    "stored_objects",
    "assemble_shard",
    "ForeignGroupError",
]

CUBES_DIR = "cubes.zarr"
ATTR = "drcr_pipeline"
"""Group attribute holding the provenance record (a JSON string); ``complete`` (0/1) sits beside it."""

CONVENTIONS = "CF-1.10"

GROUP_ATTRS = {
    "Conventions": CONVENTIONS,
    "title": "Hyperspectral cube (31 bands, 400-700 nm) reconstructed from an RGB image",
    "source": "DRCR Net (Li et al., CVPR Workshops 2022) spectral reconstruction of an RGB photograph",
    "references": "J. Li et al., Dense Residual Channel Re-calibration Network (DRCR Net) for Spectral "
    "Reconstruction, CVPRW 2022, doi:10.1109/CVPRW56347.2022.00094; https://github.com/jojolee6513/DRCR-net",
}
"""CF global attributes of every cube group (``history`` is added per cube)."""

CUBE_ATTRS = {
    "long_name": "relative spectral radiance reconstructed from RGB",
    "units": "1",
    "comment": "DRCR Net output for the image divided by its own maximum: dimensionless, on the scale of the "
    "training data (nominally 0-1), unclipped; the absolute exposure is unknown (see the provenance's qa "
    "exposure_scale)",
}

WAVELENGTH_ATTRS = {
    "standard_name": "radiation_wavelength",
    "long_name": "band centre wavelength",
    "units": "nm",
}


class ForeignGroupError(PipelineError, RuntimeError):
    """A group's provenance record belongs to another run."""


def open_cubes(output: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = False) -> Store:
    """The zarr store of ``<output>/cubes.zarr``."""
    return storage.open_store(storage.join(output, CUBES_DIR), storage_options, read_only=read_only)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

DIGEST_HEX = 16
"""Hex digits of the input-id digest ending each group name: 64 bits. With 32 bits two member names that
sanitise alike and share the suffix were found in 0.8 s (issue 15); :func:`check_owner` catches the rest."""
MAX_COMPONENT = 120
"""Longest group path component in bytes (file systems allow 255; names are ASCII after sanitising)."""


def sanitize_component(name: str) -> str:
    """One path component → ``[A-Za-z0-9._-]+``, readable: non-Latin scripts transliterated (``東京`` →
    ``DongJing``, anyascii), accents stripped, other runs become ``_``; never empty, ``.``/``..``, hidden
    (leading ``.``) or starting with ``_`` (``__`` is reserved by zarr v3); at most :data:`MAX_COMPONENT`
    bytes, a longer one cut and ended with a digest of the whole name so cut names stay apart."""
    text = anyascii(unicodedata.normalize("NFC", storage.readable(name)))
    s = _UNSAFE.sub("_", text).strip("_") or "_"
    if set(s) <= {"."}:
        s = s.replace(".", "_")
    if s.startswith(("_", ".")):
        s = "x" + s
    if len(s) > MAX_COMPONENT:
        s = f"{s[: MAX_COMPONENT - DIGEST_HEX - 1]}-{_digest(name)}"
    return s


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_HEX]


def group_path(source: str, member: str | None, key: str) -> str:
    """Deterministic, sanitised group path for an input: ``<source basename>/<member dirs>/<name>-<digest>``.

    The suffix is 64 bits of the sha256 of ``key`` (the input's unique id), so different inputs do not share
    a group when their sanitised names collide (duplicate members, unicode names); the group records its
    key and :func:`check_owner` refuses to reuse a group of another input. Components are sanitised one by
    one and ``..``/absolute parts dropped, so a path can never leave the output prefix.
    """
    parts = [sanitize_component(source.rstrip("/").rsplit("/", 1)[-1])]
    if member is not None:
        parts += [sanitize_component(p) for p in member.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts[-1] = f"{parts[-1]}-{_digest(key)}"
    return "/".join(parts)


# --- error-bounded storage ------------------------------------------------------------------------
_U32 = 2.0**-24  # float32 unit roundoff
_MARGIN = 2.0**-6  # share of max_error kept for float32 rounding; costs log2(64/63) = 0.02 bit per value
_MIN_INT16_RANGE = 4.0  # model outputs of photos lie in about [-0.1, 1.5]; narrower int16 ranges use int32
_BLOSC: dict[str, Any] = {"cname": "zstd", "clevel": 1, "blocksize": 1 << 20}
"""zstd-1 on bit planes, 1 MiB blocks: 7.1 MB per MP at 5e-4, as small as pcodec and 4x faster
(benchmarks/bench_output.py)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantiser:
    """Error-bounded storage of float32 values: ``q = rint(x · scale)`` as ``dtype``; decoded by numcodecs'
    ``FixedScaleOffset`` as ``float32(q / scale)``.

    The bound ``|decoded − x| ≤ max_error`` holds for every ``|x| ≤ limit``, guaranteed: ``0.5 / scale``
    is ``max_error · (1 − 2⁻⁶)``, and ``x · scale`` in float32, its rounding and the decode's float32
    rounding add at most ``2 · 2⁻²⁴ · |x| ≤ max_error · 2⁻⁶`` on top, which sets ``limit`` (also kept
    inside the integer type). NaN, ±inf and values beyond ``limit`` cannot be stored: the write fails.

    Args:
        max_error: the bound, absolute, in the cube's units (> 0).
    """

    max_error: float
    scale: float = 0.0
    dtype: str = ""
    limit: float = 0.0

    def __post_init__(self) -> None:
        e = float(self.max_error)
        # scale is a float32 so that the float32 multiply uses exactly the scale the decoder divides by.
        scale = float(np.float32(1.0 / (2.0 * e * (1.0 - _MARGIN))))
        float_limit = 0.9 * e * _MARGIN / (2.0 * _U32)
        int16_limit = 32766.0 / scale  # rint(x · scale) ≤ 32766.5 → |q| ≤ 32767 even when it rounds up
        dtype, int_limit = ("<i2", int16_limit) if int16_limit >= _MIN_INT16_RANGE else ("<i4", (2**31 - 2) / scale)
        object.__setattr__(self, "max_error", e)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "limit", float(min(float_limit, int_limit)))

    @property
    def step(self) -> float:
        """Quantisation step (cube units): just under ``2 · max_error``."""
        return 1.0 / self.scale

    def filters(self) -> list[Any]:
        """The zarr array-to-array codecs: quantise, then ``q[y, x] − q[y−1, x]`` (a delta along y, under
        a transpose), then the delta along x; together the residual of the planar predictor
        ``q[y−1, x] + q[y, x−1] − q[y−1, x−1]`` in each band. Spatial, not spectral: on model outputs
        the residual of a delta across bands takes 6–7 bits per value, this one 1.3–1.8
        (benchmarks/bench_output.py)."""
        nc = zarr.codecs.numcodecs
        with warnings.catch_warnings():
            # Numcodecs codecs are outside the zarr v3 spec; stock zarr-python and numcodecs decode them.
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            return [
                nc.FixedScaleOffset(offset=0, scale=self.scale, dtype="<f4", astype=self.dtype),
                zarr.codecs.TransposeCodec(order=(0, 2, 1)),
                nc.Delta(dtype=self.dtype),
                zarr.codecs.TransposeCodec(order=(0, 2, 1)),
                nc.Delta(dtype=self.dtype),
            ]

    def compressor(self) -> Any:
        return zarr.codecs.BloscCodec(shuffle="bitshuffle", typesize=np.dtype(self.dtype).itemsize, **_BLOSC)

    def attributes(self) -> dict[str, Any]:
        """What the cube's attributes record (and what :meth:`from_attributes` reads back); ``quantisation`` is
        one JSON string, as netCDF attributes cannot nest."""
        return {
            "max_abs_error": self.max_error,
            "quantisation": json.dumps(
                {
                    "scale": self.scale,
                    "step": self.step,
                    "dtype": self.dtype,
                    "range": [-self.limit, self.limit],
                    "predictor": "planar: q[y-1,x] + q[y,x-1] - q[y-1,x-1], per band",
                    "codec": f"blosc {_BLOSC['cname']}-{_BLOSC['clevel']} bitshuffle",
                },
                sort_keys=True,
            ),
        }

    @classmethod
    def from_attributes(cls, attrs: Mapping[str, Any]) -> Quantiser | None:
        """The quantiser of a cube array with these attributes, or ``None`` for a float cube."""
        e = attrs.get("max_abs_error")
        return cls(max_error=float(e)) if e else None


def quantiser_for(spec: OutputSpec) -> Quantiser | None:
    return Quantiser(max_error=spec.max_error) if spec.max_error > 0 else None


def _check_range(quant: Quantiser, block: np.ndarray, where: str) -> None:
    """Raise the ``InputError`` that names what in ``block`` cannot be stored (NaN, ±inf, beyond the
    range); return when all of it is within the range."""
    if float(block.min()) >= -quant.limit and float(block.max()) <= quant.limit:  # NaN fails both
        return
    finite = block[np.isfinite(block)]
    bad = int(block.size - finite.size)
    span = f"[{finite.min():.4g}, {finite.max():.4g}]" if finite.size else "none"
    raise InputError(
        f"{where}: model output {'has ' + str(bad) + ' NaN/inf values, ' if bad else ''}finite values {span}; "
        f"output_options.max_error = {quant.max_error:g} stores values in ±{quant.limit:.4g} only "
        "(max_error = 0 stores float16)"
    )


_scratch = threading.local()

FUSED: bool | None = None
"""Encode with :func:`pipeline.residuals.fused_residual` (numba) when true, with the numpy band slabs
(:func:`pipeline.residuals.chunk_residual`) when false; ``None``: fused where numba is installed. Both
store the same bytes."""


def _fused() -> bool:
    return residuals.fused_available() if FUSED is None else FUSED


def _residual(block: np.ndarray, quant: Quantiser, shape: tuple[int, ...], bound: float) -> np.ndarray:
    """The chunk's integers (:mod:`pipeline.residuals`) in this thread's reusable buffers (fresh
    multi-MB arrays would cost a page fault per 4 KiB on every chunk); valid until its next call here."""
    fused = _fused()
    key = (shape, quant.dtype, fused)
    if getattr(_scratch, "key", None) != key:
        _scratch.key = key
        if fused:
            _scratch.bufs = (np.empty(shape[1:], quant.dtype), np.empty(shape, quant.dtype))
        else:
            slab = (min(residuals._slab_bands(shape), shape[0]), *shape[1:])
            _scratch.bufs = (np.empty(slab, np.float32), *(np.empty(shape, quant.dtype) for _ in range(3)))
    bufs = _scratch.bufs
    if fused:
        return residuals.fused_residual(block, quant.scale, bound, *bufs)
    return residuals.chunk_residual(block, quant.scale, bound, bufs)


_COMPRESSOR = numcodecs.Blosc(shuffle=numcodecs.Blosc.BITSHUFFLE, **_BLOSC)
"""Called from the encode pool's threads only, so numcodecs takes blosc's single-threaded context
call: blosc's own thread pool (numcodecs' choice in the main thread) costs more CPU per chunk."""


def warm_encoder(spec: OutputSpec) -> None:
    """Compile (or load from numba's cache) the host encoder for the spec's integer type now, so that a
    predictor's first write does not wait seconds for it; a no-op for float cubes or without numba."""
    quant = quantiser_for(spec)
    if quant is not None and _fused():
        _residual(np.zeros((1, 1, 1), np.float32), quant, (1, 1, 1), math.inf)


def compress_residual(residual: np.ndarray) -> bytes:
    """The stored bytes of a chunk's integers (:mod:`pipeline.residuals`): blosc zstd-1, bit shuffle."""
    return bytes(_COMPRESSOR.encode(np.ascontiguousarray(residual)))


def encode_chunk(quant: Quantiser, block: np.ndarray, chunk_shape: Sequence[int], where: str = "cube") -> bytes:
    """The stored bytes of one chunk: ``block`` (bands × h × w float32, h, w ≤ the chunk's) quantised,
    padded to ``chunk_shape`` by repeating its last row and column, predicted and compressed.

    Raises:
        InputError: ``block`` has NaN/inf or values beyond ``quant.limit`` (``where`` names the cube).
    """
    shape = tuple(chunk_shape)
    try:
        residual = _residual(block, quant, shape, quant.limit * quant.scale)
    except residuals.OutOfRange:
        # |x| ≤ limit can round to |x · scale| a hair past the bound; the integer type's margin holds it.
        _check_range(quant, block, where)
        residual = _residual(block, quant, shape, math.inf)
    return compress_residual(residual)


@functools.cache
def _encode_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="drcr-encode")


def shard_shape(height: int, width: int, spec: OutputSpec, tiling: TilingSpec) -> tuple[int, int] | None:
    """The spatial shape of the cube's shards (``None`` in the chunked layout): a tile core
    (``tiling.tile_core``, a multiple of the chunk), or the whole image when it runs as one tile; both
    rounded up to whole chunks and never past the image's last chunk."""
    if spec.layout != "sharded":
        return None
    cy, cx = min(spec.chunk, height), min(spec.chunk, width)
    full_y, full_x = -(-height // cy) * cy, -(-width // cx) * cx
    if height * width <= tiling.max_tile_pixels:
        return full_y, full_x
    return min(tiling.tile_core, full_y), min(tiling.tile_core, full_x)


def stored_objects(height: int, width: int, spec: OutputSpec, tiling: TilingSpec) -> int:
    """Objects under ``cube/c/`` of a complete cube: one per chunk, or one per shard in the sharded layout."""
    if height < 1 or width < 1:
        return 0
    shard = shard_shape(height, width, spec, tiling)
    sy, sx = shard if shard is not None else (min(spec.chunk, height), min(spec.chunk, width))
    return -(-height // sy) * -(-width // sx)


def _check_regions(arr: Any, path: str, regions: Sequence[tuple[int, int, Any]]) -> None:
    """Each region must cover whole stored objects (chunks, or shards when sharded), or end at the image's
    border: then no two writers ever share an object."""
    _, height, width = arr.shape
    _, oy, ox = arr.shards or arr.chunks
    for y0, x0, data in regions:
        bands, h, w = data.shape
        if bands != arr.shape[0] or y0 % oy or x0 % ox or (h % oy and y0 + h != height) or (w % ox and x0 + w != width):
            kind = "shards" if arr.shards else "chunks"
            raise ValueError(
                f"{path}: region {tuple(data.shape)} at ({y0}, {x0}) does not cover whole {kind} {(oy, ox)}"
            )


ChunkIndex = tuple[int, int]
"""A chunk's (row, column) in the cube's chunk grid."""


def _chunk_blocks(arr: Any, regions: Sequence[tuple[int, int, np.ndarray]]) -> Iterator[tuple[ChunkIndex, np.ndarray]]:
    """``(chunk index, block)`` for every chunk the regions cover (checked by :func:`_check_regions`)."""
    _, cy, cx = arr.chunks
    for y0, x0, data in regions:
        _, h, w = data.shape
        for yy in range(0, h, cy):
            for xx in range(0, w, cx):
                yield ((y0 + yy) // cy, (x0 + xx) // cx), data[:, yy : yy + cy, xx : xx + cx]


def _device_residuals(
    arr: Any, quant: Quantiser, path: str, regions: Sequence[tuple[int, int, Any]]
) -> Iterator[tuple[ChunkIndex, np.ndarray]]:
    """``(chunk index, integers)`` for every chunk of regions held as torch tensors: quantised and predicted
    on the tensors' device (:func:`pipeline.residuals.region_residuals`), one copy back per region, of
    int16 (half the float32's bytes)."""
    _, cy, cx = arr.chunks
    for y0, x0, data in regions:
        try:
            res = residuals.region_residuals(data, quant.scale, quant.limit * quant.scale, arr.chunks, quant.dtype)
        except residuals.OutOfRange:
            host = data.float().cpu().numpy()
            _check_range(quant, host, path)  # raises unless every |x| ≤ limit (then the host encodes it)
            yield from _chunk_residuals(arr, quant, [(y0, x0, host)])
            continue
        chunks = res.cpu().numpy()
        for iy in range(chunks.shape[0]):
            for ix in range(chunks.shape[1]):
                yield (y0 // cy + iy, x0 // cx + ix), chunks[iy, ix]


def _chunk_residuals(
    arr: Any, quant: Quantiser, regions: Sequence[tuple[int, int, np.ndarray]]
) -> Iterator[tuple[ChunkIndex, np.ndarray]]:
    shape = tuple(arr.chunks)
    for index, block in _chunk_blocks(arr, regions):
        yield index, _residual(block, quant, shape, math.inf).copy()


_EMPTY = np.iinfo(np.uint64).max
"""Offset and size of an absent chunk in a shard's index (zarr v3 ``sharding_indexed``)."""


def assemble_shard(blobs: Sequence[Sequence[bytes | None]]) -> bytes:
    """One ``sharding_indexed`` shard (``index_location = "end"``, index codecs ``bytes`` little-endian +
    ``crc32c``) from its encoded inner chunks, ``blobs[row][column]`` (``None``: absent, e.g. past the image's
    border): the chunks back to back, then the ``(offset, nbytes)`` uint64 pair of each chunk in C order, then
    the index's crc32c as a little-endian uint32."""
    rows, cols = len(blobs), len(blobs[0])
    index = np.full((1, rows, cols, 2), _EMPTY, dtype="<u8")
    parts, offset = [], 0
    for j, row in enumerate(blobs):
        for i, blob in enumerate(row):
            if blob is None:
                continue
            index[0, j, i] = offset, len(blob)
            parts.append(blob)
            offset += len(blob)
    raw = index.tobytes()
    return b"".join([*parts, raw, np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()])


def _objects(arr: Any, path: str, encoded: Mapping[tuple[int, int], bytes]) -> list[tuple[str, bytes]]:
    """The store items of encoded chunks: one per chunk, or one shard per shard they fill."""
    if not arr.shards:
        return [(f"{path}/cube/{arr.metadata.encode_chunk_key((0, j, i))}", b) for (j, i), b in encoded.items()]
    _, cy, cx = arr.chunks
    _, sy, sx = arr.shards
    ny, nx = sy // cy, sx // cx
    out = []
    for sj, si in sorted({(j // ny, i // nx) for j, i in encoded}):
        blobs = [[encoded.get((sj * ny + j, si * nx + i)) for i in range(nx)] for j in range(ny)]
        out.append((f"{path}/cube/{arr.metadata.encode_chunk_key((0, sj, si))}", assemble_shard(blobs)))
    return out


async def _put(store: Store, items: Sequence[tuple[str, bytes]]) -> None:
    proto = default_buffer_prototype()
    await asyncio.gather(*(store.set(key, proto.buffer.from_bytes(blob)) for key, blob in items))


def _write_quantised(
    store: Store, arr: Any, quant: Quantiser, path: str, regions: Sequence[tuple[int, int, Any]], threads: int
) -> None:
    """Encode on ``threads`` pool threads (never the caller's: see :data:`_COMPRESSOR`), then store one
    object per chunk, or per shard in the sharded layout."""
    pool = _encode_pool(max(1, threads))
    host = [r for r in regions if isinstance(r[2], np.ndarray)]
    device = [r for r in regions if not isinstance(r[2], np.ndarray)]
    shape = arr.chunks

    def encode(item: tuple[ChunkIndex, np.ndarray]) -> tuple[ChunkIndex, bytes]:
        return item[0], encode_chunk(quant, item[1], shape, where=path)

    def compress(item: tuple[ChunkIndex, np.ndarray]) -> tuple[ChunkIndex, bytes]:
        return item[0], compress_residual(item[1])

    encoded = dict(pool.map(encode, _chunk_blocks(arr, host)))
    encoded.update(pool.map(compress, _device_residuals(arr, quant, path, device)))
    sync(_put(store, _objects(arr, path, encoded)))


def check_owner(attrs: Mapping[str, Any] | None, path: str, key: str) -> None:
    """Refuse to use group ``path`` for input ``key`` when the group records another input's key (a digest
    collision, or an output prefix shared with an incompatible layout): the other cube is never overwritten.

    Raises:
        GroupCollisionError: naming both inputs.
    """
    record = (attrs or {}).get(ATTR) or {}
    owner = record.get("source", {}).get("key") if isinstance(record, Mapping) else None
    mine = storage.readable(storage.redact(key))
    if owner is not None and owner != mine:
        raise GroupCollisionError(
            f"{mine}: group name {path!r} collides with the cube of {owner!r}; not overwriting it "
            f"(rename one input or use another output prefix)"
        )


def codecs_for(spec: OutputSpec) -> list[Any]:
    """zarr v3 compressors for an output spec."""
    quant = quantiser_for(spec)
    if quant is not None:
        return [quant.compressor()]
    if spec.compressor == "none":
        return []
    if spec.compressor == "zstd":
        return [zarr.codecs.ZstdCodec(level=spec.level)]
    if spec.compressor == "gzip":
        return [zarr.codecs.GzipCodec(level=min(spec.level, 9))]
    cname: Any = spec.compressor.split("-", 1)[1]
    typesize = 2 if spec.dtype == "float16" else 4
    return [zarr.codecs.BloscCodec(cname=cname, clevel=min(spec.level, 9), shuffle="shuffle", typesize=typesize)]


def create_cube(
    store: Store,
    path: str,
    *,
    height: int,
    width: int,
    bands_nm: Sequence[float],
    spec: OutputSpec,
    provenance: Mapping[str, Any],
    tiling: TilingSpec | None = None,
) -> None:
    """Create (or recreate, dropping anything there) the group, its ``cube`` and ``wavelength`` arrays.

    ``complete`` is false until :func:`mark_complete`. Chunks are ``(bands, chunk, chunk)``: a pixel's
    whole spectrum is in one chunk; in the sharded layout they are stored in shards of
    :func:`shard_shape` (``tiling``: the job's, default :class:`TilingSpec`). The ``preview`` child group
    (:mod:`pipeline.preview`) is created too.

    The provenance record (``ATTR``, with the run id) is written last, so a group that has it was created
    whole: a prepare task killed part-way through (its node died) leaves a group without it, and the retry
    of the same run recreates the group instead of keeping it with a missing array or wavelength chunk.
    """
    group = zarr.create_group(store, path=path, overwrite=True, attributes={"complete": 0})
    chunk = (len(bands_nm), min(spec.chunk, height), min(spec.chunk, width))
    quant = quantiser_for(spec)
    shard = shard_shape(height, width, spec, tiling or TilingSpec())
    cube = group.create_array(
        "cube",
        shape=(len(bands_nm), height, width),
        chunks=chunk,
        shards=(len(bands_nm), *shard) if shard else None,
        dtype="float32" if quant else spec.dtype,
        filters=quant.filters() if quant else None,
        compressors=codecs_for(spec),
        fill_value=np.nan,
        dimension_names=("wavelength", "y", "x"),
        attributes=dict(CUBE_ATTRS) | (quant.attributes() if quant else {}),
    )
    del cube
    wl = group.create_array(
        "wavelength",
        shape=(len(bands_nm),),
        dtype="float32",
        compressors=None,
        dimension_names=("wavelength",),
        attributes=dict(WAVELENGTH_ATTRS),
    )
    wl[:] = np.asarray(bands_nm, dtype=np.float32)
    preview.create_preview(group, height=height, width=width, chunk=spec.chunk)
    started = provenance.get("started") or ""
    history = f"{started} drcr-pipeline {provenance.get('job', {}).get('run_id', '')}: created".strip()
    group.attrs.put(
        GROUP_ATTRS | {"history": history, ATTR: _encode(storage.readable_tree(dict(provenance))), "complete": 0}
    )


def _encode(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False, default=str)


def _decode(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Group attributes with ``complete`` as a bool and the provenance record as a dict."""
    out = dict(attrs)
    if "complete" in out:
        out["complete"] = bool(out["complete"])
    if isinstance(out.get(ATTR), str):
        out[ATTR] = json.loads(out[ATTR])
    return out


def write_region(store: Store, path: str, y0: int, x0: int, data: np.ndarray) -> None:
    """Write ``data`` (bands × h × w float32) at rows ``y0..``, cols ``x0..`` of the group's ``cube``.

    Regions must cover whole chunks, or whole shards in the sharded layout (or end at the image border),
    so that no two writers share a stored object.
    """
    write_regions(store, path, [(y0, x0, data)])


def _open_cube(store: Store, path: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)  # numcodecs filters: see Quantiser.filters
        return zarr.open_array(store, path=f"{path}/cube", mode="r+")


def write_regions(store: Store, path: str, regions: Sequence[tuple[int, int, Any]], *, threads: int = 1) -> None:
    """:func:`write_region` for several ``(y0, x0, data)`` regions of one cube, opening the array once
    (one metadata read per batch instead of one per tile). An error-bounded cube's chunks are encoded on
    ``threads`` threads (the caller's CPUs) and stored concurrently.

    ``data`` is a numpy array, or a torch tensor (bands × h × w, any device): an error-bounded cube's
    tensor regions are quantised and predicted on their device and copied back as integers, so the host
    only compresses them (the GPU path; the same bytes as from the numpy array).

    Raises:
        InputError: an error-bounded cube got NaN/inf or values beyond its range (nothing is written
            for the chunk; the cube is never marked complete).
    """
    arr = _open_cube(store, path)
    _check_regions(arr, path, regions)
    quant = Quantiser.from_attributes(arr.attrs)
    if quant is not None:
        _write_quantised(store, arr, quant, path, regions, threads)
        return
    for y0, x0, data in regions:
        if not isinstance(data, np.ndarray):
            data = data.cpu().numpy()
        if data.dtype != arr.dtype:
            data = data.astype(arr.dtype)
        arr[:, y0 : y0 + data.shape[1], x0 : x0 + data.shape[2]] = data


def mark_complete(store: Store, path: str, extra: Mapping[str, Any], *, run_id: str | None = None) -> None:
    """Write the completion marker last: provenance updated with ``extra`` and ``complete = true``
    in one rewrite of the group's ``zarr.json``.

    With ``run_id``, a group whose provenance record names another run is refused (``ForeignGroupError``):
    a run never marks complete a cube another run recreated (issue 12: two runs on one output)."""
    group = zarr.open_group(store, path=path, mode="r+")
    attrs = _decode(group.attrs)
    record: dict[str, Any] = dict(attrs.get(ATTR, {}))
    owner = record.get("job", {}).get("run_id")
    if run_id is not None and owner != run_id:
        raise ForeignGroupError(f"{path}: the cube belongs to run {owner}, not {run_id}; not marked complete")
    record.update(extra)
    history = str(attrs.get("history", ""))
    finished = f"{record.get('finished', '')} drcr-pipeline {record.get('job', {}).get('run_id', '')}: completed"
    group.attrs.update({ATTR: _encode(record), "history": f"{history}\n{finished.strip()}".strip(), "complete": 1})


def read_status(store: Store, path: str) -> dict[str, Any] | None:
    """The group's attributes (``complete`` as a bool, the provenance record ``ATTR`` as a dict), or ``None``
    when there is no such group."""
    try:
        group = zarr.open_group(store, path=path, mode="r")
    except (
        FileNotFoundError,
        KeyError,
        ValueError,
        zarr.errors.GroupNotFoundError,
        zarr.errors.NodeTypeValidationError,
    ):
        return None
    return _decode(group.attrs)


def consolidate_archives(store: Store, groups: Sequence[str]) -> list[str]:
    """Consolidate the metadata of each archive group (the first component of ``groups``' paths), so opening
    an archive's tree (``xarray.open_datatree(..., engine="zarr")``) reads one document instead of listing
    every node. Run after the run's completion markers: a later write makes it stale until the next run
    consolidates again. Returns the archive groups consolidated."""
    import warnings

    archives = sorted({g.split("/", 1)[0] for g in groups if g})
    for archive in archives:
        with warnings.catch_warnings():
            # zarr-python's consolidated metadata is an extension of the v3 spec (readers without it list nodes)
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            zarr.consolidate_metadata(store, path=archive)
    return archives

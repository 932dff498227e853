"""The zarr v3 output: one group per input image under ``<output>/cubes.zarr``.

Distributed writes follow xarray's recipe: the group and its arrays' metadata are written once
(:func:`create_cube`), then each tile writes its own region (:func:`write_region`), regions never sharing
a chunk, and a completion marker is written last (:func:`mark_complete`). A group without
``complete = true`` in its attributes is never reported as done, and unwritten chunks read as NaN.

Each group holds ``cube`` (bands × y × x, float16 by default) with ``dimension_names``
``("wavelength", "y", "x")`` and a ``wavelength`` coordinate in nm, so ``xarray.open_zarr(store,
group=...)`` and ``xarray.open_datatree(root, engine="zarr")`` just work.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.abc.store import Store

from pipeline import storage
from pipeline.config import OutputSpec
from pipeline.errors import PipelineError

__all__ = [
    "CUBES_DIR",
    "ATTR",
    "open_cubes",
    "group_path",
    "sanitize_component",
    "create_cube",
    "write_region",
    "write_regions",
    "mark_complete",
    "read_status",
    "codecs_for",
    "ForeignGroupError",
]

CUBES_DIR = "cubes.zarr"
ATTR = "drcr_pipeline"
"""Group attribute holding the provenance record; ``complete`` sits beside it."""


class ForeignGroupError(PipelineError, RuntimeError):
    """A group's provenance record belongs to another run."""


def open_cubes(output: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = False) -> Store:
    """The zarr store of ``<output>/cubes.zarr``."""
    return storage.open_store(storage.join(output, CUBES_DIR), storage_options, read_only=read_only)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_component(name: str) -> str:
    """One path component → ``[A-Za-z0-9._-]+``: accents stripped, other runs become ``_``; never
    empty, ``.``/``..`` or starting with ``__`` (reserved by zarr v3)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    s = _UNSAFE.sub("_", ascii_name).strip("_") or "_"
    if set(s) <= {"."}:
        s = s.replace(".", "_")
    if s.startswith("_"):
        s = "x" + s
    return s


def group_path(source: str, member: str | None, key: str) -> str:
    """Deterministic, sanitised group path for an input: ``<source basename>/<member dirs>/<name>-<hash8>``.

    The 8-hex suffix is the sha1 of ``key`` (the input's unique id), so different inputs never share a
    group even when their sanitised names collide (duplicate members, unicode names). Components are
    sanitised one by one and ``..``/absolute parts dropped, so a path can never leave the output prefix.
    """
    parts = [sanitize_component(source.rstrip("/").rsplit("/", 1)[-1])]
    if member is not None:
        parts += [sanitize_component(p) for p in member.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    parts[-1] = f"{parts[-1]}-{digest}"
    return "/".join(parts)


def codecs_for(spec: OutputSpec) -> list[Any]:
    """zarr v3 compressors for an output spec."""
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
) -> None:
    """Create (or recreate, dropping anything there) the group, its ``cube`` and ``wavelength`` arrays.

    ``complete`` is false until :func:`mark_complete`. Chunks are ``(bands, chunk, chunk)``: a pixel's
    whole spectrum is in one chunk.

    The provenance record (``ATTR``, with the run id) is written last, so a group that has it was created
    whole: a prepare task killed part-way through (its node died) leaves a group without it, and the retry
    of the same run recreates the group instead of keeping it with a missing array or wavelength chunk.
    """
    group = zarr.create_group(store, path=path, overwrite=True, attributes={"complete": False})
    chunk = (len(bands_nm), min(spec.chunk, height), min(spec.chunk, width))
    cube = group.create_array(
        "cube",
        shape=(len(bands_nm), height, width),
        chunks=chunk,
        dtype=spec.dtype,
        compressors=codecs_for(spec),
        fill_value=np.nan,
        dimension_names=("wavelength", "y", "x"),
        attributes={"long_name": "spectral reconstruction", "units": "1 (relative radiance, model output)"},
    )
    del cube
    wl = group.create_array(
        "wavelength",
        shape=(len(bands_nm),),
        dtype="float32",
        compressors=None,
        dimension_names=("wavelength",),
        attributes={"units": "nm", "long_name": "band centre wavelength"},
    )
    wl[:] = np.asarray(bands_nm, dtype=np.float32)
    group.attrs.put({ATTR: dict(provenance), "complete": False})


def write_region(store: Store, path: str, y0: int, x0: int, data: np.ndarray) -> None:
    """Write ``data`` (bands × h × w) at rows ``y0..``, cols ``x0..`` of the group's ``cube``.

    Regions must cover whole chunks (or end at the image border) so that no two writers share a chunk.
    """
    arr = zarr.open_array(store, path=f"{path}/cube", mode="r+")
    if data.dtype != arr.dtype:
        data = data.astype(arr.dtype)
    arr[:, y0 : y0 + data.shape[1], x0 : x0 + data.shape[2]] = data


def write_regions(store: Store, path: str, regions: Sequence[tuple[int, int, np.ndarray]]) -> None:
    """:func:`write_region` for several ``(y0, x0, data)`` regions of one cube, opening the array once
    (one metadata read per batch instead of one per tile)."""
    arr = zarr.open_array(store, path=f"{path}/cube", mode="r+")
    for y0, x0, data in regions:
        if data.dtype != arr.dtype:
            data = data.astype(arr.dtype)
        arr[:, y0 : y0 + data.shape[1], x0 : x0 + data.shape[2]] = data


def mark_complete(store: Store, path: str, extra: Mapping[str, Any], *, run_id: str | None = None) -> None:
    """Write the completion marker last: provenance updated with ``extra`` and ``complete = true``
    in one rewrite of the group's ``zarr.json``.

    With ``run_id``, a group whose provenance record names another run is refused (``ForeignGroupError``):
    a run never marks complete a cube another run recreated (issue 12: two runs on one output)."""
    group = zarr.open_group(store, path=path, mode="r+")
    record: dict[str, Any] = dict(group.attrs.get(ATTR, {}))  # type: ignore[arg-type]
    owner = record.get("job", {}).get("run_id")
    if run_id is not None and owner != run_id:
        raise ForeignGroupError(f"{path}: the cube belongs to run {owner}, not {run_id}; not marked complete")
    record.update(extra)
    group.attrs.update({ATTR: record, "complete": True})


def read_status(store: Store, path: str) -> dict[str, Any] | None:
    """The group's attributes (``complete``, provenance), or ``None`` when there is no such group."""
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
    return dict(group.attrs)

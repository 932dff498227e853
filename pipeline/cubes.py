"""The zarr v3 output: one group per input image under ``<output>/cubes.zarr``.

Distributed writes follow xarray's recipe: the group and its arrays' metadata are written once
(:func:`create_cube`), then each tile writes its own region (:func:`write_region`), regions never sharing
a chunk, and a completion marker is written last (:func:`mark_complete`). A group without
``complete = true`` in its attributes is never reported as done, and unwritten chunks read as NaN.

Each group holds ``cube`` (bands × y × x, float16 by default) with ``dimension_names``
``("wavelength", "y", "x")`` and a ``wavelength`` coordinate in nm, so ``xarray.open_zarr(store,
group=...)`` and ``xarray.open_datatree(root, engine="zarr")`` just work.

Attributes follow the CF conventions (:data:`CONVENTIONS`) and stay netCDF-valid, so an opened group goes
straight to ``ds.to_netcdf()``: ``complete`` is an integer (0/1) and the provenance record one JSON string
(``ATTR``). :func:`read_status` decodes both back (``complete`` as a bool, the record as a dict).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.abc.store import Store

from pipeline import preview, storage
from pipeline.config import OutputSpec

__all__ = [
    "CUBES_DIR",
    "ATTR",
    "CONVENTIONS",
    "open_cubes",
    "group_path",
    "sanitize_component",
    "create_cube",
    "write_region",
    "write_regions",
    "mark_complete",
    "read_status",
    "consolidate_archives",
    "codecs_for",
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
    whole spectrum is in one chunk. The ``preview`` child group (:mod:`pipeline.preview`) is created too.

    The provenance record (``ATTR``, with the run id) is written last, so a group that has it was created
    whole: a prepare task killed part-way through (its node died) leaves a group without it, and the retry
    of the same run recreates the group instead of keeping it with a missing array or wavelength chunk.
    """
    group = zarr.create_group(store, path=path, overwrite=True, attributes={"complete": 0})
    chunk = (len(bands_nm), min(spec.chunk, height), min(spec.chunk, width))
    cube = group.create_array(
        "cube",
        shape=(len(bands_nm), height, width),
        chunks=chunk,
        dtype=spec.dtype,
        compressors=codecs_for(spec),
        fill_value=np.nan,
        dimension_names=("wavelength", "y", "x"),
        attributes=dict(CUBE_ATTRS),
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
    group.attrs.put(GROUP_ATTRS | {"history": history, ATTR: _encode(provenance), "complete": 0})


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


def mark_complete(store: Store, path: str, extra: Mapping[str, Any]) -> None:
    """Write the completion marker last: provenance updated with ``extra`` and ``complete = true``
    in one rewrite of the group's ``zarr.json``."""
    group = zarr.open_group(store, path=path, mode="r+")
    attrs = _decode(group.attrs)
    record: dict[str, Any] = dict(attrs.get(ATTR, {}))
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

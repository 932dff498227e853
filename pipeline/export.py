"""Cubes out to the tools hyperspectral users already have: netCDF, ENVI and TIFF files, one per cube.

* ``netcdf``: ``<name>.nc`` (netCDF-4 via xarray + h5netcdf), float32, the group's CF attributes and its
  provenance JSON; opens with ``xarray.open_dataset`` / netCDF4 / Panoply.
* ``envi``: ``<name>.hdr`` + ``<name>.img`` (band sequential float32, ``wavelength`` and
  ``wavelength units = Nanometers`` in the header); opens with Spectral Python (``spectral.open_image``),
  ENVI, QGIS/GDAL.
* ``tiff``: ``<name>.tif`` (bands × y × x float32, the band centres in the description tag as JSON, deflate);
  opens with tifffile, rasterio/GDAL, napari.

Which cubes: every cube of the output, whichever run made it (the catalog,
:func:`pipeline.catalog.cube_records`), optionally filtered by ``where``, a pandas query on the manifest's
columns (``"qa_backprojection_mrae < 0.3 and width >= 64"``); a cube no longer complete (being redone) is
skipped with a warning. Files are named after the group path (``/`` → ``__``). Needs the ``outputs`` extra
(xarray, pandas, h5netcdf, spectral, tifffile).

Memory: every format is written a region at a time, never a whole cube (a 1 GP cube is 124 GB as float32):
ENVI and netCDF read each zarr chunk (all bands × ``chunk``²) once; TIFF stores its bands one after another
(``planarconfig=separate``), so it reads a chunk once per band: for big cubes it is the slow one (31 chunk
decodes per chunk). Files over 2 GiB uncompressed are BigTIFF.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import cubes, qa, storage
from pipeline.catalog import cube_records
from pipeline.errors import ConfigError
from pipeline.stac import item_id

__all__ = ["FORMATS", "select_rows", "export_cubes"]

log = logging.getLogger(__name__)

FORMATS = ("netcdf", "envi", "tiff")


def select_rows(
    output: str, where: str | None, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The output's cubes (:func:`pipeline.catalog.cube_records`) matching ``where`` (a pandas
    ``DataFrame.query`` expression on their columns)."""
    import pandas as pd

    records = cube_records(output, storage_options)
    if not records:
        return []
    df = pd.DataFrame.from_records(records)
    for col in ("width", "height", "source_bytes", *(c for c in qa.MANIFEST_FIELDS if c != "qa_flags")):
        df[col] = pd.to_numeric(df[col])  # a column of unknowns (None) compares as NaN, not as objects
    if where:
        try:
            df = df.query(where)
        except Exception as exc:  # pandas raises many types for a bad expression (syntax, name, type)
            raise ConfigError(
                f'--where {where!r}: {exc}; use manifest columns, e.g. "qa_backprojection_mrae < 0.3"'
            ) from exc
    return df.to_dict("records")


def export_cubes(
    output: str,
    fmt: str,
    *,
    dest: str | None = None,
    where: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Export the selected cubes of ``output`` to ``dest`` (default ``<output>/export/<fmt>``); returns the
    URLs of the files written."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}: must be one of {FORMATS}")
    dest = dest or storage.join(output, "export", fmt)
    store = cubes.open_cubes(output, storage_options, read_only=True)
    writer = _WRITERS[fmt]
    fs, base = storage.open_fs(dest, storage_options)
    fs.makedirs(base, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="drcr-export-") as tmp:
        for row in select_rows(output, where, storage_options):
            if not (cubes.read_status(store, row["group"]) or {}).get("complete"):
                log.warning("%s: not complete (being redone?); not exported", row["group"])
                continue
            name = item_id(row["group"])
            files = writer(store, row["group"], Path(tmp) / name)
            for f in files:
                fs.put_file(str(f), f"{base.rstrip('/')}/{f.name}")
                written.append(storage.join(dest, f.name))
                f.unlink()
            log.info("exported %s as %s", row["group"], fmt)
    return written


def _file(stem: Path, ext: str) -> Path:
    """``stem`` + ``ext`` (group names hold dots, so not ``Path.with_suffix``)."""
    return stem.parent / (stem.name + ext)


def _arrays(store: Any, group: str) -> tuple[zarr.Array, list[float]]:
    """The group's ``cube`` array (not read) and its band centres in nm."""
    cube = zarr.open_array(store, path=f"{group}/cube", mode="r")
    wl = zarr.open_array(store, path=f"{group}/wavelength", mode="r")
    return cube, [float(v) for v in np.asarray(wl[:])]


def _chunks(cube: zarr.Array) -> Iterator[tuple[slice, slice]]:
    """``(rows, columns)`` of each of the cube's chunks, in row-major order."""
    _, h, w = cube.shape
    _, ch, cw = cube.chunks
    for y0 in range(0, h, ch):
        for x0 in range(0, w, cw):
            yield slice(y0, min(h, y0 + ch)), slice(x0, min(w, x0 + cw))


def _netcdf(store: Any, group: str, stem: Path) -> list[Path]:
    """xarray writes everything but the cube (coordinates, CF attributes, provenance); the cube variable is
    then added through h5netcdf and filled chunk by chunk: xarray without dask would load it whole."""
    import h5netcdf.legacyapi as nc
    import xarray as xr

    ds = xr.open_zarr(store, group=group, consolidated=False)
    var = ds["cube"]
    path = _file(stem, ".nc")
    ds.drop_vars("cube").to_netcdf(path, engine="h5netcdf")
    cube = zarr.open_array(store, path=f"{group}/cube", mode="r")
    with nc.Dataset(path, "a") as f:
        for dim, n in zip(var.dims, var.shape):
            if dim not in f.dimensions:
                f.createDimension(dim, n)
        out = f.createVariable(
            "cube",
            "f4",  # netCDF-4 has no float16
            var.dims,
            zlib=True,
            complevel=4,
            chunksizes=tuple(int(c) for c in cube.chunks),
            fill_value=np.float32(np.nan),
        )
        out.attrs.update({k: v for k, v in var.attrs.items() if k != "_FillValue"})
        for rows, cols in _chunks(cube):
            out[:, rows, cols] = np.asarray(cube[:, rows, cols], dtype=np.float32)
    return [path]


def _envi(store: Any, group: str, stem: Path) -> list[Path]:
    import spectral.io.envi as envi

    cube, wl = _arrays(store, group)
    bands, h, w = cube.shape
    meta = {
        "description": f"drcr-pipeline cube {group}",
        "wavelength": wl,
        "wavelength units": "Nanometers",
        "band names": [f"{v:g} nm" for v in wl],
        "data ignore value": "nan",
    }
    hdr = _file(stem, ".hdr")
    img = envi.create_image(str(hdr), meta, shape=(h, w, bands), dtype=np.float32, interleave="bsq", ext=".img")
    mm = img.open_memmap(interleave="source", writable=True)  # bands × rows × cols for BSQ
    for rows, cols in _chunks(cube):  # one chunk at a time: a chunk row of a 1 GP cube is 1 GB as float32
        mm[:, rows, cols] = np.asarray(cube[:, rows, cols], dtype=np.float32)
    mm.flush()
    del mm
    return [hdr, _file(stem, ".img")]


def _tiff(store: Any, group: str, stem: Path) -> list[Path]:
    import tifffile

    cube, wl = _arrays(store, group)
    bands, h, w = cube.shape
    side = -(-max(int(cube.chunks[1]), int(cube.chunks[2])) // 16) * 16  # TIFF tiles: multiples of 16

    def tiles() -> Iterator[np.ndarray]:  # band by band, as planarconfig=separate stores them
        for b in range(bands):
            for y0 in range(0, h, side):
                for x0 in range(0, w, side):
                    yield np.asarray(cube[b, y0 : y0 + side, x0 : x0 + side], dtype=np.float32)

    path = _file(stem, ".tif")
    description = json.dumps({"wavelength_nm": wl, "units": "1", "source": f"drcr-pipeline cube {group}"})
    tifffile.imwrite(
        path,
        tiles(),
        shape=(bands, h, w),
        dtype="float32",
        tile=(side, side),
        bigtiff=bands * h * w * 4 > 2**31,
        photometric="minisblack",
        planarconfig="separate",
        compression="zlib",  # deflate: every TIFF reader has it
        description=description,
        metadata=None,
    )
    return [path]


_WRITERS: dict[str, Callable[[Any, str, Path], list[Path]]] = {"netcdf": _netcdf, "envi": _envi, "tiff": _tiff}

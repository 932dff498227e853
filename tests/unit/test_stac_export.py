"""STAC catalog (pipeline.stac) and exports (pipeline.export), each round-tripped with the library users open
it with: pystac (core schema validated, datacube read back), xarray/h5netcdf, Spectral Python, tifffile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pystac
import pytest
import xarray as xr
from outputs_run import SIZES, make_output
from pystac.extensions.datacube import DatacubeExtension

from pipeline import cubes, export, stac
from pipeline.errors import ConfigError

BANDS = [float(b) for b in range(400, 701, 10)]


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_output(tmp_path_factory.mktemp("stac"))


def _cube(output: str, group: str) -> np.ndarray:
    return xr.open_zarr(cubes.open_cubes(output), group=group, consolidated=False).cube.values.astype(np.float32)


def test_stac_collection_and_items_validate(output: str) -> None:
    url = stac.write_catalog(output)
    collection = pystac.Collection.from_file(url)
    stac.validate(collection)
    items = list(collection.get_items())
    assert len(items) == len(SIZES)
    for item in items:
        stac.validate(item)
        dc = DatacubeExtension.ext(item)
        assert dc.dimensions["wavelength"].dim_type == "spectral"
        assert dc.dimensions["wavelength"].to_dict()["values"] == BANDS
        assert dc.variables is not None and dc.variables["cube"].dimensions == ["wavelength", "y", "x"]
        assert item.properties["drcr:qa_backprojection_mrae"] > 0
        href = item.assets["cube"].get_absolute_href()
        assert href is not None and Path(href).is_dir()  # relative links resolve to the zarr group
        ds = xr.open_zarr(href, consolidated=False)
        assert ds.cube.shape == (31, item.properties["drcr:height"], item.properties["drcr:width"])
        assert Path(item.assets["thumbnail"].get_absolute_href() or "").read_bytes()[:4] == b"\x89PNG"


def test_stac_validation_catches_a_bad_item(output: str) -> None:
    d = json.loads(Path(stac.write_catalog(output)).read_text())
    item_href = next(link["href"] for link in d["links"] if link["rel"] == "item")
    bad = json.loads((Path(output) / "stac" / item_href).read_text())
    del bad["properties"]["datetime"]
    with pytest.raises(pystac.errors.STACValidationError):
        stac.validate(bad)


def test_netcdf_round_trip(output: str, tmp_path: Path) -> None:
    files = export.export_cubes(output, "netcdf", dest=str(tmp_path))
    assert len(files) == len(SIZES)
    for f in files:
        ds = xr.open_dataset(f, engine="h5netcdf")
        group = _group_of(output, ds)
        np.testing.assert_array_equal(ds.cube.values, _cube(output, group))
        assert ds.wavelength.values.tolist() == BANDS and ds.wavelength.attrs["standard_name"] == "radiation_wavelength"
        assert ds.attrs["Conventions"].startswith("CF-")


def _group_of(output: str, ds: xr.Dataset) -> str:
    sha = json.loads(ds.attrs[cubes.ATTR])["source"]["sha256"]
    rows = export.select_rows(output, None)
    return next(r["group"] for r in rows if r["source_sha256"] == sha)


def test_envi_round_trip_with_spectral(output: str, tmp_path: Path) -> None:
    import spectral

    files = export.export_cubes(output, "envi", dest=str(tmp_path), where="width == 64")
    assert [Path(f).suffix for f in files] == [".hdr", ".img"]
    img = spectral.open_image(files[0])
    assert [float(b) for b in img.bands.centers] == BANDS and img.bands.band_unit == "Nanometers"
    (row,) = export.select_rows(output, "width == 64")
    want = _cube(output, row["group"])
    np.testing.assert_array_equal(img.load().transpose(2, 0, 1), want)  # rows × cols × bands in SPy


def test_tiff_round_trip_with_tifffile(output: str, tmp_path: Path) -> None:
    import tifffile

    files = export.export_cubes(output, "tiff", dest=str(tmp_path), where="qa_backprojection_mrae >= 0")
    assert len(files) == len(SIZES)
    rows = {stac.item_id(r["group"]): r for r in export.select_rows(output, None)}
    for f in files:
        with tifffile.TiffFile(f) as tif:
            data = tif.asarray()
            meta = json.loads(tif.pages[0].description)
        group = rows[Path(f).name.removesuffix(".tif")]["group"]
        np.testing.assert_array_equal(data, _cube(output, group))
        assert meta["wavelength_nm"] == BANDS


def test_where_selects_and_bad_where_is_a_config_error(output: str, tmp_path: Path) -> None:
    assert len(export.select_rows(output, "height > 45")) == 2
    assert export.export_cubes(output, "tiff", dest=str(tmp_path), where="width > 10000") == []
    with pytest.raises(ConfigError, match="--where 'no_such_column > 1'"):
        export.select_rows(output, "no_such_column > 1")
    with pytest.raises(ConfigError, match="format 'jpeg'"):
        export.export_cubes(output, "jpeg")


def test_item_id_of_a_deep_long_group_fits_a_file_name() -> None:
    from pipeline import cubes, stac

    group = "/".join(["d" * 120, "n" * 120, "m" * 110 + "-0123456789abcdef"])
    ids = {stac.item_id(group), stac.item_id(group.replace("m", "k"))}
    assert len(ids) == 2 and all(len(i) <= cubes.MAX_COMPONENT for i in ids)
    assert stac.item_id("a.tar/img.png-0123") == "a.tar__img.png-0123"


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_exports_read_the_cube_a_chunk_at_a_time(
    output: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """No format reads a whole cube, nor a whole chunk row (a 1 GP cube: 124 GB, a chunk row of it 1 GB):
    every read of the cube is at most one chunk, all bands × chunk², and together they cover it."""
    import zarr

    reads: list[int] = []
    opened = zarr.open_array

    class Counting:
        def __init__(self, arr: zarr.Array, is_cube: bool) -> None:
            self.arr, self.is_cube, self.shape, self.chunks = arr, is_cube, arr.shape, arr.chunks

        def __getitem__(self, key: object) -> np.ndarray:
            out = np.asarray(self.arr[key])  # type: ignore[index]
            if self.is_cube:
                reads.append(out.size)
            return out

    def counting(*args: object, **kwargs: object) -> Counting:
        return Counting(opened(*args, **kwargs), str(kwargs.get("path", "")).endswith("/cube"))  # type: ignore[arg-type]

    monkeypatch.setattr(export.zarr, "open_array", counting)
    files = export.export_cubes(output, fmt, dest=str(tmp_path), where="width == 64")
    assert files
    (row,) = export.select_rows(output, "width == 64")
    chunk = 31 * 16 * 16  # outputs_run: output_options.chunk = 16
    assert reads and max(reads) <= chunk < row["height"] * row["width"] * 31
    assert sum(reads) >= 31 * row["height"] * row["width"]

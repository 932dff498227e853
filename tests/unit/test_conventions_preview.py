"""CF conventions of the cube groups (netCDF-valid attributes, to_netcdf works), consolidated metadata, and
the preview pyramid (pipeline.preview): rendering checked on spectra whose colour is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import cubes, preview
from pipeline.config import OutputSpec

BANDS = list(range(400, 701, 10))


def _cube(tmp_path, h=20, w=24, chunk=8):  # type: ignore[no-untyped-def]
    store = cubes.open_cubes(str(tmp_path))
    prov = {"source": {"sha256": "x"}, "job": {"run_id": "run-1"}, "started": "2026-12-01T00:00:00Z"}
    cubes.create_cube(
        store, "a.tar/img-1", height=h, width=w, bands_nm=BANDS, spec=OutputSpec(chunk=chunk), provenance=prov
    )
    data = np.random.default_rng(0).random((31, h, w)).astype(np.float32)
    cubes.write_region(store, "a.tar/img-1", 0, 0, data)
    cubes.mark_complete(store, "a.tar/img-1", {"finished": "2026-12-01T00:01:00Z", "nested": {"a": [1, 2]}})
    return store, data


def test_cf_attributes_and_to_netcdf(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, data = _cube(tmp_path)
    ds = xr.open_zarr(store, group="a.tar/img-1", consolidated=False)
    assert ds.attrs["Conventions"] == cubes.CONVENTIONS
    for key in ("title", "source", "history", "references"):
        assert ds.attrs[key], key
    assert "created" in ds.attrs["history"] and "completed" in ds.attrs["history"]
    assert ds.cube.attrs["units"] == "1" and ds.cube.attrs["long_name"] and ds.cube.attrs["comment"]
    assert ds.wavelength.attrs["standard_name"] == "radiation_wavelength" and ds.wavelength.attrs["units"] == "nm"
    record = json.loads(ds.attrs[cubes.ATTR])  # one flat JSON string
    assert record["nested"] == {"a": [1, 2]} and record["source"]["sha256"] == "x"
    status = cubes.read_status(store, "a.tar/img-1")
    assert status is not None and status["complete"] is True and status[cubes.ATTR]["finished"].startswith("2026")
    out = tmp_path / "c.nc"
    ds.to_netcdf(out, engine="h5netcdf")  # the issue: nested attributes and booleans made this fail
    back = xr.open_dataset(out, engine="h5netcdf")
    np.testing.assert_array_equal(back.cube.values, ds.cube.values)  # what zarr decodes, bit for bit
    assert json.loads(back.attrs[cubes.ATTR]) == record and back.wavelength.attrs["units"] == "nm"


def test_units_parse_with_pint() -> None:
    import pint

    assert pint.UnitRegistry()(cubes.CUBE_ATTRS["units"]).dimensionless


def test_consolidated_archive_group_opens_as_a_tree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, _ = _cube(tmp_path)
    assert cubes.consolidate_archives(store, ["a.tar/img-1", "a.tar/img-1"]) == ["a.tar"]
    g = zarr.open_group(store, path="a.tar", mode="r", use_consolidated=True)
    assert g.metadata.consolidated_metadata is not None
    assert "img-1/cube" in g.metadata.consolidated_metadata.flattened_metadata
    tree = xr.open_datatree(str(tmp_path / "cubes.zarr" / "a.tar"), engine="zarr", consolidated=True)
    assert tree["img-1"].dataset.cube.shape == (31, 20, 24)
    assert tree["img-1/preview"].dataset["0"].shape == (3, 20, 24)
    # the cube group still opens alone, its preview child group does not get in the way
    assert set(xr.open_zarr(store, group="a.tar/img-1", consolidated=False).data_vars) == {"cube"}


def test_render_known_spectra() -> None:
    white = np.ones((31, 2, 2), np.float32)
    grey = np.full((31, 2, 2), 0.18, np.float32)
    assert (preview.render_srgb(white, BANDS) >= 254).all()  # a perfect reflector under D65 is sRGB white
    g = preview.render_srgb(grey, BANDS)
    assert np.ptp(g) <= 1 and 116 <= int(g[0, 0, 0]) <= 120  # 18 % grey: sRGB ≈ 118, neutral
    red = np.zeros((31, 1, 1), np.float32)
    red[-8:] = 0.8  # long wavelengths only
    r = preview.render_srgb(red, BANDS)[:, 0, 0]
    assert r[0] > 100 and r[0] > 3 * max(r[1], r[2])
    nan = np.full((31, 1, 1), np.nan, np.float32)
    assert (preview.render_srgb(nan, BANDS) == 0).all()


def test_downsample_partial_blocks() -> None:
    img = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    d = preview.downsample(img, 2)
    assert d.shape == (2, 3, 2)
    assert d[0, 0, 0] == pytest.approx(img[0, :2, :2].mean()) and d[0, 2, 1] == pytest.approx(img[0, 4, 2])


def test_tiled_preview_equals_whole_preview(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Written core by core (as the predictor does), every level equals rendering the whole cube at once."""
    from pipeline.tiling import plan_tiles

    h, w, chunk = 40, 52, 8
    store = cubes.open_cubes(str(tmp_path))
    cubes.create_cube(store, "g", height=h, width=w, bands_nm=BANDS, spec=OutputSpec(chunk=chunk), provenance={})
    rng = np.random.default_rng(1)
    data = rng.random((31, h, w)).astype(np.float32)
    rgb = rng.random((3, h, w)).astype(np.float32)
    tiles = plan_tiles(h, w, max_tile_pixels=16, tile_core=16, halo=4)
    regions = [(t.core_y0, t.core_x0, data[:, ys, xs], rgb[:, ys, xs]) for t in tiles for ys, xs in [t.core_slices]]
    for i in range(0, len(regions), 3):
        preview.write_preview_regions(store, "g", regions[i : i + 3], BANDS)
    lin = preview.render_linear(data, BANDS)
    for k in range(preview.LEVELS):
        got = zarr.open_array(store, path=f"g/preview/{k}", mode="r")[:]
        want = preview.encode_srgb(preview.downsample(lin, 2**k))
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, k  # float summation order only
    small = zarr.open_array(store, path="g/preview/input", mode="r")[:]
    assert small.shape == (3, 10, 13)
    png = preview.thumbnail_png(store, "g", max_side=8)
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and max(im.size) == 8


def test_thumbnail_of_a_large_preview_reads_it_by_strips(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Past THUMBNAIL_OVERSAMPLE × max_side the array is read a strip at a time (a 1 GP cube's coarsest level is
    8000²), and the thumbnail is still the picture: within rounding of Lanczos on the whole array."""
    import io

    from PIL import Image

    h, w, max_side = 1100, 700, 64
    yy, xx = np.mgrid[0:h, 0:w]
    picture = np.stack([yy * 255 / h, xx * 255 / w, 128 + 100 * np.sin(yy / 90.0) * np.cos(xx / 70.0)])
    picture = np.round(picture).astype(np.uint8)
    store = cubes.open_cubes(str(tmp_path))
    group = zarr.create_group(store, path="g/preview")
    group.create_array("2", shape=picture.shape, chunks=(3, 64, 64), dtype="uint8")[:] = picture
    rows_read: list[int] = []
    opened = zarr.open_array

    class Counting:
        def __init__(self, arr):  # type: ignore[no-untyped-def]
            self.arr, self.shape, self.chunks = arr, arr.shape, arr.chunks

        def __getitem__(self, key):  # type: ignore[no-untyped-def]
            out = self.arr[key]
            rows_read.append(out.shape[1])
            return out

    monkeypatch.setattr(preview.zarr, "open_array", lambda *a, **k: Counting(opened(*a, **k)))
    got = np.asarray(Image.open(io.BytesIO(preview.thumbnail_png(store, "g", max_side=max_side))), dtype=int)
    assert len(rows_read) > 1 and max(rows_read) <= 2 * 64  # strips, never the whole array
    whole = Image.fromarray(np.ascontiguousarray(picture.transpose(1, 2, 0)))
    whole.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    want = np.asarray(whole, dtype=int)
    assert got.shape == want.shape == (64, 41, 3)
    assert np.abs(got - want).mean() < 1.5 and np.abs(got - want).max() <= 12

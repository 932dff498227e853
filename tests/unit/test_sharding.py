"""The sharded layout (``output_options.layout = "sharded"``): a zarr v3 ``sharding_indexed`` shard per tile
core, for both storage codecs, read back by stock zarr/xarray; the shard bytes we assemble are the bytes zarr
writes itself; regions that would split a shard are refused; resume counts shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import cubes
from pipeline.catalog import CatalogRow
from pipeline.config import JobSpec, OutputSpec, TilingSpec
from pipeline.errors import ConfigError
from pipeline.incremental import ChunkCounts, expected_chunks

BANDS = list(range(400, 701, 10))
TILED = TilingSpec(max_tile_pixels=1000, tile_core=32, halo=8)


def _write(store, spec: OutputSpec, tiling: TilingSpec, data: np.ndarray, core: int) -> None:  # type: ignore[no-untyped-def]
    """Create the cube and write it core by core, as the actors do (``core``: the tile core, or the image)."""
    _, h, w = data.shape
    cubes.create_cube(store, "g", height=h, width=w, bands_nm=BANDS, spec=spec, provenance={}, tiling=tiling)
    regions = [(y, x, data[:, y : y + core, x : x + core]) for y in range(0, h, core) for x in range(0, w, core)]
    cubes.write_regions(store, "g", regions, threads=2)


def _objects(root: Path) -> list[Path]:
    return sorted(p for p in (root / "g" / "cube" / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("max_error", [5e-4, 0.0])
@pytest.mark.parametrize(
    ("shape", "tiling", "core", "shards"),
    [
        ((100, 70), TILED, 32, 4 * 3),  # tiled: a shard per 32² core, edge shards part-empty
        ((40, 50), TilingSpec(), 10**6, 1),  # one tile: the whole image is one shard
    ],
)
def test_sharded_cube_reads_back_with_stock_xarray(tmp_path: Path, max_error, shape, tiling, core, shards) -> None:  # type: ignore[no-untyped-def]
    h, w = shape
    data = np.random.default_rng(1).normal(0.4, 0.2, (31, h, w)).astype(np.float32)
    spec = OutputSpec(chunk=16, max_error=max_error, layout="sharded")
    store = cubes.open_cubes(str(tmp_path))
    _write(store, spec, tiling, data, core)
    assert len(_objects(tmp_path / "cubes.zarr")) == shards == cubes.stored_objects(h, w, spec, tiling)
    arr = zarr.open_array(store, path="g/cube", mode="r")
    assert arr.chunks == (31, 16, 16) and arr.shards == (31, *cubes.shard_shape(h, w, spec, tiling))  # type: ignore[misc]
    got = xr.open_zarr(store, group="g", consolidated=False).cube.values.astype(np.float32)
    if max_error:
        assert float(np.abs(got - data).max()) <= max_error
    else:
        np.testing.assert_array_equal(got, data.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("max_error", [5e-4, 0.0])
def test_sharded_and_chunked_store_the_same_values(tmp_path: Path, max_error: float) -> None:
    data = np.random.default_rng(2).normal(0.4, 0.2, (31, 72, 64)).astype(np.float32)
    out = {}
    for layout in ("chunked", "sharded"):
        store = cubes.open_cubes(str(tmp_path / layout))
        _write(store, OutputSpec(chunk=16, max_error=max_error, layout=layout), TILED, data, 32)
        out[layout] = zarr.open_array(store, path="g/cube", mode="r")[:]
    np.testing.assert_array_equal(out["chunked"], out["sharded"])
    assert len(_objects(tmp_path / "chunked" / "cubes.zarr")) == 5 * 4
    assert len(_objects(tmp_path / "sharded" / "cubes.zarr")) == 3 * 2


def test_assembled_shard_is_byte_identical_to_zarrs_own(tmp_path: Path) -> None:
    """zarr writes a shard (float32, no compressor); the same inner chunks through :func:`assemble_shard`
    give the same bytes: chunk order, index pairs, empty entries and the index's crc32c."""
    arr = zarr.create_array(
        zarr.storage.LocalStore(tmp_path),
        shape=(2, 40, 40),
        chunks=(2, 16, 16),
        shards=(2, 32, 32),
        dtype="float32",
        compressors=None,
        fill_value=np.nan,
    )
    arr[:, 32:40, 0:32] = np.arange(2 * 8 * 32, dtype=np.float32).reshape(2, 8, 32)  # an edge shard: 2 of 4 chunks
    stored = (tmp_path / "c" / "0" / "1" / "0").read_bytes()
    index = np.frombuffer(stored[-4 - 4 * 16 : -4], "<u8").reshape(2, 2, 2)
    blobs = [[None if o == 2**64 - 1 else stored[o : o + n] for o, n in row] for row in index]
    assert blobs[1] == [None, None] and all(b is not None for b in blobs[0])
    assert cubes.assemble_shard(blobs) == stored


def test_a_region_that_splits_a_shard_is_refused(tmp_path: Path) -> None:
    store = cubes.open_cubes(str(tmp_path))
    spec = OutputSpec(chunk=16, layout="sharded")
    cubes.create_cube(store, "g", height=64, width=64, bands_nm=BANDS, spec=spec, provenance={}, tiling=TILED)
    with pytest.raises(ValueError, match=r"does not cover whole shards \(32, 32\)"):
        cubes.write_region(store, "g", 0, 16, np.zeros((31, 16, 16), np.float32))  # a whole chunk, half a shard
    assert _objects(tmp_path / "cubes.zarr") == []


def test_resume_counts_shards_and_finds_a_missing_one(tmp_path: Path) -> None:
    data = np.random.default_rng(3).normal(0.4, 0.2, (31, 100, 70)).astype(np.float32)
    spec = OutputSpec(chunk=16, layout="sharded")
    _write(cubes.open_cubes(str(tmp_path)), spec, TILED, data, 32)
    n = expected_chunks(100, 70, spec, TILED)
    assert n == 12 and expected_chunks(100, 70, OutputSpec(chunk=16), TILED) == 7 * 5
    row = CatalogRow(input="k", cube_url="file:///x", group="g", source="file:///in", chunks=n)
    assert ChunkCounts(str(tmp_path)).counts() == {"g": n} and ChunkCounts(str(tmp_path)).intact(row)
    _objects(tmp_path / "cubes.zarr")[5].unlink()
    assert not ChunkCounts(str(tmp_path)).intact(row)


def test_layout_is_validated_and_in_the_fingerprint() -> None:
    with pytest.raises(ConfigError, match="output_options.layout"):
        OutputSpec(layout="tiled")
    spec = JobSpec(inputs=["a"], output="o")
    assert spec.output_options.layout == "chunked"
    sharded = spec.with_overrides({"output_options.layout": "sharded"})
    assert sharded.fingerprint("w") != spec.fingerprint("w")
    assert spec.with_overrides({"output_options.layout": "chunked"}).fingerprint("w") == spec.fingerprint("w")
    again = JobSpec.from_dict(__import__("tomllib").loads(sharded.to_toml()))
    assert again.output_options.layout == "sharded" and again.fingerprint("w") == sharded.fingerprint("w")


def test_tensor_regions_store_the_same_shards_as_numpy_regions(tmp_path: Path) -> None:
    """The device encoder (torch regions: quantised and predicted on their device) feeds the same shard
    assembly as the host encoder: byte-identical shard files."""
    import torch

    data = np.random.default_rng(3).normal(0.4, 0.2, (31, 72, 64)).astype(np.float32)
    spec = OutputSpec(chunk=16, max_error=5e-4, layout="sharded")
    _write(cubes.open_cubes(str(tmp_path / "host")), spec, TILED, data, 32)
    _write(cubes.open_cubes(str(tmp_path / "dev")), spec, TILED, torch.from_numpy(data), 32)  # type: ignore[arg-type]
    host, dev = _objects(tmp_path / "host" / "cubes.zarr"), _objects(tmp_path / "dev" / "cubes.zarr")
    assert len(host) == 3 * 2
    assert [p.read_bytes() for p in dev] == [p.read_bytes() for p in host]

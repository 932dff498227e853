"""Error-bounded cubes (``output_options.max_error``): the bound is a guarantee, read back through stock zarr.

Every check decodes with zarr's own codec pipeline (``zarr.open_array(...)[:]``), never with our encoder's
helpers, and compares with the float32 values written: ``max |decoded − x| ≤ max_error``, with no slack.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from pipeline import cubes, residuals
from pipeline.config import JobSpec, OutputSpec
from pipeline.errors import ConfigError, InputError

BANDS = list(range(400, 701, 10))
ERRORS = [1e-5, 6e-5, 1e-4, 5e-4, 1e-3, 0.1]
NUMBA = pytest.mark.skipif("not __import__('pipeline.residuals').residuals.fused_available()", reason="needs numba")


@pytest.fixture(params=[pytest.param("fused", marks=NUMBA), "numpy"])
def host_encoder(request, monkeypatch):  # type: ignore[no-untyped-def]
    """The host encoder the writes use: numba's one pass (the default), or numpy's band slabs (where
    numba is not installed); both must keep the bound, and store the same bytes."""
    monkeypatch.setattr(cubes, "FUSED", request.param == "fused")
    return request.param


def _round_trip(tmp_path, data: np.ndarray, max_error: float, chunk: int, threads: int = 1) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Write ``data`` (bands × H × W float32) as one error-bounded cube, region by region of ``chunk``
    multiples as the actors do, and read it back with zarr."""
    store = cubes.open_cubes(str(tmp_path))
    _, h, w = data.shape
    spec = OutputSpec(max_error=max_error, chunk=chunk)
    cubes.create_cube(store, "g", height=h, width=w, bands_nm=BANDS[: data.shape[0]], spec=spec, provenance={})
    core = 2 * chunk
    regions = [(y, x, data[:, y : y + core, x : x + core]) for y in range(0, h, core) for x in range(0, w, core)]
    cubes.write_regions(store, "g", regions, threads=threads)
    back = zarr.open_array(store, path="g/cube", mode="r")[:]
    assert back.dtype == np.float32 and back.shape == data.shape
    return back


def _hostile_values(q: cubes.Quantiser, rng: np.random.Generator, n: int) -> np.ndarray:
    """Values where rounding is worst: halfway between steps, exact multiples of the bound and of the
    step, ±the range limit, zero and negative zero, tiny and large magnitudes, negatives."""
    k = rng.integers(-int(q.limit * q.scale) + 1, int(q.limit * q.scale) - 1, n)
    e = q.max_error
    picks = [
        (k + 0.5) / q.scale,  # halfway: the largest rounding error
        k * q.step,
        np.clip(k * e, -q.limit, q.limit),
        np.nextafter((k + 0.5) / q.scale, np.inf),
        np.full(n, q.limit),
        np.full(n, -q.limit),
        rng.uniform(-q.limit, q.limit, n),
        rng.uniform(-1e-6, 1e-6, n),
        np.zeros(n),
        -np.zeros(n),
    ]
    lim = np.float32(q.limit)
    lim = lim if float(lim) <= q.limit else np.nextafter(lim, np.float32(0))  # the largest float32 inside the range
    return np.clip(np.concatenate(picks).astype(np.float32), -lim, lim)


@pytest.mark.parametrize("max_error", ERRORS)
def test_bound_holds_on_hostile_and_random_values(tmp_path, max_error: float, host_encoder: str) -> None:  # type: ignore[no-untyped-def]
    q = cubes.Quantiser(max_error=max_error)
    rng = np.random.default_rng(int(max_error * 1e6))
    vals = _hostile_values(q, rng, 31 * 20 * 20 // 11 + 1)
    data = rng.permutation(np.resize(vals, 31 * 20 * 22)).reshape(31, 20, 22)
    back = _round_trip(tmp_path, data, max_error, chunk=8)
    err = np.abs(back.astype(np.float64) - data.astype(np.float64))
    assert err.max() <= max_error, (err.max(), data.flat[err.argmax()])
    assert err.max() > 0.9 * max_error  # the halfway values do use the error budget: the test can fail


@pytest.mark.parametrize(
    "shape,chunk",
    [((31, 1, 1), 4), ((31, 1, 9), 4), ((31, 9, 1), 4), ((31, 5, 7), 4), ((31, 33, 17), 16), ((2, 12, 12), 4)],
)
def test_bound_holds_for_odd_shapes_and_edge_chunks(tmp_path, shape, chunk, host_encoder) -> None:  # type: ignore[no-untyped-def]
    data = np.random.default_rng(1).normal(0.4, 0.3, shape).astype(np.float32)
    back = _round_trip(tmp_path, data, 5e-4, chunk=chunk)
    assert np.abs(back - data).max() <= 5e-4


def test_bound_holds_on_model_output_of_scenes_and_photos(tmp_path, host_encoder) -> None:  # type: ignore[no-untyped-def]
    """Real-like cubes: a synthetic scene (measured spectra) and a demo photo through the default weights."""
    from drcr_model.camera import simulate_rgb
    from drcr_model.inference import reconstruct
    from drcr_model.scenes import SceneConfig, make_scene
    from drcr_model.weights import default_weights
    from pipeline.sample import sample_image

    model = default_weights().load(device="cpu")
    scene = simulate_rgb(make_scene(7, SceneConfig(height=72, width=88)), npe=750, jpeg_quality=65, seed=7)
    photo = sample_image(np.random.default_rng(3), 64, 80)
    for i, rgb in enumerate([scene, photo]):
        cube = np.ascontiguousarray(reconstruct(rgb, model, mode="pad").transpose(2, 0, 1))
        for max_error in (1e-4, 5e-4, 1e-3):
            back = _round_trip(tmp_path / f"{i}-{max_error}", cube, max_error, chunk=16, threads=2)
            assert np.abs(back - cube).max() <= max_error


def test_threads_write_the_same_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = np.random.default_rng(2).random((31, 40, 40)).astype(np.float32)
    one = _round_trip(tmp_path / "1", data, 5e-4, chunk=8, threads=1)
    two = _round_trip(tmp_path / "2", data, 5e-4, chunk=8, threads=3)
    np.testing.assert_array_equal(one, two)
    files = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("c/*/*/*"))
    assert len(files) == 25
    assert all((tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes() for f in files)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 40.0, -1e30])
def test_unstorable_values_fail_the_write_and_leave_the_chunk_unwritten(tmp_path, bad: float, host_encoder) -> None:  # type: ignore[no-untyped-def]
    """NaN, ±inf and values beyond the range cannot be stored within the bound: the write raises an
    ``InputError`` naming the cube (the image is recorded as failed, never complete); the chunk stays
    unwritten, so it reads as NaN, never as wrong numbers."""
    store = cubes.open_cubes(str(tmp_path))
    cubes.create_cube(
        store, "a/img", height=8, width=16, bands_nm=BANDS, spec=OutputSpec(max_error=5e-4, chunk=8), provenance={}
    )
    data = np.full((31, 8, 16), 0.5, np.float32)
    data[3, 2, 11] = bad
    with pytest.raises(InputError, match=r"a/img: model output .*max_error = 0.0005 stores values in ±32.25"):
        cubes.write_region(store, "a/img", 0, 0, data)
    back = zarr.open_array(store, path="a/img/cube", mode="r")[:]
    assert np.isnan(back[:, :, 8:]).all()
    assert cubes.read_status(store, "a/img")["complete"] is False


@NUMBA
@pytest.mark.parametrize("max_error", [5e-5, 5e-4, 0.1])
@pytest.mark.parametrize(
    "shape,chunk",
    [((31, 256, 256), (256, 256)), ((31, 100, 37), (256, 256)), ((31, 1, 1), (4, 4)), ((3, 3, 1), (4, 4)), ((2, 5, 7), (8, 8))],
)
def test_fused_encoder_gives_numpys_integers(shape, chunk, max_error: float) -> None:
    """The one-pass numba encoder and numpy's band slabs give the same integers for every layout the write
    path hands them: views into a larger region (strided rows and bands), Fortran order, float64, partial
    (padded) chunks and int32 quantisers; and both refuse a value beyond the range."""
    q = cubes.Quantiser(max_error=max_error)
    rng = np.random.default_rng(11)
    nb, h, w = shape
    big = rng.permutation(np.resize(_hostile_values(q, rng, 500), nb * (h + 3) * (w + 5))).reshape(nb, h + 3, w + 5)
    full = (nb, *chunk)
    slab = (min(residuals._slab_bands(full), nb), *chunk)
    bufs = (np.empty(slab, np.float32), *(np.empty(full, q.dtype) for _ in range(3)))
    bound = q.limit * q.scale
    views = [big[:, 2 : 2 + h, 3 : 3 + w], np.ascontiguousarray(big[:, :h, :w]), np.asfortranarray(big[:, :h, :w])]
    views.append(big[:, :h, :w].astype(np.float64))
    for block in views:
        ref = residuals.chunk_residual(block.astype(np.float32), q.scale, bound, bufs).copy()
        band, out = np.full(chunk, 7, q.dtype), np.full(full, 7, q.dtype)
        got = residuals.fused_residual(block, q.scale, bound, band, out)
        assert got is out and got.dtype == np.dtype(q.dtype)
        np.testing.assert_array_equal(got, ref)
    bad = np.ascontiguousarray(big[:, :h, :w])
    bad[-1, -1, -1] = np.nextafter(np.float32(q.limit * 1.001), np.float32(np.inf))
    with pytest.raises(residuals.OutOfRange):
        residuals.fused_residual(bad, q.scale, bound, band, out)
    with pytest.raises(residuals.OutOfRange):
        residuals.chunk_residual(bad, q.scale, bound, bufs)


@NUMBA
def test_warm_encoder_compiles_the_kernel_for_the_specs_type() -> None:
    kernel = residuals._fused_kernel()
    before = len(kernel.signatures)
    cubes.warm_encoder(OutputSpec(max_error=0))  # float16 cube: nothing to compile
    assert len(kernel.signatures) == before
    for max_error, dtype in ((5e-4, np.int16), (1e-5, np.int32)):
        cubes.warm_encoder(OutputSpec(max_error=max_error))
        assert any(sig[-1].dtype == numba_type(dtype) for sig in kernel.signatures)


def numba_type(dtype):  # type: ignore[no-untyped-def]
    import numba

    return numba.from_dtype(np.dtype(dtype))


def test_misaligned_region_is_a_programming_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = cubes.open_cubes(str(tmp_path))
    cubes.create_cube(store, "g", height=16, width=16, bands_nm=BANDS, spec=OutputSpec(chunk=8), provenance={})
    with pytest.raises(ValueError, match="does not cover whole chunks"):
        cubes.write_region(store, "g", 4, 0, np.zeros((31, 8, 8), np.float32))


def test_bound_is_recorded_in_the_array_and_codecs_are_stock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import xarray as xr

    store = cubes.open_cubes(str(tmp_path))
    cubes.create_cube(
        store, "g", height=8, width=8, bands_nm=BANDS, spec=OutputSpec(max_error=1e-3, chunk=8), provenance={}
    )
    cubes.write_region(store, "g", 0, 0, np.full((31, 8, 8), 0.25, np.float32))
    ds = xr.open_zarr(store, group="g", consolidated=False)
    assert ds.cube.attrs["max_abs_error"] == 1e-3 and json.loads(ds.cube.attrs["quantisation"])["dtype"] == "<i2"
    assert np.abs(ds.cube.values - 0.25).max() <= 1e-3
    meta = zarr.open_array(store, path="g/cube", mode="r").metadata.to_dict()
    names = [c["name"] for c in meta["codecs"]]
    assert names == [
        "numcodecs.fixedscaleoffset",
        "transpose",
        "numcodecs.delta",
        "transpose",
        "numcodecs.delta",
        "bytes",
        "blosc",
    ]


def test_max_error_zero_keeps_float16_storage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = cubes.open_cubes(str(tmp_path))
    cubes.create_cube(
        store, "g", height=8, width=8, bands_nm=BANDS, spec=OutputSpec(max_error=0, chunk=8), provenance={}
    )
    arr = zarr.open_array(store, path="g/cube", mode="r")
    assert arr.dtype == np.float16 and "max_abs_error" not in arr.attrs
    assert [c["name"] for c in arr.metadata.to_dict()["codecs"]] == ["bytes", "blosc"]


@pytest.mark.parametrize("bad", [-1e-4, 1e-6, 0.5, float("nan"), float("inf")])
def test_max_error_is_validated(bad: float) -> None:
    with pytest.raises(ConfigError, match="output_options.max_error"):
        OutputSpec(max_error=bad)


def test_fingerprint_and_spec_file_carry_max_error() -> None:
    spec = JobSpec(inputs=["a"], output="o")
    assert spec.output_options.max_error == 5e-4
    fp = spec.fingerprint("w")
    assert spec.with_overrides({"output_options.max_error": 1e-3}).fingerprint("w") != fp
    assert spec.with_overrides({"output_options.max_error": 0}).fingerprint("w") != fp
    assert spec.with_overrides({"output_options.max_error": 5e-4}).fingerprint("w") == fp
    again = JobSpec.from_dict(
        __import__("tomllib").loads(spec.with_overrides({"output_options.max_error": 1e-4}).to_toml())
    )
    assert again.output_options.max_error == 1e-4


def test_provenance_records_the_bound(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io

    from PIL import Image

    from drcr_model.weights import untrained_demo_weights
    from pipeline.sources import ImageRef
    from pipeline.work import JobContext, prepare_image

    img = tmp_path / "a.png"
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(buf, format="PNG")
    img.write_bytes(buf.getvalue())
    spec = JobSpec(inputs=[str(img)], output=str(tmp_path / "out"), output_options=OutputSpec(max_error=2e-4, chunk=8))
    ctx = JobContext(spec=spec, weights=untrained_demo_weights(tmp_path / "w").to_record(), fingerprint="f", run_id="r")
    meta = next(prepare_image(ctx, ImageRef(source=str(img), member=None, kind="file")))
    attrs = cubes.read_status(cubes.open_cubes(spec.output), meta.group)
    assert attrs[cubes.ATTR]["output"]["max_error"] == 2e-4


# --- the device path: quantise and predict in torch, the host only compresses ----------------------------
CUDA = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]


def _chunk_files(root) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("c/*/*/*"))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_error", [5e-5, 5e-4, 0.1])
@pytest.mark.parametrize("shape,chunk", [((31, 40, 40), 8), ((31, 33, 17), 16), ((31, 5, 7), 4), ((2, 12, 12), 4)])
def test_device_residuals_store_the_same_bytes_as_the_host(tmp_path, device, max_error, shape, chunk, host_encoder) -> None:  # type: ignore[no-untyped-def]
    """Tensor regions (quantised and predicted by torch on their device) store exactly the chunks the
    host encoders (numba's, numpy's) store, edge chunks and int32 quantisers (5e-5) included, so the bound tests above hold
    for them too; and zarr decodes them within the bound."""
    import torch

    q = cubes.Quantiser(max_error=max_error)
    rng = np.random.default_rng(5)
    data = rng.permutation(np.resize(_hostile_values(q, rng, 200), int(np.prod(shape)))).reshape(shape)
    host = _round_trip(tmp_path / "host", data, max_error, chunk=chunk)
    store = cubes.open_cubes(str(tmp_path / "dev"))
    _, h, w = shape
    spec = OutputSpec(max_error=max_error, chunk=chunk)
    cubes.create_cube(store, "g", height=h, width=w, bands_nm=BANDS[: shape[0]], spec=spec, provenance={})
    core = 2 * chunk
    tensor = torch.from_numpy(data).to(device)
    regions = [(y, x, tensor[:, y : y + core, x : x + core]) for y in range(0, h, core) for x in range(0, w, core)]
    cubes.write_regions(store, "g", regions, threads=2)
    dev = zarr.open_array(store, path="g/cube", mode="r")[:]
    assert _chunk_files(tmp_path / "dev" / "cubes.zarr") == _chunk_files(tmp_path / "host" / "cubes.zarr")
    np.testing.assert_array_equal(dev, host)
    assert np.abs(dev.astype(np.float64) - data).max() <= max_error


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, 40.0])
def test_device_path_refuses_unstorable_values(tmp_path, device, bad: float) -> None:  # type: ignore[no-untyped-def]
    import torch

    store = cubes.open_cubes(str(tmp_path))
    spec = OutputSpec(max_error=5e-4, chunk=8)
    cubes.create_cube(store, "a/img", height=8, width=16, bands_nm=BANDS, spec=spec, provenance={})
    data = torch.full((31, 8, 16), 0.5, device=device)
    data[3, 2, 11] = bad
    with pytest.raises(InputError, match=r"a/img: model output .*stores values in ±32.25"):
        cubes.write_regions(store, "a/img", [(0, 0, data)])
    assert np.isnan(zarr.open_array(store, path="a/img/cube", mode="r")[:]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "size,tiling,chunks",
    [
        ((40, 52), {"max_tile_pixels": 16, "tile_core": 16, "halo": 4, "statistics": "tile"}, 5 * 7),
        ((37, 50), {}, 5 * 7),  # run whole, reflect-padded to 40 × 52 by the model's "pad" pass
        ((40, 48), {}, 5 * 6),  # run whole, no padding
    ],
    ids=["tiled", "whole-padded", "whole"],
)
def test_predictor_device_path_writes_the_host_paths_chunks(tmp_path, device, size, tiling, chunks) -> None:  # type: ignore[no-untyped-def]
    """The actor's GPU path (model output kept on the device, quantised and predicted there, int16 copied
    back) stores the same chunks as the host path, on tiled batches and on images run whole; run on CPU
    it checks the wiring, on CUDA the device arithmetic too (both encoders see the same device's model
    output)."""
    from PIL import Image

    from drcr_model.weights import untrained_demo_weights
    from pipeline.sources import ImageRef
    from pipeline.work import JobContext, Predictor, prepare_image

    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (*size, 3), dtype=np.uint8)).save(img)
    weights = untrained_demo_weights(tmp_path / "w").to_record()
    files = []
    for on_device in (False, True):
        out = tmp_path / f"out-{on_device}"
        spec = JobSpec.from_dict(
            {
                "inputs": [str(img)],
                "output": str(out),
                "inference": {"device": device},
                "tiling": tiling,
                "output_options": {"chunk": 8},
            }
        )
        ctx = JobContext(spec=spec, weights=weights, fingerprint="f", run_id="r")
        meta, *windows = prepare_image(ctx, ImageRef(source=str(img), member=None, kind="file"))
        assert (len(meta.tiles) > 1) is bool(tiling)  # type: ignore[union-attr]
        predictor = Predictor(ctx, device=device, encode_on_device=on_device)
        assert predictor._device_encode is on_device
        _, tensors = predictor._compute_batch(meta.scale, meta.tiles, windows)  # type: ignore[union-attr, arg-type]
        assert (tensors is not None) is on_device  # the device path ran, tiled or whole
        predictor.run(meta.group, meta.scale, meta.tiles, windows)  # type: ignore[union-attr, arg-type]
        files.append(_chunk_files(out / "cubes.zarr" / meta.group / "cube"))  # type: ignore[union-attr]
    assert len(files[0]) == chunks and files[0] == files[1]

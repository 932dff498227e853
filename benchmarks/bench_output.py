"""Output cost: bytes per megapixel and encode speed per core of each cube storage, side by side in one run.

Cubes are the model's real output (the package's default weights, fp32 on CPU) for two kinds of input:
``scenes``: synthetic scenes (``drcr_model.scenes.make_scene``: measured reflectance spectra, illuminants,
shading, texture) imaged by the challenge camera (shot noise, JPEG 65); ``photos``: the demo's photo-like
images (``pipeline.sample.sample_image``, what ``drcr-pipeline make-sample`` makes) at ``--size``.

Each storage writes every cube through the actors' write path: :func:`pipeline.cubes.create_cube`, then
one :func:`pipeline.cubes.write_regions` call per cube with its ``--core``-sized tile cores (windows →
cores → chunks → local zarr v3 store). ``encode MP/s per core`` = megapixels / CPU seconds of this
process during the writes (every thread counted), so it holds on a loaded machine; ``wall MP/s`` is
megapixels / wall time. The max error is measured after decoding with zarr, against the float32 output.
Two stock-codec alternatives (a delta across bands + blosc, and pcodec when installed) are written by
zarr's own encoder for comparison. Encoder variants at 5e-4: our 2 threads; blosc called from the
writing thread (numcodecs then uses blosc's own threads); numpy's band slabs (the encoder where numba
is not installed, the same bytes as numba's one pass, the default); the torch path run on this CPU
(everything counted); and the GPU path's host share: the
int16 residual chunks the device would copy back are computed before the timer (torch, here on the CPU),
the timer covers blosc + store, which is what an actor's CPUs do when its device quantises and predicts.
A second table compresses the same residual chunks with other stock compressors (compress only).
numba's compile time is measured apart (a fresh process and cache directory, then a second process
that loads the cached code) and the kernel is compiled before any timer.

    .venv/bin/python benchmarks/bench_output.py [--size 512] [--count 3] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import numpy as np  # noqa: E402
from bench_model import cpu_name, cpu_threads  # noqa: E402

GPU_MP_S = 20.0  # one GPU's DRCR throughput assumed for the "at scale" table (issue 17)
PHOTO_MP = 12.0


def model_cubes(kind: str, count: int, size: int) -> list[np.ndarray]:
    """``count`` model-output cubes (31 × size × size float32) for ``kind`` inputs."""
    import torch

    from drcr_model.camera import simulate_rgb
    from drcr_model.inference import reconstruct
    from drcr_model.scenes import SceneConfig, make_scene
    from drcr_model.weights import default_weights
    from pipeline.sample import sample_image

    torch.set_num_threads(1)
    model = default_weights().load(device="cpu")
    out = []
    for i in range(count):
        if kind == "scenes":
            rgb = simulate_rgb(
                make_scene(100 + i, SceneConfig(height=size, width=size)), npe=750, jpeg_quality=65, seed=i
            )
        else:
            rgb = sample_image(np.random.default_rng(i), size, size)
        out.append(np.ascontiguousarray(reconstruct(rgb, model, mode="pad").transpose(2, 0, 1)))
    return out


def _stock_array(
    store: Any, path: str, shape: tuple[int, ...], chunk: int, filters: list[Any], serializer: Any, compressors: Any
) -> None:
    import zarr

    zarr.create_group(store, path=path, overwrite=True)
    zarr.create_array(
        store,
        name=f"{path}/cube",
        shape=shape,
        chunks=(shape[0], chunk, chunk),
        dtype="float32",
        fill_value=np.nan,
        filters=filters,
        serializer=serializer,
        compressors=compressors,
    )


def cases(chunk: int) -> list[tuple[str, float, Callable[..., None], Callable[..., None], Callable[..., Any] | None]]:
    """``(label, max error, create(store, path, shape), write(store, path, regions), prepare)`` per storage;
    ``prepare(store, path, regions)``, when there is one, runs before the timer and its result is what
    ``write`` gets (the GPU path's device share)."""
    import zarr
    import zarr.codecs
    import zarr.codecs.numcodecs as nc
    from zarr.core.sync import sync

    from drcr_model.weights import BANDS_NM
    from pipeline import cubes
    from pipeline.config import OutputSpec

    def create_for(max_error: float) -> Callable[..., None]:
        spec = OutputSpec(max_error=max_error, chunk=chunk)

        def create(store: Any, path: str, shape: tuple[int, ...]) -> None:
            cubes.create_cube(store, path, height=shape[1], width=shape[2], bands_nm=BANDS_NM, spec=spec, provenance={})

        return create

    def ours(max_error: float, threads: int = 1) -> tuple[Callable[..., None], Callable[..., None], None]:
        return (
            create_for(max_error),
            lambda store, path, regions: cubes.write_regions(store, path, regions, threads=threads),
            None,
        )

    def in_caller(encode: Callable[..., bytes]) -> Callable[..., None]:
        def write(store: Any, path: str, regions: list[tuple[int, int, np.ndarray]]) -> None:
            arr = cubes._open_cube(store, path)
            quant = cubes.Quantiser.from_attributes(arr.attrs)
            blobs = {k: encode(quant, b, arr.chunks) for k, b in cubes._chunk_blocks(arr, regions)}
            sync(cubes._put(store, cubes._objects(arr, path, blobs)))

        return write

    def device_share(store: Any, path: str, regions: list[tuple[int, int, np.ndarray]]) -> tuple[Any, list[Any]]:
        import torch

        arr = cubes._open_cube(store, path)
        quant = cubes.Quantiser.from_attributes(arr.attrs)
        tensors = [(y, x, torch.from_numpy(np.ascontiguousarray(d))) for y, x, d in regions]
        return arr, list(cubes._device_residuals(arr, quant, path, tensors))

    def host_share(store: Any, path: str, prepared: tuple[Any, list[tuple[tuple[int, int], np.ndarray]]]) -> None:
        arr, chunks = prepared
        pool = cubes._encode_pool(1)
        encoded = dict(pool.map(lambda kv: (kv[0], cubes.compress_residual(kv[1])), chunks))
        sync(cubes._put(store, cubes._objects(arr, path, encoded)))

    def numpy_slabs(store: Any, path: str, regions: list[tuple[int, int, np.ndarray]]) -> None:
        cubes.FUSED = False
        try:
            cubes.write_regions(store, path, regions)
        finally:
            cubes.FUSED = None

    def torch_regions(store: Any, path: str, regions: list[tuple[int, int, np.ndarray]]) -> None:
        import torch

        cubes.write_regions(store, path, [(y, x, torch.from_numpy(np.ascontiguousarray(d))) for y, x, d in regions])

    def zarr_write(store: Any, path: str, regions: list[tuple[int, int, np.ndarray]]) -> None:
        arr = zarr.open_array(store, path=f"{path}/cube", mode="r+")
        for y0, x0, data in regions:
            arr[:, y0 : y0 + data.shape[1], x0 : x0 + data.shape[2]] = data

    q = cubes.Quantiser(max_error=5e-4)
    blosc = zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=2, blocksize=1 << 20)
    band_delta = [
        zarr.codecs.TransposeCodec(order=(1, 2, 0)),
        nc.FixedScaleOffset(offset=0, scale=q.scale, dtype="<f4", astype="<i2"),
        nc.Delta(dtype="<i2"),
    ]
    out: list[tuple[str, float, Callable[..., None], Callable[..., None], Callable[..., Any] | None]] = [
        ("float16 + blosc-zstd-3 (max_error = 0)", 0.0, *ours(0.0)),
        ("max_error 1e-4", 1e-4, *ours(1e-4)),
        ("max_error 5e-4 (default)", 5e-4, *ours(5e-4)),
        ("max_error 1e-3", 1e-3, *ours(1e-3)),
        ("5e-4, 2 encode threads", 5e-4, *ours(5e-4, threads=2)),
        (
            "5e-4, blosc in the caller's thread (blosc's own threads)",
            5e-4,
            create_for(5e-4),
            in_caller(cubes.encode_chunk),
            None,
        ),
        ("5e-4, numpy band slabs (no numba)", 5e-4, create_for(5e-4), numpy_slabs, None),
        ("5e-4, torch path on this CPU (device = host: all counted)", 5e-4, create_for(5e-4), torch_regions, None),
        *(
            (
                f"{e:g}, GPU path, host share (device's int16 → blosc → store)",
                e,
                create_for(e),
                host_share,
                device_share,
            )
            for e in (1e-4, 5e-4, 1e-3)
        ),
        (
            "5e-4, Δ across bands + same blosc (zarr's encoder)",
            5e-4,
            lambda store, path, shape: _stock_array(store, path, shape, chunk, band_delta, "auto", [blosc]),
            zarr_write,
            None,
        ),
    ]
    try:
        import pcodec  # noqa: F401
    except ImportError:
        return out
    pco = nc.PCodec(level=4, mode_spec="classic", delta_spec="try_consecutive", delta_encoding_order=1)
    fso = [nc.FixedScaleOffset(offset=0, scale=q.scale, dtype="<f4", astype="<i2")]
    out.append(
        (
            "5e-4, Δx + pcodec-4 (zarr's encoder)",
            5e-4,
            lambda store, path, shape: _stock_array(store, path, shape, chunk, fso, pco, None),
            zarr_write,
            None,
        )
    )
    return out


COMPRESSORS: list[tuple[str, dict[str, Any]]] = [
    (
        "blosc zstd-1 bitshuffle 1 MiB blocks (default)",
        {"cname": "zstd", "clevel": 1, "shuffle": 2, "blocksize": 1 << 20},
    ),
    ("blosc zstd-1 bitshuffle 256 KiB blocks", {"cname": "zstd", "clevel": 1, "shuffle": 2, "blocksize": 1 << 18}),
    ("blosc zstd-1 bitshuffle 2 MiB blocks", {"cname": "zstd", "clevel": 1, "shuffle": 2, "blocksize": 1 << 21}),
    ("blosc zstd-3 bitshuffle 1 MiB blocks", {"cname": "zstd", "clevel": 3, "shuffle": 2, "blocksize": 1 << 20}),
    ("blosc zstd-1 byte shuffle 1 MiB blocks", {"cname": "zstd", "clevel": 1, "shuffle": 1, "blocksize": 1 << 20}),
    (
        "blosc zstd-1 bitshuffle 1 MiB blocks, typesize 1",
        {"cname": "zstd", "clevel": 1, "shuffle": 2, "blocksize": 1 << 20, "typesize": 1},
    ),
    (
        "blosc zstd-1 bitshuffle 1 MiB blocks, typesize 4",
        {"cname": "zstd", "clevel": 1, "shuffle": 2, "blocksize": 1 << 20, "typesize": 4},
    ),
    ("blosc lz4-1 bitshuffle", {"cname": "lz4", "clevel": 1, "shuffle": 2, "blocksize": 1 << 16}),
    ("blosc lz4-5 bitshuffle", {"cname": "lz4", "clevel": 5, "shuffle": 2, "blocksize": 1 << 16}),
    ("blosc lz4-1 byte shuffle", {"cname": "lz4", "clevel": 1, "shuffle": 1, "blocksize": 1 << 18}),
    ("blosc lz4hc-1 bitshuffle", {"cname": "lz4hc", "clevel": 1, "shuffle": 2, "blocksize": 1 << 16}),
    ("blosc blosclz-5 bitshuffle", {"cname": "blosclz", "clevel": 5, "shuffle": 2, "blocksize": 1 << 18}),
    (
        "blosc lz4-1 bitshuffle, then zstd -1",
        {"cname": "lz4", "clevel": 1, "shuffle": 2, "blocksize": 1 << 16, "then": -1},
    ),
]
"""Compressors of the same int16 residual chunks (stock codecs all: zarr's ``blosc`` and ``zstd``). A
``typesize`` other than the integers' 2 bytes shuffles their bits in other groups; blosc records it in
each chunk's header, so readers decode any of them."""


def compressor_rows(data: dict[str, list[np.ndarray]], chunk: int, reps: int) -> list[str]:
    """Per compressor: MB per MP and compress-only MP/s per core of the default's residual chunks (5e-4),
    one thread (blosc's single-threaded context, as the encode pool calls it)."""
    import concurrent.futures

    import numcodecs

    from pipeline import cubes

    quant = cubes.Quantiser(max_error=5e-4)
    chunks: dict[str, list[np.ndarray]] = {}
    for kind, cubes_ in data.items():
        shape = (cubes_[0].shape[0], chunk, chunk)
        chunks[kind] = [
            cubes._residual(c[:, y : y + chunk, x : x + chunk], quant, shape, np.inf).copy()
            for c in cubes_
            for y in range(0, c.shape[1], chunk)
            for x in range(0, c.shape[2], chunk)
        ]
    codecs = []
    for label, opts in COMPRESSORS:
        opts = dict(opts)
        then = opts.pop("then", None)
        typesize = opts.pop("typesize", 2)
        second = numcodecs.Zstd(level=then) if then is not None else None
        codecs.append((label, numcodecs.Blosc(**opts), second, typesize))

    def encode(r: np.ndarray, codec: Any, second: Any, typesize: int) -> bytes:
        blob = codec.encode(r.view(f"V{typesize}") if typesize != r.itemsize else r)
        return second.encode(blob) if second is not None else blob

    times: dict[tuple[str, str], list[float]] = {}
    sizes: dict[tuple[str, str], int] = {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # not the main thread: blosc's context call
        for _ in range(reps):  # in turn across compressors, as measure_all
            for label, codec, second, typesize in codecs:
                for kind, rs in chunks.items():
                    c0 = time.process_time()
                    blobs = list(pool.map(lambda r, c=codec, z=second, t=typesize: encode(r, c, z, t), rs))
                    times.setdefault((label, kind), []).append(time.process_time() - c0)
                    sizes[(label, kind)] = sum(map(len, blobs))
    rows = []
    for label, *_ in codecs:
        cells = []
        for kind, rs in chunks.items():
            mp = len(rs) * chunk * chunk / 1e6
            cells.append(f"{sizes[(label, kind)] / mp / 1e6:.2f} | {mp / statistics.median(times[(label, kind)]):.1f}")
        rows.append(f"| {label} | {' | '.join(cells)} |")
    return rows


JIT_PROBE = """
import time
import numpy as np
from pipeline import residuals
t0 = time.perf_counter()
assert residuals.fused_available()
b = np.zeros((31, 256, 256), np.float32)
residuals.fused_residual(b, 1000.0, 3e4, np.empty((256, 256), np.int16), np.empty((31, 256, 256), np.int16))
print(time.perf_counter() - t0)
"""


def jit_seconds() -> tuple[float, float]:
    """Seconds from after ``import pipeline.residuals`` (numba not yet imported) to the end of the first
    encoded chunk in a new process:
    with an empty numba cache (compiling), then again with the cache that run left."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="drcr-bench-numba-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        times = [
            float(
                subprocess.run(
                    [sys.executable, "-c", JIT_PROBE], env=env, cwd=REPO, check=True, capture_output=True, text=True
                ).stdout
            )
            for _ in range(2)
        ]
    return times[0], times[1]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def measure_once(
    root: Path,
    create: Callable[..., None],
    write: Callable[..., None],
    prepare: Callable[..., Any] | None,
    data: list[np.ndarray],
    core: int,
    check: bool,
) -> dict[str, float]:
    """One write of ``data`` into a new store at ``root``: CPU and wall seconds, bytes stored, and (with
    ``check``) the max error decoded by zarr."""
    import zarr
    import zarr.storage

    store = zarr.storage.LocalStore(root)
    for i, c in enumerate(data):
        create(store, f"c{i}", c.shape)
    batches = [
        [
            (y, x, c[:, y : y + core, x : x + core])
            for y in range(0, c.shape[1], core)
            for x in range(0, c.shape[2], core)
        ]
        for c in data
    ]
    if prepare is not None:
        batches = [prepare(store, f"c{i}", regions) for i, regions in enumerate(batches)]
    t0, c0 = time.perf_counter(), time.process_time()
    for i, regions in enumerate(batches):
        write(store, f"c{i}", regions)
    out = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "bytes": float(du(root)), "err": 0.0}
    if check:
        out["err"] = max(
            float(np.abs(zarr.open_array(store, path=f"c{i}/cube", mode="r")[:].astype(np.float32) - c).max())
            for i, c in enumerate(data)
        )
    return out


def measure_all(
    storages: list[tuple[str, float, Callable[..., None], Callable[..., None], Callable[..., Any] | None]],
    data: dict[str, list[np.ndarray]],
    core: int,
    reps: int,
    tmp: str,
) -> dict[tuple[str, str], dict[str, float]]:
    """Per (storage, kind): MB per MP, median MP per CPU second and per wall second, max error. The
    repetitions go round all storages in turn, so a change of the machine's load hits every row alike."""
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(reps):
        for n, (label, _, create, write, prepare) in enumerate(storages):
            for kind, cubes_ in data.items():
                m = measure_once(Path(tmp) / f"{n}-{kind}-{r}", create, write, prepare, cubes_, core, check=r == 0)
                runs.setdefault((label, kind), []).append(m)
    out = {}
    for key, ms in runs.items():
        mp = sum(c.shape[1] * c.shape[2] for c in data[key[1]]) / 1e6
        out[key] = {
            "mb_per_mp": ms[-1]["bytes"] / mp / 1e6,
            "mp_per_cpu_s": mp / statistics.median(m["cpu"] for m in ms),
            "wall_mp_s": mp / statistics.median(m["wall"] for m in ms),
            "err": ms[0]["err"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side")
    p.add_argument("--count", type=int, default=3, help="images of each kind")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--core", type=int, default=512, help="tile core side: one region per core, one write call per cube")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")

    from pipeline import residuals

    load0 = os.getloadavg()
    # numba first: colour-science (the synthetic scenes) puts a stand-in scipy in sys.modules that numba's
    # import trips on
    assert residuals.fused_available(), "numba is not installed: the default rows would time numpy's encoder"
    compile_s, cached_s = jit_seconds()
    data = {kind: model_cubes(kind, args.count, args.size) for kind in ("scenes", "photos")}
    c = data["scenes"][0][:, : args.chunk, : args.chunk]  # compiled (or loaded from the cache) before any timer
    residuals.fused_residual(c, 1.0, np.inf, np.empty(c.shape[1:], np.int16), np.empty(c.shape, np.int16))
    rows, scale_rows = [], []
    storages = cases(args.chunk)
    with tempfile.TemporaryDirectory(prefix="drcr-bench-out-") as tmp:
        res = measure_all(storages, data, args.core, args.reps, tmp)
    default = next(label for label, *_ in storages if "(default)" in label)
    for label, bound, *_ in storages:
        for kind in data:
            m, base, ref = res[(label, kind)], res[(storages[0][0], kind)], res[(default, kind)]
            shown = "float16 rounding" if bound == 0 else f"{bound:g}"
            rows.append(
                f"| {label} | {kind} | {shown} | {m['err']:.2e} | {m['mb_per_mp']:.2f} | "
                f"{m['mb_per_mp'] / base['mb_per_mp']:.2f} | {m['mp_per_cpu_s']:.2f} | "
                f"{m['mp_per_cpu_s'] / ref['mp_per_cpu_s']:.2f} | {m['wall_mp_s']:.2f} |"
            )
        mb = statistics.mean(res[(label, kind)]["mb_per_mp"] for kind in data)
        speed = statistics.mean(res[(label, kind)]["mp_per_cpu_s"] for kind in data)
        scale_rows.append(
            f"| {label} | {mb:.1f} | {mb * GPU_MP_S:.0f} | {GPU_MP_S / speed:.1f} | {mb * PHOTO_MP:.0f} |"
        )
    codec_rows = compressor_rows(data, args.chunk, args.reps)
    load1 = os.getloadavg()
    mp = args.count * args.size**2 / 1e6
    print(
        f"Cube writes: {args.count} scenes + {args.count} photos ({mp:.2f} MP each kind), {args.size}² × 31 bands of default-weights output; chunks (31, {args.chunk}, {args.chunk}), {args.core}² cores, local zarr v3 store; median of {args.reps}, the repetitions taken in turn across all rows"
    )
    print(f"{cpu_name()}, {cpu_threads()} CPUs; load average {load0[0]:.2f} before, {load1[0]:.2f} after\n")
    print(
        "| storage | cubes | bound | max abs error | MB per MP | vs float16 | encode MP/s per core "
        "| speed vs default | wall MP/s |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(
        f"\nAt scale, on paper: one GPU at {GPU_MP_S:g} MP/s, {PHOTO_MP:g} MP photos (means of the two kinds above)\n"
    )
    print("| storage | MB per MP | write MB/s per GPU | encode cores per GPU | TB per million photos |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(scale_rows))
    print(
        "\nCompressors of the same int16 residual chunks (5e-4, planar predictor), compress only, one thread; "
        "scenes then photos\n"
    )
    print("| compressor | scenes MB per MP | scenes MP/s per core | photos MB per MP | photos MP/s per core |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(codec_rows))
    print(
        f"\nnumba's encoder in a new process, numba's import to the first chunk encoded: {compile_s:.2f} s compiling "
        f"(empty cache), {cached_s:.2f} s with the cache it left"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
zarr's own encoder for comparison.

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


def cases(chunk: int) -> list[tuple[str, float, Callable[..., None], Callable[..., None]]]:
    """``(label, max error, create(store, path, shape), write(store, path, regions))`` per storage."""
    import zarr
    import zarr.codecs
    import zarr.codecs.numcodecs as nc

    from drcr_model.weights import BANDS_NM
    from pipeline import cubes
    from pipeline.config import OutputSpec

    def ours(max_error: float, threads: int = 1) -> tuple[Callable[..., None], Callable[..., None]]:
        spec = OutputSpec(max_error=max_error, chunk=chunk)

        def create(store: Any, path: str, shape: tuple[int, ...]) -> None:
            cubes.create_cube(store, path, height=shape[1], width=shape[2], bands_nm=BANDS_NM, spec=spec, provenance={})

        return create, lambda store, path, regions: cubes.write_regions(store, path, regions, threads=threads)

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
    out = [
        ("float16 + blosc-zstd-3 (max_error = 0)", 0.0, *ours(0.0)),
        ("max_error 1e-4", 1e-4, *ours(1e-4)),
        ("max_error 5e-4 (default)", 5e-4, *ours(5e-4)),
        ("max_error 5e-4, 2 encode threads", 5e-4, *ours(5e-4, threads=2)),
        ("max_error 1e-3", 1e-3, *ours(1e-3)),
        (
            "5e-4, Δ across bands + same blosc (zarr's encoder)",
            5e-4,
            lambda store, path, shape: _stock_array(store, path, shape, chunk, band_delta, "auto", [blosc]),
            zarr_write,
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
        )
    )
    return out


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def measure(
    label: str,
    create: Callable[..., None],
    write: Callable[..., None],
    data: list[np.ndarray],
    core: int,
    reps: int,
    tmp: str,
) -> dict[str, float]:
    import zarr
    import zarr.storage

    mp = sum(c.shape[1] * c.shape[2] for c in data) / 1e6
    cpu, wall, nbytes, err = [], [], 0, 0.0
    for r in range(reps):
        root = Path(tmp) / f"{abs(hash(label))}-{r}"
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
        t0, c0 = time.perf_counter(), time.process_time()
        for i, regions in enumerate(batches):
            write(store, f"c{i}", regions)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        nbytes = du(root)
        if r == 0:
            err = max(
                float(np.abs(zarr.open_array(store, path=f"c{i}/cube", mode="r")[:].astype(np.float32) - c).max())
                for i, c in enumerate(data)
            )
    return {
        "mb_per_mp": nbytes / mp / 1e6,
        "mp_per_cpu_s": mp / statistics.median(cpu),
        "wall_mp_s": mp / statistics.median(wall),
        "err": err,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side")
    p.add_argument("--count", type=int, default=3, help="images of each kind")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--core", type=int, default=512, help="tile core side: one region per core, one write call per cube")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")

    load0 = os.getloadavg()
    data = {kind: model_cubes(kind, args.count, args.size) for kind in ("scenes", "photos")}
    rows, scale_rows = [], []
    base: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="drcr-bench-out-") as tmp:
        for label, bound, create, write in cases(args.chunk):
            res = {
                kind: measure(label, create, write, cubes_, args.core, args.reps, tmp) for kind, cubes_ in data.items()
            }
            for kind, m in res.items():
                base.setdefault(kind, m["mb_per_mp"])
                shown = "float16 rounding" if bound == 0 else f"{bound:g}"
                rows.append(
                    f"| {label} | {kind} | {shown} | {m['err']:.2e} | {m['mb_per_mp']:.2f} | {m['mb_per_mp'] / base[kind]:.2f} | {m['mp_per_cpu_s']:.2f} | {m['wall_mp_s']:.2f} |"
                )
                print(rows[-1], file=sys.stderr, flush=True)
            mb = statistics.mean(m["mb_per_mp"] for m in res.values())
            speed = statistics.mean(m["mp_per_cpu_s"] for m in res.values())
            scale_rows.append(
                f"| {label} | {mb:.1f} | {mb * GPU_MP_S:.0f} | {GPU_MP_S / speed:.1f} | {mb * PHOTO_MP:.0f} |"
            )
    load1 = os.getloadavg()
    mp = args.count * args.size**2 / 1e6
    print(
        f"Cube writes: {args.count} scenes + {args.count} photos ({mp:.2f} MP each kind), {args.size}² × 31 bands of default-weights output; chunks (31, {args.chunk}, {args.chunk}), {args.core}² cores, local zarr v3 store; median of {args.reps}"
    )
    print(f"{cpu_name()}, {cpu_threads()} CPUs; load average {load0[0]:.2f} before, {load1[0]:.2f} after\n")
    print("| storage | cubes | bound | max abs error | MB per MP | vs float16 | encode MP/s per core | wall MP/s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(
        f"\nAt scale, on paper: one GPU at {GPU_MP_S:g} MP/s, {PHOTO_MP:g} MP photos (means of the two kinds above)\n"
    )
    print("| storage | MB per MP | write MB/s per GPU | encode cores per GPU | TB per million photos |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(scale_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

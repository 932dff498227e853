"""Output cost: bytes per megapixel and write throughput of the cube codecs, to choose the defaults.

Realistic cubes are synthetic scenes (``drcr_model.scenes.make_scene``: measured reflectance spectra,
illuminants, shading and texture; 31 bands, values in [0.01, 1]) written with the pipeline's own
:func:`pipeline.cubes.create_cube` / :func:`pipeline.cubes.write_regions` into a local zarr store, one
256² core region per call as the actors do. Throughput = megapixels / wall time of the writes (cast,
compress, store), single thread of Python plus zarr's own codec pool.

    .venv/bin/python benchmarks/bench_output.py [--size 512] [--scenes 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import numpy as np  # noqa: E402
from bench_model import cpu_name, cpu_threads  # noqa: E402

CASES = [
    ("float16", "none", 0),
    ("float16", "zstd", 1),
    ("float16", "zstd", 3),
    ("float16", "zstd", 9),
    ("float16", "blosc-zstd", 3),
    ("float16", "blosc-lz4", 5),
    ("float16", "gzip", 6),
    ("float32", "none", 0),
    ("float32", "zstd", 3),
    ("float32", "blosc-zstd", 3),
    ("float32", "blosc-lz4", 5),
]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="scene side (multiple of --chunk)")
    p.add_argument("--scenes", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)

    import zarr.storage

    from drcr_model.scenes import SceneConfig, make_scene
    from drcr_model.weights import BANDS_NM
    from pipeline import cubes
    from pipeline.config import OutputSpec

    load0 = os.getloadavg()
    scenes = [np.ascontiguousarray(make_scene(100 + s, SceneConfig(height=args.size, width=args.size)).transpose(2, 0, 1)) for s in range(args.scenes)]
    c = args.chunk
    regions = [(y, x, sc[:, y : y + c, x : x + c]) for sc in scenes for y in range(0, args.size, c) for x in range(0, args.size, c)]
    mp = args.scenes * args.size * args.size / 1e6
    rows = []
    with tempfile.TemporaryDirectory(prefix="drcr-bench-out-") as tmp:
        for dtype, comp, level in CASES:
            spec = OutputSpec(dtype=dtype, chunk=c, compressor=comp, level=level)
            times, nbytes, err = [], 0, 0.0
            for r in range(args.reps):
                root = Path(tmp) / f"{dtype}-{comp}-{level}-{r}"
                store = zarr.storage.LocalStore(root)
                for i in range(args.scenes):
                    cubes.create_cube(store, f"s{i}", height=args.size, width=args.size, bands_nm=BANDS_NM, spec=spec, provenance={})
                t0 = time.perf_counter()
                for k, (y, x, data) in enumerate(regions):
                    cubes.write_regions(store, f"s{k // (len(regions) // args.scenes)}", [(y, x, data)])
                times.append(time.perf_counter() - t0)
                nbytes = du(root)
            back = zarr.open_array(store, path="s0/cube", mode="r")[:]
            err = float(np.max(np.abs(back.astype(np.float32) - scenes[0]) / scenes[0]))
            med = statistics.median(times)
            rows.append(f"| {dtype} | {comp} | {level if comp != 'none' else ''} | {nbytes / mp / 1e6:.2f} | {scenes[0].dtype.itemsize * 31 * 1e6 / (nbytes / mp):.2f} | {mp / med:.2f} | {nbytes / med / 1e6:.0f} | {err:.1e} |")
            print(rows[-1], file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    print(f"Cube writes: {args.scenes} synthetic scenes of {args.size}² × 31 bands, chunks (31, {c}, {c}), local zarr v3 store; median of {args.reps}")
    print(f"{cpu_name()}, {cpu_threads()} CPUs; load average {load0[0]:.2f} before, {load1[0]:.2f} after\n")
    print("| dtype | compressor | level | MB per MP stored | ratio vs float32 raw | write MP/s | stored MB/s | max rel. error |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

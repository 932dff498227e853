"""Chunked vs sharded cubes (``output_options.layout``), side by side in one run, on a local folder and on the
S3 server the tests use (``rclone serve s3`` on loopback, tests/s3server.py).

For each image size, storage codec (``max_error`` 5e-4, the default, and 0: float16 + blosc) and store, both
layouts write the same cube through the actors' write path: :func:`pipeline.cubes.create_cube` with the
default tiling, then :func:`pipeline.cubes.write_regions` per batch of 4 tile cores (2 encode threads), as the
actors do; an image of up to ``tiling.max_tile_pixels`` runs whole, as one region. Measured, medians of
``--reps`` (the layouts interleaved, after a warm-up): stored objects and bytes of the cube, write MP/s (wall) and MP per
CPU second of this process (every thread; steadier than wall time on a loaded machine; the S3 server's own CPU is
not in it), the read of one 256² region (all bands: one chunk) and of the whole cube from a freshly opened array
(stock zarr).

The cube is the default weights' output (fp32, CPU) for a 512² photo-like image (``pipeline.sample``),
mirrored out to each size: real model statistics without running the model on megapixels.

    .venv/bin/python benchmarks/bench_layout.py [--sizes 1536x2048 3072x4096] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

import numpy as np  # noqa: E402

BATCH = 4
THREADS = 2


def base_cube() -> np.ndarray:
    from bench_output import model_cubes

    return model_cubes("photos", 1, 512)[0]


def mirrored(cube: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cube`` reflected out to ``height × width`` (no seams: each copy is the mirror of its neighbour)."""
    _, h, w = cube.shape
    ry, rx = -(-height // h), -(-width // w)
    rows = [cube if i % 2 == 0 else cube[:, ::-1, :] for i in range(ry)]
    col = np.concatenate(rows, axis=1)
    cols = [col if j % 2 == 0 else col[:, :, ::-1] for j in range(rx)]
    return np.ascontiguousarray(np.concatenate(cols, axis=2)[:, :height, :width])


def regions(data: np.ndarray) -> list[list[tuple[int, int, np.ndarray]]]:
    """The default tiling's cores of the image, in batches of :data:`BATCH` (one region when it runs whole)."""
    from bench_bigimage import default_halo

    from pipeline.config import TilingSpec
    from pipeline.tiling import plan_tiles

    t = TilingSpec(halo=default_halo())
    _, h, w = data.shape
    tiles = plan_tiles(h, w, max_tile_pixels=t.max_tile_pixels, tile_core=t.tile_core, halo=t.halo)
    cores = [
        (c.core_y0, c.core_x0, data[:, c.core_y0 : c.core_y0 + c.core_h, c.core_x0 : c.core_x0 + c.core_w])
        for c in tiles
    ]
    return [cores[i : i + BATCH] for i in range(0, len(cores), BATCH)]


class Local:
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def url(self, tag: str) -> str:
        return str(self.root / tag)

    options: dict[str, Any] | None = None


class S3:
    name = "S3 (rclone, loopback)"

    def __init__(self, root: Path) -> None:
        from s3server import S3Server

        self.server = S3Server(root)
        self.server.start()
        os.environ.update(self.server.env())
        self.bucket = self.server.create_bucket(f"layout-{uuid.uuid4().hex[:6]}")
        self.options = self.server.storage_options()

    def url(self, tag: str) -> str:
        return f"{self.bucket}/{tag}"

    def close(self) -> None:
        self.server.stop()


def objects(url: str, group: str, options: dict[str, Any] | None) -> tuple[int, int]:
    """(objects, bytes) under the cube's ``c/`` prefix."""
    from pipeline import cubes, storage

    fs, root = storage.open_fs(storage.join(url, cubes.CUBES_DIR, group, "cube", "c"), options)
    found = fs.find(root, detail=True)
    return len(found), sum(int(i["size"]) for i in found.values())


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """(wall s, CPU s of this process, every thread) of ``fn(*args)``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def write(store: Any, batches: list[list[tuple[int, int, np.ndarray]]]) -> None:
    from pipeline import cubes

    for batch in batches:
        cubes.write_regions(store, "g", batch, threads=THREADS)


def once(store_kind: Any, data: np.ndarray, max_error: float, layout: str, tag: str) -> dict[str, float]:
    """One write and the reads of one cube in ``layout``."""
    import zarr

    from pipeline import cubes
    from pipeline.config import OutputSpec, TilingSpec

    spec = OutputSpec(max_error=max_error, layout=layout)
    _, h, w = data.shape
    url = store_kind.url(f"{layout}-{max_error:g}-{h}x{w}-{tag}")
    store = cubes.open_cubes(url, store_kind.options)
    cubes.create_cube(
        store, "g", height=h, width=w, bands_nm=range(400, 701, 10), spec=spec, provenance={}, tiling=TilingSpec()
    )
    wall, cpu = timed(write, store, regions(data))
    n, size = objects(url, "g", store_kind.options)
    assert n == cubes.stored_objects(h, w, spec, TilingSpec()), (n, layout)
    y0, x0 = (h // 2) // 256 * 256, (w // 2) // 256 * 256
    fresh = zarr.open_array(cubes.open_cubes(url, store_kind.options, read_only=True), path="g/cube", mode="r")
    region, _ = timed(fresh.__getitem__, (slice(None), slice(y0, y0 + 256), slice(x0, x0 + 256)))
    fresh = zarr.open_array(cubes.open_cubes(url, store_kind.options, read_only=True), path="g/cube", mode="r")
    whole, _ = timed(fresh.__getitem__, slice(None))
    mp = h * w / 1e6
    return {
        "objects": n,
        "MB": size / 1e6,
        "write": mp / wall,
        "write_cpu": mp / cpu,
        "region_ms": 1e3 * region,
        "whole": mp / whole,
    }


def measure(store_kind: Any, data: np.ndarray, max_error: float, reps: int) -> dict[str, dict[str, float]]:
    """Both layouts, reps interleaved (chunked, sharded, chunked, …) so load changes hit both; medians."""
    runs: dict[str, list[dict[str, float]]] = {"chunked": [], "sharded": []}
    for rep in range(reps):
        for layout, out in runs.items():
            out.append(once(store_kind, data, max_error, layout, str(rep)))
    return {lay: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for lay, rs in runs.items()}


def _ratio(row: dict[str, float], base: dict[str, float], key: str) -> str:
    return f" ({row[key] / base[key]:.2f}×)"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")  # numcodecs codecs outside the v3 spec (pipeline.cubes.Quantiser.filters)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["1536x2048", "3072x4096"], help="HxW of the cubes")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    args = p.parse_args(argv)
    base = base_cube()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; reps {args.reps}; medians")
    print(
        "| store | image | max_error | layout | objects | MB | write MP/s | write MP per CPU-s | "
        "read 256² region ms | read whole MP/s |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="bench-layout-") as tmp:
        stores = [Local(Path(tmp) / "local") if s == "local" else S3(Path(tmp) / "s3") for s in args.stores]
        try:
            for size in args.sizes:
                h, w = (int(v) for v in size.split("x"))
                data = mirrored(base, h, w)
                for st in stores:
                    for max_error in (5e-4, 0.0):
                        measure(st, base, max_error, 1)  # warm-up (thread pool, codecs, connections)
                        rows = measure(st, data, max_error, args.reps)
                        for lay, r in rows.items():
                            ratio = {k: _ratio(r, rows["chunked"], k) if lay == "sharded" else "" for k in r}
                            print(
                                f"| {st.name} | {h}×{w} | {max_error:g} | {lay} | {r['objects']:.0f} | {r['MB']:.1f} | "
                                f"{r['write']:.1f}{ratio['write']} | {r['write_cpu']:.1f}{ratio['write_cpu']} | "
                                f"{r['region_ms']:.1f} | {r['whole']:.1f}{ratio['whole']} |",
                                flush=True,
                            )
                del data
        finally:
            for st in stores:
                if isinstance(st, S3):
                    st.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

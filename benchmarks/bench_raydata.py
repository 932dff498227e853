"""This pipeline next to a plain Ray Data pipeline, and how many batches one driver can feed.

Runs for real: JPEGs in the local S3 server, a local Ray (2 CPUs), cubes written back to the server.

    .venv/bin/python benchmarks/bench_raydata.py --parts plain driver

Parts:

* ``plain`` — wall time of :func:`pipeline.execution.run_job` and of :func:`plain_pipeline` (the ~60-line
  Ray Data pipeline a user would write: read → decode → ``map_batches`` over one DRCR actor → zarr), on the
  same images with the same weights, 1 actor × 1 CPU; runs interleaved (plain, ours, plain, ours …) so load
  drift hits both; ratio ours ÷ plain per pair, median.
* ``driver`` — a zero-latency stand-in model (``stand_in.py``) on many small batches: batches/s the job
  sustained and the driver process's CPU seconds per batch (``getrusage`` of the driver over the job: the
  streaming executor, record handling, markers). One driver can then feed ``1 / cpu_per_batch`` batches/s;
  at 20 MP/s per GPU (NTIRE model) with 576² windows (512² cores, batch 4: 1.05 MP per batch) a GPU takes
  19 batches/s, so the driver feeds ``(1 / cpu_per_batch) / 19`` GPUs.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
import numpy as np  # noqa: E402
from bench_pipeline import Env, cpu_ticks, machine_line, run, write_weights  # noqa: E402

# --- the plain Ray Data pipeline -------------------------------------------------------------------------


def _read(row: dict[str, Any], storage_options: dict[str, Any]) -> dict[str, Any]:
    import io

    import fsspec
    from PIL import Image

    with fsspec.open(row["url"], "rb", **storage_options) as f:
        image = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
    return {"url": row["url"], "image": image}


class _DRCR:
    def __init__(self, weights: str, output: str, storage_options: dict[str, Any]) -> None:
        import torch
        import zarr
        from zarr.storage import FsspecStore

        from drcr_model import load_model

        torch.set_num_threads(1)
        self.model = load_model(weights, device="cpu")
        self.root = zarr.open_group(FsspecStore.from_url(output, storage_options=storage_options), mode="a")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from drcr_model.inference import reconstruct

        names = []
        for url, image in zip(batch["url"], batch["image"]):
            x = image.astype(np.float32) / np.float32(max(int(image.max()), 1))
            cube = reconstruct(x, self.model, mode="pad", preprocessed=True).transpose(2, 0, 1)
            name = os.path.basename(url).rsplit(".", 1)[0]
            arr = self.root.create_array(name, shape=cube.shape, chunks=(31, 256, 256), dtype="float16", overwrite=True)
            arr[:] = cube.astype(np.float16)
            names.append(name)
        return {"name": np.array(names)}


def plain_pipeline(urls: list[str], output: str, weights: str, storage_options: dict[str, Any]) -> int:
    """read → decode (tasks) → DRCR (one actor, whole images) → zarr; returns the number of cubes."""
    import ray.data

    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.map(_read, fn_args=(storage_options,), num_cpus=1)  # type: ignore[arg-type]
    ds = ds.map_batches(
        _DRCR,
        fn_constructor_args=(weights, output, storage_options),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    return sum(1 for _ in ds.iter_rows())


def part_plain(env: Env, args: argparse.Namespace) -> list[str]:
    from drcr_model.weights import default_weights

    weights = default_weights().url or ""
    sides = [(380 + 20 * i, 420 + 20 * i) for i in range(args.images)]  # 0.16–0.27 MP, like the photos
    inputs = env.put_images("plain", sides)
    env.fs.invalidate_cache()
    urls = sorted(f"s3://{p}" for p in env.fs.find(inputs.removeprefix("s3://")))
    opts = env.server.storage_options()
    ours, plain, ratios = [], [], []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        n = plain_pipeline(urls, f"{env.bucket}/plain-{rep}", weights, opts)
        plain.append(time.perf_counter() - t0)
        assert n == len(urls)
        t0 = time.perf_counter()
        run(env.spec(inputs, weights, ray={"actors": 1, "num_cpus_per_actor": 1, "decode_num_cpus": 1}))
        ours.append(time.perf_counter() - t0)
        ratios.append(ours[-1] / plain[-1])
        print(f"  … plain {plain[-1]:.1f} s, ours {ours[-1]:.1f} s", file=sys.stderr, flush=True)
    return [
        "| pipeline | images | wall s (median, min–max) |",
        "| --- | --- | ---: |",
        f"| plain Ray Data (read → map_batches(DRCR actor) → zarr) | {len(urls)} × 0.16–0.27 MP | {statistics.median(plain):.1f} ({min(plain):.1f}–{max(plain):.1f}) |",
        f"| this pipeline (`run_job`) | same | {statistics.median(ours):.1f} ({min(ours):.1f}–{max(ours):.1f}) |",
        f"\nRatio this ÷ plain, per interleaved pair: median **{statistics.median(ratios):.2f}** "
        f"({min(ratios):.2f}–{max(ratios):.2f}), {args.reps} pairs; default weights, 1 actor × 1 CPU, decode 1 CPU, "
        "2-CPU local Ray; both write float16 cubes to the same S3 server. This pipeline also hashes every source, "
        "checks resume, writes provenance, completion markers and the manifest.",
    ]


# --- driver capacity -------------------------------------------------------------------------------------

GPU_BATCHES_PER_S = 20.0 / (4 * 512 * 512 / 1e6)
"""Batches/s one GPU consumes: NTIRE model at 20 MP/s per GPU, batch 4 windows of 576² (512² cores)."""


def _driver_cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def part_driver(env: Env, args: argparse.Namespace) -> list[str]:
    weights = write_weights("tiny", env.work)
    core, bs = 32, 4
    tiles = (256 // core) ** 2
    inputs = env.put_images("driver", [(256, 256)] * args.driver_images)
    sec = {
        "tiling": {"max_tile_pixels": 16, "tile_core": core, "halo": 0},
        "output_options": {"chunk": core},
        "ray": {"actors": 2, "num_cpus_per_actor": 0.5, "decode_num_cpus": 0.5, "batch_size": bs, "max_images_in_flight": 4},
    }  # fmt: skip
    rows = []
    for _ in range(args.reps):
        c0, (b0, t0) = _driver_cpu_s(), cpu_ticks()
        s = run(env.spec(inputs, weights, **sec), 0.0)
        c1, (b1, t1) = _driver_cpu_s(), cpu_ticks()
        batches = s.compute["batches"]
        rows.append((batches / s.compute["span_s"], (c1 - c0) / batches, s.elapsed_s, (b1 - b0) / max(1, t1 - t0)))
        print(f"  … driver: {rows[-1]}", file=sys.stderr, flush=True)
    rate = statistics.median(r[0] for r in rows)
    cpu = statistics.median(r[1] for r in rows)
    feed = 1.0 / cpu
    return [
        "| batches | batches/s sustained (first compute → last) | driver CPU ms per batch | batches/s one driver CPU can feed | GPUs one driver can feed (NTIRE, 20 MP/s, 576² × 4) | host CPU busy | job s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {args.driver_images * tiles // bs} | {rate:.0f} | {cpu * 1000:.2f} | {feed:.0f} | {feed / GPU_BATCHES_PER_S:.0f} | {statistics.median(r[3] for r in rows):.2f} | {statistics.median(r[2] for r in rows):.1f} |",
        f"\nZero-latency stand-in, 2 actors × 0.5 CPU, {args.driver_images} images × {tiles} tiles of {core}², batch {bs}; "
        f"medians of {args.reps}. Driver CPU = user + system time of the driver process over the whole job (Ray Data's "
        "streaming executor, record handling, marker threads, manifest), divided by the batches. On this 2-CPU host the "
        "workers, not the driver, bound the sustained rate; the driver's CPU per batch is what limits a big cluster.",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["plain", "driver"], choices=["plain", "driver"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--driver-images", type=int, default=32)
    args = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-raydata-") as tmp:
        env = Env(Path(tmp))
        try:
            env.start_ray(2)
            print(machine_line())
            print(f"load average at start: {os.getloadavg()}")
            for part in args.parts:
                print(f"\n### {part}\n")
                print("\n".join({"plain": part_plain, "driver": part_driver}[part](env, args)))
            print(f"\nload average at end: {os.getloadavg()}")
        finally:
            env.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Pipeline performance: efficiency vs the bare model, memory vs image size, scheduling overhead at scale.

Everything runs for real: images are JPEGs in the local S3 server (``tests/s3server.py``, rclone on
127.0.0.1), jobs run through :func:`pipeline.execution.run_job` on a local Ray, cubes are written back
to the server. Weights are seeded random checkpoints of the named DRCR configuration (speed does not
depend on the values).

    .venv/bin/python benchmarks/bench_pipeline.py --quick                 # all three parts, small sizes
    .venv/bin/python benchmarks/bench_pipeline.py --parts efficiency --reps 3
    .venv/bin/python benchmarks/bench_pipeline.py --parts memory --memory-model tiny   # real model (slow)

Parts:

* ``efficiency`` — end-to-end MP/s of ``run_job`` divided by the bare model's MP/s on the same tiles and
  batches with the same torch threads (1 actor × 1 CPU = 1 thread; decode has the other CPU). Reported
  twice: whole job (includes actor start and weight loading), and steady state = MP ÷ the span from the
  first compute start to the last compute end, from timestamps the actor reports (``RunSummary.compute``);
  with the actor's busy fraction (compute ÷ that span) and its compute time per batch over the bare
  model's. Run with ``ray.overlap_writes`` false/true and completion markers inline (before) / in driver
  threads (after, ``pipeline.execution.FINISH_THREADS``).
* ``memory`` — peak RSS of the driver, the prepare (decode/tile) task and the inference actor (which also
  writes the cube) for 1024², 4096², 8192² images, each size in a fresh process with a fresh Ray so the
  peaks (``ru_maxrss``, reported by the pipeline in ``RunSummary.peak_rss``) are that size's own.
* ``scaling`` — a stand-in model (``benchmarks/standin.py``, given to ``run_job`` as its ``predictor``:
  sleeps per batch, writes zeros) on
  1, 2, 4, 8 actors with fractional CPUs, ≥ 20 batches per actor; steady-state tiles/s (actors'
  timestamps, first compute start → last compute end) vs ideal ``actors × batch / latency``; medians of 3.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from bench_model import CONFIGS, cpu_name, cpu_threads  # noqa: E402

CONFIGS = CONFIGS | {"mid": {"in_channels": 3, "out_channels": 31, "channels": 64, "n_blocks": 4}}
MB = 1024 * 1024


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat (0, 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def machine_line() -> str:
    load = os.getloadavg()
    return f"{cpu_name()}, {cpu_threads()} CPUs; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)"


# --- fixtures: weights, images, server -----------------------------------------------------------------------


def write_weights(config: str, folder: Path) -> str:
    """A seeded random checkpoint of ``config`` (speed does not depend on the values)."""
    import torch

    from drcr_model.net import DRCRNet

    path = folder / f"bench-{config}.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(DRCRNet(**CONFIGS[config]).state_dict(), path)
    return str(path)


def photo(seed: int, height: int, width: int) -> np.ndarray:
    """H×W×3 uint8 that compresses like a photograph: smooth colour field + texture + noise (built from
    a coarse grid, so an 8192² image takes well under a second)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(20, 235, (height // 64 + 2, width // 64 + 2, 3)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1.001, height)
    xs = np.linspace(0, coarse.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
    img += coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx
    img += rng.normal(0, 4, (height, 1, 1)).astype(np.float32) + rng.normal(0, 4, (1, width, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Env:
    """The S3 server, one bucket, storage spec, weights folder; Ray started on demand."""

    def __init__(self, work: Path) -> None:
        from s3server import S3Server

        self.work = work
        self.server = S3Server(work / "s3")
        self.server.start()
        os.environ.update(self.server.env())
        self.bucket = self.server.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")
        self.storage = {"endpoint_url": self.server.endpoint_url, "key_env": "AWS_ACCESS_KEY_ID", "secret_env": "AWS_SECRET_ACCESS_KEY", "region": "us-east-1"}
        from pipeline.storage import open_fs

        self.fs, _ = open_fs(self.bucket, self.server.storage_options())
        self.ray_init_s = 0.0

    def put_images(self, prefix: str, sizes: list[tuple[int, int]], seed: int = 0) -> str:
        for i, (h, w) in enumerate(sizes):
            key = f"{self.bucket[5:]}/{prefix}/img_{i:03d}.jpg"
            if h * w <= 2048 * 2048:
                self.fs.pipe_file(key, jpeg(photo(seed + i, h, w)))
                continue
            # Big images are made in a child process: Linux children inherit the parent's peak RSS
            # (ru_maxrss) at fork, so a big parent would inflate the memory benchmark's driver peaks.
            with tempfile.NamedTemporaryFile(suffix=".jpg", dir=self.work) as f:
                code = f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); from bench_pipeline import jpeg, photo; open({f.name!r}, 'wb').write(jpeg(photo({seed + i}, {h}, {w})))"
                subprocess.run([sys.executable, "-c", code], check=True)
                self.fs.put_file(f.name, key)
        return f"{self.bucket}/{prefix}/"

    def spec(self, inputs: str, weights: str, **sections: dict[str, Any]) -> Any:
        from pipeline.config import JobSpec

        d: dict[str, Any] = {"name": "bench", "inputs": [inputs], "output": f"{self.bucket}/out-{uuid.uuid4().hex[:8]}", "weights": {"path": weights}, "storage": self.storage}
        d.update(sections)
        return JobSpec.from_dict(d)

    def start_ray(self, num_cpus: int = 2) -> None:
        from pipeline.execution import init_ray

        t0 = time.perf_counter()
        init_ray(num_cpus=num_cpus)
        self.ray_init_s = time.perf_counter() - t0

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.server.close()


def run(spec: Any, latency_s: float | None = None) -> Any:
    """``spec`` run with the real model, or (``latency_s``) the stand-in sleeping that long per batch."""
    from standin import stand_in

    from pipeline.execution import run_job
    from pipeline.work import Predictor

    summary = run_job(spec, predictor=Predictor if latency_s is None else stand_in(latency_s))
    if summary.failed or not summary.ok:
        raise RuntimeError(f"benchmark job failed: {summary.to_dict()}")
    return summary


# --- 1. efficiency -------------------------------------------------------------------------------------------


def bare_model_mp_s(weights: str, spec: Any, image: np.ndarray, threads: int, reps: int) -> float:
    """MP/s of the bare model on exactly the pipeline's tiles and batches of ``image`` (``threads`` threads)."""
    import torch

    from drcr_model import load_model
    from drcr_model.inference import forward, reconstruct
    from pipeline.tiling import extract_window, plan_tiles

    torch.set_num_threads(threads)
    model = load_model(weights, device="cpu")
    t = spec.tiling.with_halo_for(model.config["n_blocks"])
    tiles = plan_tiles(*image.shape[:2], max_tile_pixels=t.max_tile_pixels, tile_core=t.tile_core, halo=t.halo)
    scale = np.float32(image.max())
    bs = spec.ray.batch_size

    def once() -> float:
        t0 = time.perf_counter()
        if tiles[0].whole:
            reconstruct(image.astype(np.float32) / scale, model, mode="pad", preprocessed=True)
        else:
            for i in range(0, len(tiles), bs):
                batch = np.stack([extract_window(image, tt).astype(np.float32).transpose(2, 0, 1) / scale for tt in tiles[i : i + bs]])
                forward(model, batch)
        return time.perf_counter() - t0

    once()  # warm-up (allocator, oneDNN primitives)
    return image.shape[0] * image.shape[1] / 1e6 / statistics.median(once() for _ in range(reps))


def part_efficiency(env: Env, args: argparse.Namespace) -> list[str]:
    import ray

    from pipeline import execution

    cases = [
        # (label, config, image side, images)
        ("(a) compute-bound", args.compute_config, args.compute_size, args.compute_images),
        ("(b) default (tiny 16/1)", "tiny", args.small_size, args.small_images),
    ][: 2 if args.small else 1]
    variants = [
        # (label, ray.overlap_writes, completion markers in driver threads)
        ("before: markers inline, overlap off", False, 0),
        ("before: markers inline, overlap on", True, 0),
        ("after: markers in threads, overlap off", False, execution.FINISH_THREADS),
        ("after: markers in threads, overlap on (default)", True, execution.FINISH_THREADS),
    ]
    if args.variants == "default":
        variants = variants[-1:]
    out = [
        "| case | model | images | variant | bare model MP/s | job MP/s (whole job) | efficiency (whole job) | steady-state MP/s | efficiency (steady state) | actor busy fraction | actor compute ÷ bare compute | compute CPU ÷ wall | fixed cost per job s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    threads_default = execution.FINISH_THREADS
    for label, config, side, n in cases:
        weights = write_weights(config, env.work)
        many = env.put_images(f"eff-{config}-{side}-n", [(side, side)] * n)
        image = photo(0, side, side)
        mp = side * side / 1e6
        base = {"ray": {"actors": 1, "num_cpus_per_actor": 1, "decode_num_cpus": 1, "batch_size": 4}}
        spec0 = env.spec(many, weights, ray=base["ray"])
        # The bare model runs as a 1-CPU Ray task: same process kind, OMP settings and niceness as the actor.
        bare_task = ray.remote(num_cpus=1)(bare_model_mp_s)
        b = statistics.median(ray.get(bare_task.remote(weights, spec0, image, 1, 3)) for _ in range(args.reps))
        for vlabel, overlap, threads in variants:
            execution.FINISH_THREADS = threads
            ray_sec = base["ray"] | {"overlap_writes": overlap}
            whole, steady, busy, slow, fixed, oncpu = [], [], [], [], [], []
            try:
                for _ in range(args.reps):
                    print(f"  … efficiency {config} {vlabel}", file=sys.stderr, flush=True)
                    s = run(env.spec(many, weights, ray=ray_sec))
                    c = s.compute
                    whole.append(n * mp / s.elapsed_s)
                    # steady state, from the actors' own timestamps: first compute start → last compute end
                    steady.append(n * mp / c["span_s"])
                    busy.append(c["busy_fraction"])
                    slow.append((c["busy_s"] / n) / (mp / b))
                    fixed.append(s.elapsed_s - c["span_s"])
                    oncpu.append(c["cpu_s"] / c["busy_s"])
            finally:
                execution.FINISH_THREADS = threads_default
            w, st = statistics.median(whole), statistics.median(steady)
            out.append(
                f"| {label} | {config} {CONFIGS[config]['channels']}/{CONFIGS[config]['n_blocks']} | {n} × {side}² | {vlabel} | {b:.4f} | {w:.4f} | {w / b:.2f} | {st:.4f} | {st / b:.2f} | {statistics.median(busy):.2f} | {statistics.median(slow):.2f} | {statistics.median(oncpu):.2f} | {statistics.median(fixed):.1f} |"
            )
    out.append(
        f"\n`ray.init` (local, 2 CPUs): {env.ray_init_s:.1f} s, not included above. Medians of {args.reps} run(s). "
        "Steady state = images' MP ÷ (first compute start → last compute end, timestamps reported by the actor); "
        "busy fraction = actor compute time ÷ that span (1 − idle share); actor compute ÷ bare = time per batch in the "
        "actor over the bare model's (> 1: slowed by the rest of the job sharing the 2 CPUs); compute CPU ÷ wall = CPU time of the computing thread ÷ its "
        "wall time (< 1: the nice-15 actor was descheduled mid-compute; ≈ 1 with a slowdown: cache/memory-bandwidth contention). "
        "steady-state efficiency ≈ busy fraction ÷ (actor compute ÷ bare). Fixed cost = job time − steady span "
        "(actor start, weight load, first decode, last write and marker, manifest)."
    )
    return out


# --- 2. memory -----------------------------------------------------------------------------------------------


def memory_child(args: argparse.Namespace) -> None:
    """One size, in a fresh process with a fresh Ray (peaks never go down within a process)."""
    env_info = json.loads(os.environ["DRCR_BENCH_ENV"])
    from pipeline.config import JobSpec
    from pipeline.execution import init_ray
    from pipeline.work import peak_rss

    init_ray(num_cpus=2)
    spec = JobSpec.from_dict(env_info["spec"])
    before = peak_rss()
    summary = run(spec, env_info["stand_in_s"])
    print(json.dumps({"peak_rss": summary.peak_rss, "elapsed_s": summary.elapsed_s, "driver_before": before}))


def part_memory(env: Env, args: argparse.Namespace) -> list[str]:
    config = args.memory_model
    weights = write_weights("tiny", env.work)
    stand_in_s = 0.01 if config == "stand-in" else None
    out = [
        "| image | ray.overlap_writes | decoded 8-bit MB | driver MB | prepare task MB | actor (model + writer) MB | prepare − decoded MB | job s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    peaks: dict[int, dict[str, int]] = {}
    for side in args.memory_sizes:
        inputs = env.put_images(f"mem-{side}", [(side, side)])
        for overlap in args.memory_overlap:
            spec = env.spec(
                inputs, weights,
                tiling={"max_tile_pixels": 256 * 256, "tile_core": 256, "halo": 32},
                ray={"actors": 1, "num_cpus_per_actor": 1, "decode_num_cpus": 1, "batch_size": 4, "max_images_in_flight": 1, "overlap_writes": overlap},
            )  # fmt: skip
            child_env = os.environ | {"DRCR_BENCH_ENV": json.dumps({"spec": spec.to_dict(), "stand_in_s": stand_in_s}), "PYTHONPATH": str(REPO)}
            proc = subprocess.run([sys.executable, __file__, "--memory-child"], capture_output=True, text=True, env=child_env, check=False, timeout=1800)
            if proc.returncode != 0:
                out.append(f"| {side}² | {overlap} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            p = res["peak_rss"]
            if overlap == args.memory_overlap[-1]:
                peaks[side] = p
            decoded = side * side * 3
            out.append(f"| {side}² | {overlap} | {decoded / MB:.0f} | {p['driver'] / MB:.0f} (before the job {res['driver_before'] / MB:.0f}) | {p['prepare'] / MB:.0f} | {p['actor'] / MB:.0f} | {(p['prepare'] - decoded) / MB:.0f} | {res['elapsed_s']:.1f} |")
            print(f"  … memory {side}² overlap {overlap} done", file=sys.stderr, flush=True)
    lo, hi = min(peaks, default=0), max(peaks, default=0)
    if lo and hi and lo != hi:
        r = {k: peaks[hi][k] / peaks[lo][k] for k in ("driver", "actor")}
        o = spec.output_options
        grow = (peaks[hi]["prepare"] - peaks[lo]["prepare"]) / (hi * hi * 3 - lo * lo * 3)
        out.append(f"\nModel: {'stand-in (10 ms/batch, writes zeros)' if config == 'stand-in' else 'tiny 16/1'}; tiles 320² (core 256, halo 32), batch 4, chunk {o.chunk}, {o.dtype} {o.compressor}-{o.level}.")
        out.append(f"{hi}² / {lo}² peak: driver {r['driver']:.2f}× (target ≤ 1.2), actor {r['actor']:.2f}× (target ≤ 1.2); "
                   f"prepare task: {peaks[lo]['prepare'] / MB:.0f} MB at {lo}² (the constant) + {grow:.2f}× the decoded 8-bit image's growth to {hi}² (target ≤ 2× + a constant).")  # fmt: skip
    return out


# --- 3. scaling ----------------------------------------------------------------------------------------------


def part_scaling(env: Env, args: argparse.Namespace) -> list[str]:
    weights = write_weights("tiny", env.work)
    lat, bs, core = args.latency, 4, 64
    tiles_per_image = (512 // core) ** 2
    out = [
        "| actors | CPUs per actor | images × tiles | tiles/s, all actors active | ideal tiles/s | ratio (median, min–max) | all-active window s | tiles/s, first start → last end (ratio) | actor busy fraction | host CPU busy | job s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in args.actors:
        cpu = 1.5 / max(n, 1) if n > 1 else 1.0
        sec = {
            "tiling": {"max_tile_pixels": 16, "tile_core": core, "halo": 0},
            "output_options": {"chunk": core},
            "ray": {"actors": n, "num_cpus_per_actor": cpu, "decode_num_cpus": 0.5 / 4, "batch_size": bs, "max_images_in_flight": max(4, n)},
        }  # fmt: skip
        # `batches` per actor in the window where all actors run, plus room for staggered actor start-up
        n_img = max(2, int(np.ceil(n * args.batches * bs / tiles_per_image))) + (n if n > 2 else 0)
        inputs = env.put_images(f"scale-{n}", [(512, 512)] * n_img)
        ideal = n * bs / lat
        ratios, spans, busy, job, window, host = [], [], [], [], [], []
        for _ in range(args.reps):
            print(f"  … scaling {n} actors", file=sys.stderr, flush=True)
            b0, t0 = cpu_ticks()
            s = run(env.spec(inputs, weights, **sec), lat)
            b1, t1 = cpu_ticks()
            host.append((b1 - b0) / (t1 - t0) if t1 > t0 else float("nan"))
            c = s.compute
            ratios.append(c["all_active_pixels"] / core**2 / c["all_active_s"] / ideal if c["all_active_s"] > 0 else float("nan"))
            spans.append(n_img * tiles_per_image / c["span_s"] / ideal)
            window.append(c["all_active_s"])
            busy.append(c["busy_fraction"])
            job.append(s.elapsed_s)
        r, sp = statistics.median(ratios), statistics.median(spans)
        out.append(f"| {n} | {cpu:.3g} | {n_img} × {tiles_per_image} | {r * ideal:.1f} | {ideal:.1f} | {r:.2f} ({min(ratios):.2f}–{max(ratios):.2f}) | {statistics.median(window):.1f} | {sp * ideal:.1f} ({sp:.2f}) | {statistics.median(busy):.2f} | {statistics.median(host):.2f} | {statistics.median(job):.1f} |")
    out.append(
        f"\nStand-in latency {lat * 1000:.0f} ms per batch of {bs} tiles, held under the actor's compute lock like real compute "
        f"({core}² cores, each written to zarr as zeros); 512² images, {tiles_per_image} tiles each; medians of {args.reps} run(s). "
        "Steady state = tiles computed while every actor was running (after the last actor's first compute start, before the "
        "first actor's last compute end; batches pro-rated) ÷ that window, from timestamps the actors report; the first-start → "
        "last-end column includes the staggered start-up of the actors (each imports torch and loads weights on the same 2 CPUs). Host CPU busy: /proc/stat over the whole job, both CPUs."
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (mid 64/4 as the compute-bound model, 3 runs each)")
    p.add_argument("--parts", nargs="+", default=["efficiency", "memory", "scaling"], choices=["efficiency", "memory", "scaling"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--compute-config", default=None, choices=list(CONFIGS))
    p.add_argument("--compute-size", type=int, default=None)
    p.add_argument("--compute-images", type=int, default=None)
    p.add_argument("--small-size", type=int, default=256)
    p.add_argument("--small-images", type=int, default=None)
    p.add_argument("--small", action=argparse.BooleanOptionalAction, default=True, help="run the default-config efficiency case too")
    p.add_argument("--variants", choices=["all", "default"], default="all", help="efficiency variants: before/after all four, or the default only")
    p.add_argument("--memory-model", default=None, choices=["stand-in", "tiny"])
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--memory-overlap", type=lambda v: v.lower() in ("1", "true", "yes"), nargs="+", default=[True], help="ray.overlap_writes values to run (ratios use the last)")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--batches", type=int, default=None, help="batches per actor in the steady part of the scaling runs")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    q = args.quick
    args.reps = args.reps or 3
    args.compute_config = args.compute_config or ("mid" if q else "full")
    args.compute_size = args.compute_size or (128 if q or args.compute_config == "full" else 256)
    args.compute_images = args.compute_images or (6 if q else 12)
    args.small_images = args.small_images or (6 if q else 12)
    args.memory_model = args.memory_model or ("stand-in" if q else "tiny")
    args.batches = args.batches or 20

    import torch

    print(f"# Pipeline benchmarks\n\n{machine_line()}; torch {torch.__version__}\n")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="drcr-bench-") as tmp:
        env = Env(Path(tmp))
        try:
            if "memory" in args.parts:  # before this process starts Ray (the children start their own)
                print("## Memory vs image size (peak RSS per process kind)\n")
                print("\n".join(part_memory(env, args)) + "\n", flush=True)
            if {"efficiency", "scaling"} & set(args.parts):
                env.start_ray()
            if "efficiency" in args.parts:
                print("## Pipeline efficiency (job MP/s ÷ bare model MP/s, 1 actor × 1 CPU, 1 torch thread)\n")
                print("\n".join(part_efficiency(env, args)) + "\n", flush=True)
            if "scaling" in args.parts:
                print("## Scheduling overhead (stand-in model of fixed latency)\n")
                print("\n".join(part_scaling(env, args)) + "\n", flush=True)
        finally:
            env.close()
    print(f"{machine_line()}; wall {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

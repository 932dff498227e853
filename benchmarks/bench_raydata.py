"""This pipeline next to a plain Ray Data pipeline on the same images, and what one driver can sustain.

    .venv/bin/python benchmarks/bench_raydata.py --reps 3                  # both parts
    .venv/bin/python benchmarks/bench_raydata.py --parts compare --reps 5
    .venv/bin/python benchmarks/bench_raydata.py --parts capacity --quick

Parts:

* ``compare`` — the same synthetic photos (JPEGs, 0.14–0.27 MP, run whole) in a local folder, on one local
  Ray (``--cpus`` CPUs), one actor of one CPU, the package's default weights: :func:`pipeline.execution.run_job`
  with a default spec (cubes, previews, QA, manifest, catalog, report) against a plain Ray Data pipeline,
  ``read_images → map_batches(DRCR actor: the same model, whole image) → one zarr float16 array per image``.
  One warm-up job of each (Ray Data's cluster-wide helper actors, a cluster's first job only), then the two
  alternate, ``--reps`` times each; the table gives each one's median wall time and the ratio (goal ≤ 1.0).
* ``capacity`` — the driver's cost per batch with a zero-latency stand-in (the predictor's model replaced by
  zeros: no compute; QA, previews and cube writes still run, on the actors): the job's batches/s, and the
  driver process's CPU (Ray's core worker, Ray Data's executor, the record loop, the marker threads) per
  batch, for the whole job and at the margin (the same images cut into 1-tile and 4-tile batches: extra
  CPU ÷ extra batches, so per-image and per-job work cancels out). "GPUs one driver feeds" = the batches/s
  one driver core sustains at that CPU per batch ÷ the batches/s one GPU needs for the NTIRE model at 20 MP/s
  with 576² windows (20e6 / 576² windows/s ÷ ``ray.batch_size``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from bench_pipeline import jpeg, machine_line, photo  # noqa: E402
from standin import ZeroLatency  # noqa: E402

SIZES = [(320, 440), (360, 480), (380, 520), (400, 560), (420, 600), (440, 560), (400, 640), (420, 640)]
"""Eight photos of 0.14–0.27 MP."""

NTIRE_MP_S_PER_GPU = 20.0
NTIRE_WINDOW = 576


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write_photos(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        (folder / f"img_{i:03d}.jpg").write_bytes(jpeg(photo(seed + i, h, w)))


# --- compare ---------------------------------------------------------------------------------------------------


class PlainDRCR:
    """The plain pipeline's actor: the job's model, one whole image per call, its cube to zarr (float16)."""

    def __init__(self, weights: dict[str, Any], out: str) -> None:
        import torch

        from drcr_model import Weights

        torch.set_num_threads(1)
        self.model = Weights.from_record(weights).load(device=torch.device("cpu"))
        self.out = out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import zarr

        from drcr_model.inference import reconstruct

        names = []
        for image, path in zip(batch["image"], batch["path"]):
            rgb = np.asarray(image, dtype=np.float32)
            cube = reconstruct(rgb / max(float(rgb.max()), 1.0), self.model, mode="pad", preprocessed=True)
            name = Path(str(path)).stem
            arr = zarr.open_array(
                f"{self.out}/{name}.zarr", mode="w", shape=cube.shape, chunks=(cube.shape[0], 64, 64), dtype="float16"
            )
            arr[...] = cube.astype(np.float16)
            names.append(name)
        return {"name": np.array(names)}


def plain_pipeline(folder: Path, out: Path, weights: dict[str, Any]) -> int:
    import ray.data

    ds = ray.data.read_images(str(folder), mode="RGB", include_paths=True)
    ds = ds.map_batches(
        PlainDRCR,
        fn_constructor_args=(weights, str(out)),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    return sum(1 for _ in ds.iter_rows())


def part_compare(work: Path, args: argparse.Namespace) -> list[str]:
    from pipeline.config import JobSpec
    from pipeline.execution import resolve_weights, run_job

    folder = work / "photos"
    write_photos(folder, SIZES[: args.images])
    spec = JobSpec.from_dict({"inputs": [str(folder)], "output": str(work / "warm")})
    weights = resolve_weights(spec)

    def ours() -> float:
        s = JobSpec.from_dict({"inputs": [str(folder)], "output": str(work / f"ours-{uuid.uuid4().hex[:6]}")})
        t0 = time.perf_counter()
        summary = run_job(s)
        assert summary.ok == args.images, summary.to_dict()
        return time.perf_counter() - t0

    def plain() -> float:
        t0 = time.perf_counter()
        n = plain_pipeline(folder, work / f"plain-{uuid.uuid4().hex[:6]}", weights)
        assert n == args.images
        return time.perf_counter() - t0

    ours(), plain()  # warm-up: Ray Data's cluster-wide actors start with a cluster's first dataset
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(args.reps):
        times["ours"].append(ours())
        times["plain"].append(plain())
    mo, mp = statistics.median(times["ours"]), statistics.median(times["plain"])
    ratios = [o / p for o, p in zip(times["ours"], times["plain"])]
    return [
        f"### This pipeline vs plain Ray Data ({args.images} photos of 0.14–0.27 MP, 1 actor × 1 CPU, {args.cpus}-CPU local Ray, default weights)",
        "",
        "| pipeline | wall s (each rep) | median s |",
        "| --- | --- | ---: |",
        f"| this pipeline (`run_job`: cubes, previews, QA, manifest, catalog, report) | {' / '.join(f'{t:.2f}' for t in times['ours'])} | {mo:.2f} |",
        f"| plain Ray Data (`read_images → map_batches → zarr`) | {' / '.join(f'{t:.2f}' for t in times['plain'])} | {mp:.2f} |",
        "",
        f"Ratio this ÷ plain: **{mo / mp:.2f}** (per rep pair {min(ratios):.2f}–{max(ratios):.2f}); goal ≤ 1.0.",
    ]


# --- capacity --------------------------------------------------------------------------------------------------


def capacity_run(work: Path, folder: Path, batch_size: int, actors: int) -> dict[str, float]:
    from pipeline.config import JobSpec
    from pipeline.execution import run_job

    spec = JobSpec.from_dict(
        {
            "inputs": [str(folder)],
            "output": str(work / f"cap-{uuid.uuid4().hex[:6]}"),
            # Small tiles: many batches per image; per-tile statistics: no passes in prepare.
            "tiling": {"max_tile_pixels": 4096, "tile_core": 32, "halo": 8, "statistics": "tile"},
            "output_options": {"chunk": 32},
            "ray": {"actors": actors, "num_cpus_per_actor": 0.5, "decode_num_cpus": 0.5, "batch_size": batch_size},
        }
    )
    c0, t0 = cpu_s(), time.perf_counter()
    summary = run_job(spec, predictor=ZeroLatency)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    assert summary.failed == 0 and summary.ok > 0, summary.to_dict()
    return {"wall": wall, "cpu": cpu, "batches": summary.compute["batches"]}


def part_capacity(work: Path, args: argparse.Namespace) -> list[str]:
    folder = work / "capacity"
    side = 256 if args.quick else 384
    write_photos(folder, [(side, side)] * args.images, seed=10)
    capacity_run(work, folder, 4, 2)  # warm-up
    rows: dict[int, list[dict[str, float]]] = {1: [], 4: []}
    for _ in range(args.reps):
        for bs in (1, 4):
            rows[bs].append(capacity_run(work, folder, bs, 2))

    def med(bs: int, key: str) -> float:
        return statistics.median(r[key] for r in rows[bs])

    windows_per_gpu = NTIRE_MP_S_PER_GPU * 1e6 / NTIRE_WINDOW**2
    lines = [
        f"### Driver capacity (zero-latency stand-in, {args.images} images of {side}², 32² cores, 2 actors × 0.5 CPU, {args.cpus}-CPU local Ray; medians of {args.reps})",
        "",
        "| batch size | batches | job wall s | batches/s | driver CPU s | driver cores busy | driver CPU ms / batch (whole job) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for bs in (1, 4):
        b, wall, cpu = med(bs, "batches"), med(bs, "wall"), med(bs, "cpu")
        lines.append(
            f"| {bs} | {b:.0f} | {wall:.2f} | {b / wall:.1f} | {cpu:.2f} | {cpu / wall:.2f} | {1e3 * cpu / b:.2f} |"
        )
    extra_cpu = med(1, "cpu") - med(4, "cpu")
    extra_batches = med(1, "batches") - med(4, "batches")
    marginal = extra_cpu / extra_batches if extra_batches > 0 else float("nan")
    lines += [
        "",
        f"Marginal driver CPU per batch (batch size 1 over 4: extra CPU ÷ extra batches; it includes Ray Data's "
        f"executor loop over the longer run): {1e3 * marginal:.2f} ms ({extra_cpu:.2f} s over {extra_batches:.0f} batches).",
    ]
    estimates = [
        ("marginal CPU per batch", 1.0 / marginal if marginal > 0 else float("nan")),
        (
            "whole-job CPU per batch at batch size 1, start-up and publishing included",
            med(1, "batches") / med(1, "cpu"),
        ),
    ]
    for label, per_s in estimates:
        if not per_s > 0:
            lines.append(f"GPUs one driver feeds ({label}): not measurable in this run.")
            continue
        feeds = ", ".join(f"batch size {bs}: {per_s / (windows_per_gpu / bs):.0f}" for bs in (1, 4))
        lines.append(
            f"One driver core sustains ~{per_s:.0f} batches/s ({label}); NTIRE at {NTIRE_MP_S_PER_GPU:g} MP/s per GPU with "
            f"{NTIRE_WINDOW}² windows needs {windows_per_gpu:.1f} windows/s per GPU, so one driver feeds ~{feeds} GPUs."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="compare,capacity")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller capacity images, 1 rep")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 1
    import logging

    import ray

    from pipeline.execution import init_ray

    logging.basicConfig(level=logging.WARNING)
    init_ray(num_cpus=args.cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = [
        f"Machine: {machine_line()}",
        f"Command: python benchmarks/bench_raydata.py {' '.join(argv or sys.argv[1:])}",
        "",
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for part in args.parts.split(","):
                fn = {"compare": part_compare, "capacity": part_capacity}[part]
                out += [*fn(Path(tmp), args), ""]
    finally:
        ray.shutdown()
    out.append(f"After: {machine_line()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

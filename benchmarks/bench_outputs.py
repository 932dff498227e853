"""QA + preview cost as a fraction of inference time, per batch as the predictor runs them (issue 13).

For each model config (the NTIRE 2022 100/10 one — the compute-bound case — and the tiny demo one) and
image side, one whole-image batch is timed side by side in one process, median of ``--reps``:

* ``infer``: the model's forward pass (seeded random weights of that config, fp32, CPU, torch threads as set);
* ``qa``: :func:`pipeline.qa.tile_stats` on that batch (back-projection sums, ratio histogram, fractions);
* ``preview``: :func:`pipeline.preview.write_preview_regions` (render, 3 pyramid levels + input level,
  written to a local zarr store);
* ``finish``: per image, :func:`pipeline.qa.reduce_stats` + :func:`pipeline.qa.summarize` and the two PNG
  thumbnails (:func:`pipeline.preview.write_thumbnails`).

``(qa + preview + finish) / infer`` is the overhead the issue asks to keep ≤ 5 % on the compute-bound config.

    .venv/bin/python benchmarks/bench_outputs.py [--sizes 128 256] [--reps 3] [--threads 2]
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
import torch  # noqa: E402
from bench_model import cpu_name  # noqa: E402

from drcr_model.camera import DEFAULT_BANDS, camera_response  # noqa: E402
from drcr_model.inference import forward  # noqa: E402
from drcr_model.net import DRCRNet  # noqa: E402
from drcr_model.weights import NTIRE2022_CONFIG, UNTRAINED_CONFIG  # noqa: E402
from pipeline import cubes, preview, qa  # noqa: E402
from pipeline.config import OutputSpec  # noqa: E402

CONFIGS = {"ntire 100/10": dict(NTIRE2022_CONFIG), "tiny 16/1": dict(UNTRAINED_CONFIG)}


def _median_s(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(config: dict[str, int], side: int, reps: int, tmp: Path) -> dict[str, float]:
    torch.manual_seed(0)
    model = DRCRNet(**config).eval()
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, side, side), dtype=np.float32)
    forward(model, x)  # warm-up
    out: list[np.ndarray] = []

    def infer() -> None:
        out[:] = [forward(model, x)[0]]

    t_infer = _median_s(infer, reps)
    response = camera_response("ntire2022", DEFAULT_BANDS).astype(np.float32)
    parts: list[dict] = []
    t_qa = _median_s(lambda: parts.append(qa.tile_stats([x[0]], out, response)), reps)
    store = cubes.open_cubes(str(tmp))
    group = f"g{side}-{config['channels']}"
    cubes.create_cube(store, group, height=side, width=side, bands_nm=list(DEFAULT_BANDS), spec=OutputSpec(), provenance={})
    bands = list(DEFAULT_BANDS)
    t_prev = _median_s(lambda: preview.write_preview_regions(store, group, [(0, 0, out[0], x[0])], bands), reps)

    def finish() -> None:
        qa.summarize(qa.reduce_stats(parts[:1]))
        preview.write_thumbnails(store, str(tmp), group)

    t_fin = _median_s(finish, reps)
    return {"infer": t_infer, "qa": t_qa, "preview": t_prev, "finish": t_fin}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, torch threads {args.threads}, load average {os.getloadavg()[0]:.2f}, median of {args.reps}")
    print("| config | image | infer s | qa ms | preview ms | finish ms | (qa+preview+finish) / infer |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            for side in args.sizes:
                r = measure(CONFIGS[name], side, args.reps, Path(tmp))
                frac = (r["qa"] + r["preview"] + r["finish"]) / r["infer"]
                print(
                    f"| {name} | {side}² | {r['infer']:.3f} | {1e3 * r['qa']:.1f} | {1e3 * r['preview']:.1f} "
                    f"| {1e3 * r['finish']:.1f} | {100 * frac:.2f} % |",
                    flush=True,
                )
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Scheduled reruns: no-op rerun time ÷ first-run time for many small images in S3 (issue 12; goal ≤ 0.05).

    .venv/bin/python benchmarks/bench_incremental.py              # 1,000 images of 32×32, 3 reruns
    .venv/bin/python benchmarks/bench_incremental.py --images 200 --reruns 1

Both runs go through ``run_job`` on one local Ray (2 CPUs) against the local S3 server (rclone), side by
side in one process; Ray start-up is outside both figures. The first run converts every image with the
package's default weights; each rerun finds them unchanged from the listing and the catalog, reads none of
them and starts no actor. Prints a markdown table with the load average (the box is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench_pipeline import Env  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--reruns", type=int, default=3)
    args = p.parse_args(argv)

    from pipeline.execution import run_job

    with tempfile.TemporaryDirectory() as tmp:
        env = Env(Path(tmp))
        try:
            inputs = env.put_images("photos", [(args.size, args.size)] * args.images)
            spec = env.spec(
                inputs,
                "",
                output_options={"chunk": 64},
                ray={"actors": 1, "batch_size": 8, "max_images_in_flight": 8},
            )
            env.start_ray(num_cpus=2)
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            first = run_job(spec)
            first_s = time.perf_counter() - t0
            assert first.ok == args.images and first.failed == 0, first.to_dict()
            reruns = []
            for _ in range(args.reruns):
                t0 = time.perf_counter()
                again = run_job(spec)
                reruns.append(time.perf_counter() - t0)
                assert again.skipped == args.images and again.actors == 0 and again.prepared == 0, again.to_dict()
            load1 = os.getloadavg()[0]
        finally:
            env.close()
    rerun_s = statistics.median(reruns)
    print(f"\n{args.images} images of {args.size}×{args.size} px in S3 (rclone serve s3 on 127.0.0.1), default weights, 2 CPUs")
    print(f"load average (1 min) {load0:.1f} at start, {load1:.1f} at end; Ray start-up ({env.ray_init_s:.1f} s) outside both\n")
    print("| run | time (s) | inputs read | actors |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| first run | {first_s:.1f} | {first.prepared} | {first.actors} |")
    print(f"| no-op rerun (median of {len(reruns)}) | {rerun_s:.2f} | 0 | 0 |")
    print(f"\nno-op rerun ÷ first run = **{rerun_s / first_s:.3f}** (goal ≤ 0.05); reruns: {', '.join(f'{r:.2f}' for r in reruns)} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

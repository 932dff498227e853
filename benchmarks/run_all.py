"""Run the performance suite and print its markdown tables (README "Performance").

    .venv/bin/python benchmarks/run_all.py --quick     # small configs, bounded time (≈ 10-15 min on 2 busy cores)
    .venv/bin/python benchmarks/run_all.py             # full sizes (NTIRE 100/10 for the compute-bound case)

Each benchmark is its own script (run one alone with ``--help``): ``bench_pipeline.py`` (efficiency,
memory vs image size, scheduling overhead), ``bench_forward.py`` (our forward vs eager, GPU variants),
``bench_output.py`` (codecs and dtypes), ``bench_model.py`` (FLOPs, speed and memory per config).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    q = ["--quick"] if args.quick else []
    steps = [
        ["bench_forward.py", *(["--size", "128", "--runs", "3"] if args.quick else [])],
        ["bench_output.py", *(["--reps", "2"] if args.quick else [])],
        ["bench_pipeline.py", *q],
    ]
    if not args.quick:
        steps.insert(0, ["bench_model.py"])
    t0 = time.perf_counter()
    rc = 0
    for step in steps:
        print(f"\n<!-- {' '.join(step)} -->\n", flush=True)
        rc |= subprocess.run([sys.executable, str(HERE / step[0]), *step[1:]], check=False).returncode
    print(f"\nsuite wall time {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

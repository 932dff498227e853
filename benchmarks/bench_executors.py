"""This checkout's execution vs another source tree's, side by side on the demo job (interleaved repetitions).

Each repetition runs the demo job (``jobs/demo.toml``'s settings on ``make-sample``'s images, the default
weights) in a fresh process with a fresh local Ray of 2 CPUs, once with this checkout's ``pipeline`` and once
with the other tree's (``--other``: e.g. ``git archive main | tar -x -C /tmp/main-src``), alternating which
goes first. Reported: the job's wall time (``run_job``, Ray start excluded), medians, the ratio this ÷ other,
and the load average before and after (the box is shared).

    git archive main | (mkdir -p /tmp/main-src && tar -x -C /tmp/main-src)
    .venv/bin/python benchmarks/bench_executors.py --other /tmp/main-src --reps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, tomllib
from pathlib import Path
from pipeline.config import JobSpec
from pipeline.execution import init_ray, run_job
import pipeline
work = Path(sys.argv[1])
d = tomllib.loads(Path(sys.argv[2]).read_text())
d["inputs"] = [str(work / "sample" / Path(p).relative_to("out/sample")) for p in d["inputs"]]
d["output"] = str(work / "out")
init_ray(num_cpus=2)
t0 = time.perf_counter()
s = run_job(JobSpec.from_dict(d))
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "ok": s.ok, "failed": s.failed, "src": str(Path(pipeline.__file__).parent.parent)}))
"""


def once(src: Path, sample: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-exec-") as tmp:
        work = Path(tmp)
        (work / "sample").symlink_to(sample)
        env = dict(os.environ, PYTHONPATH=str(src), RAY_USAGE_STATS_ENABLED="0")
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(work), str(REPO / "jobs" / "demo.toml")],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
            timeout=1800,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, type=Path, help="another source tree (its pipeline/ is imported)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as tmp:
        sample = Path(tmp) / "sample"
        subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "make-sample", str(sample)],
            check=True,
            capture_output=True,
            cwd=REPO,
        )
        load0 = os.getloadavg()
        times: dict[str, list[float]] = {"this": [], "other": []}
        for rep in range(args.reps):
            order = [("this", REPO), ("other", args.other)]
            for name, src in order if rep % 2 == 0 else order[::-1]:
                r = once(src, sample)
                assert r["ok"] > 0 and r["failed"] == 0 and Path(r["src"]).resolve() == src.resolve(), r
                times[name].append(r["wall_s"])
                print(f"  rep {rep} {name}: {r['wall_s']:.1f} s ({r['ok']} ok)", file=sys.stderr, flush=True)
        load1 = os.getloadavg()
    this, other = statistics.median(times["this"]), statistics.median(times["other"])
    print(f"demo job, {args.reps} interleaved reps; load average {load0[0]:.1f} → {load1[0]:.1f}\n")
    print("| execution | wall s (median) | runs | this ÷ other |\n| --- | ---: | --- | ---: |")
    print(f"| this checkout | {this:.1f} | {', '.join(f'{t:.1f}' for t in times['this'])} | {this / other:.2f} |")
    print(f"| {args.other} | {other:.1f} | {', '.join(f'{t:.1f}' for t in times['other'])} | 1.00 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

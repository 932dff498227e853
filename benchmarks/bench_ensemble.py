"""Test-time ensemble (``inference.ensemble``): gain on the held-out synthetic scenes and cost.

The default weights on the held-out scenes of ``jobs/evaluate_synthetic.toml`` (seed 1000, clean and
degraded input; fewer scenes here to spare a shared CPU), whole-image reconstruction with 1, 2, 4 and 8
flips/transposes averaged; metrics from :mod:`drcr_model.evaluate`, time per image side by side.

    python benchmarks/bench_ensemble.py --scenes 3 --size 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from drcr_model import default_weights, reconstruct
from drcr_model.evaluate import evaluate_pairs, heldout_synthetic, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    w = default_weights()
    model = w.load(device="cpu")
    data = heldout_synthetic(seed=1000, n_scenes=args.scenes, scene_size=args.size)
    rows, times = [], {}
    for k in (1, 2, 4, 8):
        spent: list[float] = []

        def predict(rgb: np.ndarray, k: int = k, spent: list[float] = spent) -> np.ndarray:
            t0 = time.perf_counter()
            with torch.inference_mode():
                y = reconstruct(rgb, model, mode="authors", ensemble=k)
            spent.append(time.perf_counter() - t0)
            return y

        for name, pairs in data.items():
            rows += evaluate_pairs(predict, pairs, method=f"ensemble {k}", input_name=name)
        times[k] = statistics.median(spent)
    means = summarize(rows)
    print(f"default weights {w.name}; {args.scenes} held-out synthetic scenes of {args.size}² (seed 1000)")
    print(
        f"torch threads {torch.get_num_threads()}; load average after the run {os.getloadavg()[0]:.1f} (shared box)\n"
    )
    print("| ensemble | input | MRAE | MRAE (gt ≥ 0.01) | RMSE | SAM° | s per image | time vs 1 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (method, inp), m in sorted(means.items(), key=lambda kv: (kv[0][1], int(kv[0][0].split()[1]))):
        k = int(method.split()[1])
        print(
            f"| {k} | {inp} | {m['mrae']:.4f} | {m['mrae_gt_ge_0.01']:.4f} | {m['rmse']:.4f} | {m['sam_deg']:.2f} "
            f"| {times[k]:.2f} | {times[k] / times[1]:.2f}× |"
        )


if __name__ == "__main__":
    main()

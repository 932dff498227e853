"""Tiled vs whole-image DRCR output and cost, per-tile vs global re-calibration statistics.

DRCR's channel re-calibration modules (CRM) average over the whole input. With ``statistics="tile"``
each tile uses its own averages (one pass); with ``"global"`` the whole image's are first gathered from
the tiles (:mod:`pipeline.statistics`, passes until the means stop changing, at most one per block) and
every tile runs with them. This script reconstructs synthetic scenes (measured spectra, NTIRE 2022 camera
simulation) whole and tiled with the pipeline's own tiling and statistics code and prints, per tile grid,
the largest |tiled − whole| relative to the cube's peak, the MRAE against the ground truth, and the
compute time relative to the whole-image run, side by side in one run.

    python benchmarks/bench_tiling.py --config default --size 384 --cores 64,128 --halos 16,32
    python benchmarks/bench_tiling.py --config ntire --size 128 --cores 32 --halos 16,40
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from drcr_model import DRCRNet, default_weights, reconstruct
from drcr_model.camera import simulate_rgb
from drcr_model.inference import forward, preprocess
from drcr_model.metrics import mrae
from drcr_model.scenes import SceneConfig, make_scene
from pipeline.statistics import gather_statistics, windows_to_batch
from pipeline.tiling import crop_core, extract_window, plan_tiles, stitch


def tiled(
    rgb: np.ndarray, model: DRCRNet, core: int, halo: int, statistics: str, batch: int = 4
) -> tuple[np.ndarray, int]:
    """H×W×bands cube from tiles, and the number of statistics passes it took."""
    x = preprocess(rgb)
    h, w = x.shape[:2]
    tiles = plan_tiles(h, w, max_tile_pixels=1, tile_core=core, halo=halo)
    means, passes = None, 0
    if statistics == "global":
        state = gather_statistics(model, x, tiles, scale=1.0, batch_size=batch)
        means, passes = state.means, state.passes
    cores = []
    for i in range(0, len(tiles), batch):
        group = tiles[i : i + batch]
        y = forward(model, windows_to_batch([extract_window(x, t) for t in group], 1.0), means=means)
        cores += [(t, crop_core(y[j], t)) for j, t in enumerate(group)]
    return stitch(cores, h, w, cores[0][1].shape[0]).transpose(1, 2, 0), passes


def build(config: str) -> tuple[DRCRNet, str]:
    if config == "default":
        w = default_weights()
        return w.load(device="cpu"), f"default weights {w.name} {dict(w.config)}"
    torch.manual_seed(0)
    return DRCRNet().eval(), "NTIRE 2022 configuration (100 ch, 10 blocks), seeded weights (torch.manual_seed(0))"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("default", "ntire"), default="default")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--scenes", type=int, default=1)
    ap.add_argument("--cores", default="64,128")
    ap.add_argument("--halos", default="16,32")
    args = ap.parse_args()
    model, label = build(args.config)
    cfg = SceneConfig(height=args.size, width=args.size)
    rows: dict[tuple[int, int, str], list[tuple[float, float, float, int]]] = {}
    whole_err, whole_s = [], []
    for s in range(args.scenes):
        gt = make_scene(1000 + s, cfg)
        rgb = simulate_rgb(gt, seed=s)
        t0 = time.perf_counter()
        whole = reconstruct(rgb, model, mode="pad")
        whole_s.append(time.perf_counter() - t0)
        whole_err.append(mrae(gt, whole))
        peak = float(np.abs(whole).max())
        for core in map(int, args.cores.split(",")):
            for halo in map(int, args.halos.split(",")):
                for stats in ("tile", "global"):
                    t0 = time.perf_counter()
                    t, passes = tiled(rgb, model, core, halo, stats)
                    dt = time.perf_counter() - t0
                    err = float(np.abs(t - whole).max()) / peak
                    rows.setdefault((core, halo, stats), []).append((err, mrae(gt, t), dt, passes))
    load = os.getloadavg()
    print(f"{label}; {args.scenes} synthetic scene(s) of {args.size}²; torch threads {torch.get_num_threads()}")
    print(f"load average after the run: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (shared box)\n")
    print(f"whole image: MRAE vs ground truth {np.mean(whole_err):.4f}, {np.median(whole_s):.2f} s\n")
    print(
        "| core | halo | window | statistics | passes | max abs diff tiled vs whole / peak | MRAE vs ground truth | time / whole-image time |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (core, halo, stats), vals in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "tile")):
        a = np.array(vals)
        print(
            f"| {core} | {halo} | {core + 2 * halo} | {stats} | {int(a[:, 3].max()) if stats == 'global' else '–'} "
            f"| {a[:, 0].max():.1e} | {a[:, 1].mean():.4f} | {np.median(a[:, 2]) / np.median(whole_s):.2f} |"
        )


if __name__ == "__main__":
    main()

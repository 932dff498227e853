"""Tiled vs whole-image DRCR output, to choose the tiling defaults from a measurement.

DRCR's channel re-calibration modules (CRM) average over the whole input, so a tile never sees exactly
the whole image's statistics; a halo fixes the convolutions' border effects but not that. This script
reconstructs synthetic scenes (measured spectra, NTIRE 2022 camera simulation) whole and tiled with the
pipeline's own tiling code, and prints how far tiled output is from whole-image output and from the
ground truth.

    python benchmarks/bench_tiling.py [--size 512] [--scenes 3] [--weights PATH]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from drcr_model import default_weights, load_model, reconstruct
from drcr_model.camera import simulate_rgb
from drcr_model.inference import forward, preprocess
from drcr_model.metrics import mrae
from drcr_model.scenes import SceneConfig, make_scene
from pipeline.tiling import crop_core, extract_window, plan_tiles, stitch


def tiled(rgb: np.ndarray, model: torch.nn.Module, core: int, halo: int, batch: int = 4) -> np.ndarray:
    x = preprocess(rgb)
    h, w = x.shape[:2]
    tiles = plan_tiles(h, w, max_tile_pixels=1, tile_core=core, halo=halo)
    cores = []
    for i in range(0, len(tiles), batch):
        group = tiles[i : i + batch]
        y = forward(model, np.stack([extract_window(x, t).transpose(2, 0, 1) for t in group]))
        cores += [(t, crop_core(y[j], t)) for j, t in enumerate(group)]
    return stitch(cores, h, w, cores[0][1].shape[0]).transpose(1, 2, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--weights", default=None, help="checkpoint (default: the package's default weights)")
    ap.add_argument("--cores", default="128,256")
    ap.add_argument("--halos", default="0,16,32,64")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    w = default_weights()
    model = load_model(args.weights or w.url, device="cpu")
    label = args.weights or f"{w.name} {dict(w.config)}"
    cfg = SceneConfig(height=args.size, width=args.size)
    rows: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    whole_err = []
    t0 = time.perf_counter()
    for s in range(args.scenes):
        gt = make_scene(1000 + s, cfg)
        rgb = simulate_rgb(gt, seed=s)
        whole = reconstruct(rgb, model, mode="pad")
        whole_err.append(mrae(gt, whole))
        for core in map(int, args.cores.split(",")):
            for halo in map(int, args.halos.split(",")):
                t = tiled(rgb, model, core, halo)
                rel = float(np.mean(np.abs(t - whole) / np.maximum(np.abs(whole), 1e-2)))
                rows.setdefault((core, halo), []).append((rel, float(np.abs(t - whole).max()), mrae(gt, t)))
    print(f"weights: {label}; {args.scenes} synthetic scenes of {args.size}²; {time.perf_counter() - t0:.0f} s\n")
    print(f"whole-image MRAE vs ground truth: {np.mean(whole_err):.4f}\n")
    print("| core | halo | tile side | rel. diff tiled vs whole (mean) | max abs diff | MRAE vs ground truth (tiled) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (core, halo), vals in sorted(rows.items()):
        a = np.array(vals)
        print(f"| {core} | {halo} | {core + 2 * halo} | {a[:, 0].mean():.4f} | {a[:, 1].max():.4f} | {a[:, 2].mean():.4f} |")


if __name__ == "__main__":
    main()

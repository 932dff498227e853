"""CPU inference time of DRCR configurations side by side: is a deeper default within 2× the 2-block time?

Each model is ``C/N`` (seeded weights of C channels, N blocks) or a checkpoint (its configuration is read
from it: trained weights, whose re-calibration statistics need as many passes as they do in a run).
Interleaved rounds (the box is shared), channels_last fp32 as the pipeline runs on CPU, median per model
and its ratio to the first one, for a whole image and for a tiled one with global statistics (the
automatic halo of each depth; the passes counted).

    python benchmarks/bench_depth.py 32/2 32/4 --size 512 --rounds 7
    python benchmarks/bench_depth.py runs/default_weights_scene64_rmse8/last.pth runs/default_weights_b4/last.pth \
        --size 512 --tiled-size 512 --core 256 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from bench_tiling import tiled

from drcr_model.checkpoint import load_model
from drcr_model.net import DRCRNet
from pipeline.config import TilingSpec


def _build(text: str) -> DRCRNet:
    if m := re.fullmatch(r"(\d+)/(\d+)", text):
        torch.manual_seed(0)
        return DRCRNet(channels=int(m[1]), n_blocks=int(m[2])).eval()
    return load_model(text, device="cpu")


def _timed(fn: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="C/N (seeded) or a checkpoint path")
    ap.add_argument("--size", type=int, default=512, help="whole image: 1×3×SIZE×SIZE")
    ap.add_argument("--tiled-size", type=int, default=0, help="also a tiled SIZE² image (0: no tiled column)")
    ap.add_argument("--core", type=int, default=256, help="tile core of the tiled image")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    nets = [_build(m).to(memory_format=torch.channels_last) for m in args.models]  # type: ignore[call-overload]
    x = torch.rand(1, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    rgb = np.random.default_rng(0).random((args.tiled_size, args.tiled_size, 3), dtype=np.float32)
    halos = [TilingSpec().halo_for(len(net.backbone)) for net in nets]
    whole: list[list[float]] = [[] for _ in nets]
    tiles: list[list[float]] = [[] for _ in nets]
    passes = [0 for _ in nets]
    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        for net in nets:
            net(x)  # warm-up, untimed
        for _ in range(args.rounds):
            for i, net in enumerate(nets):
                whole[i].append(_timed(net, x))
                if args.tiled_size:
                    t0 = time.perf_counter()
                    passes[i] = tiled(rgb, net, args.core, halos[i], "global")[1]
                    tiles[i].append(time.perf_counter() - t0)
    print(
        f"whole 1×{args.size}², tiled {args.tiled_size}² (core {args.core}, global statistics); channels_last fp32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load0:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(
        "\n| model | config | MAC / px | whole: median s | vs first | tiled: halo | passes | median s | vs first |"
        "\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for i, (name, net) in enumerate(zip(args.models, nets)):
        cfg = f"{net.config['channels']}/{net.config['n_blocks']}"
        row = f"| {name} | {cfg} | {net.macs_per_pixel():,} | {statistics.median(whole[i]):.3f} | "
        row += f"{statistics.median(whole[i]) / statistics.median(whole[0]):.2f}× | "
        if args.tiled_size:
            med = statistics.median(tiles[i])
            row += f"{halos[i]} | {passes[i]} | {med:.3f} | {med / statistics.median(tiles[0]):.2f}× |"
        else:
            row += "– | – | – | – |"
        print(row)


if __name__ == "__main__":
    main()

"""Our inference path (``drcr_model.inference.forward``, as the actors call it) vs a plain fp32 eager
``model(x)`` of the same model on the same input, plus channels_last; on CUDA also bf16/fp16 autocast,
``torch.compile``, CUDA graphs, % of peak FLOP/s and output MRAE vs fp32.

    .venv/bin/python benchmarks/bench_forward.py [--config small] [--size 256] [--batch 4] [--runs 5]
    .venv/bin/python benchmarks/bench_forward.py --peak-tflops 989   # H100 SXM dense bf16, for the % column
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_model import CONFIGS, count_flops, cpu_name, cpu_threads  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=list(CONFIGS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the %% of peak column (GPU)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from drcr_model.inference import forward
    from drcr_model.net import DRCRNet

    torch.set_num_threads(args.threads or cpu_threads())
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = DRCRNet(**CONFIGS[args.config]).eval().to(dev)
    shape = (args.batch, 3, args.size, args.size)
    x_np = np.random.default_rng(0).random(shape, dtype=np.float32)
    x = torch.from_numpy(x_np).to(dev)
    flops = count_flops(CONFIGS[args.config], shape)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def eager() -> np.ndarray:
        with torch.inference_mode():
            return model(x).cpu().numpy()

    variants: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("eager fp32 `model(x)` (reference)", eager),
        ("ours: `inference.forward` fp32 (numpy in/out)", lambda: forward(model, x_np)),
    ]
    cl = DRCRNet(**CONFIGS[args.config]).eval().to(dev)
    cl.load_state_dict(model.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    variants.append(("ours, channels_last", lambda: forward(cl, x_np, channels_last=True)))
    skipped: list[str] = []
    if cuda:
        torch.backends.cudnn.benchmark = True
        variants += [("ours, bf16 autocast", lambda: forward(model, x_np, precision="bf16")), ("ours, fp16 autocast", lambda: forward(model, x_np, precision="fp16"))]
        compiled = torch.compile(model, mode="max-autotune-no-cudagraphs")
        variants.append(("torch.compile fp32", lambda: forward(compiled, x_np)))

        def graphed() -> Callable[[], np.ndarray]:
            static = x.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    model(static)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(static)

            def run() -> np.ndarray:
                static.copy_(torch.from_numpy(x_np).to(dev, non_blocking=True))
                g.replay()
                return out.float().cpu().numpy()

            return run

        variants.append(("CUDA graph, bf16 autocast", graphed()))
    else:
        skipped = ["bf16/fp16 autocast", "torch.compile", "CUDA graphs", "% of peak FLOP/s"]

    ref = eager()
    rows = []
    load0 = os.getloadavg()
    for name, fn in variants:
        fn()  # warm-up / compile
        times = []
        for _ in range(args.runs):
            sync()
            t0 = time.perf_counter()
            y = fn()
            sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        mrae = float(np.mean(np.abs(y - ref) / np.maximum(np.abs(ref), 1e-3)))
        tflops = flops / med / 1e12
        peak = f"{100 * tflops / args.peak_tflops:.1f}" if args.peak_tflops else "—"
        rows.append(f"| {name} | {med * 1000:.1f} | {shape[0] * shape[2] * shape[3] / med / 1e6:.3f} | {tflops * 1000:.1f} | {peak} | {ref_time(rows, med)} | {mrae:.1e} |")
        print(rows[-1], file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    where = torch.cuda.get_device_name(0) if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    cfg = CONFIGS[args.config]
    print(f"DRCR {args.config} ({cfg['channels']} ch / {cfg['n_blocks']} blocks, {flops / (shape[0] * shape[2] * shape[3]) / 1e6:.2f} MFLOP/px counted), input {'×'.join(map(str, shape))}, {where}, torch {torch.__version__}; median of {args.runs}")
    print(f"load average {load0[0]:.2f} before, {load1[0]:.2f} after\n")
    print("| variant | median ms | MP/s | GFLOP/s | % of peak | time vs eager | MRAE vs eager fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    if skipped:
        print(f"\nNot run (no CUDA on this machine): {', '.join(skipped)}.")
    return 0


_EAGER: list[float] = []


def ref_time(rows: list[str], med: float) -> str:
    if not rows:
        _EAGER[:] = [med]
    return f"{med / _EAGER[0]:.2f}×"


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU forward-pass variants side by side: eager NCHW, channels_last, torch.compile (± channels_last).

Interleaved rounds (the box is shared), median per variant, max relative difference to eager NCHW.

    python benchmarks/bench_cpu_defaults.py --channels 32 --blocks 2 --size 128
    python benchmarks/bench_cpu_defaults.py --channels 100 --blocks 10 --size 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from drcr_model.net import DRCRNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    cfg = {"channels": args.channels, "n_blocks": args.blocks}
    torch.manual_seed(0)
    model = DRCRNet(**cfg).eval()
    x = torch.rand(args.batch, 3, args.size, args.size)

    def run(m: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return m(inp)

    ref = run(model, x)
    nhwc = DRCRNet(**cfg).eval()
    nhwc.load_state_dict(model.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    variants: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("eager NCHW (reference)", lambda: run(model, x)),
        ("channels_last", lambda: run(nhwc, x_nhwc)),
    ]
    if not args.no_compile:
        try:
            compiled, compiled_nhwc = torch.compile(model), torch.compile(nhwc)
            run(compiled, x), run(compiled_nhwc, x_nhwc)  # compile outside the timing
            variants += [
                ("torch.compile", lambda: run(compiled, x)),
                ("torch.compile + channels_last", lambda: run(compiled_nhwc, x_nhwc)),
            ]
        except Exception as exc:  # report, do not hide: the table says it did not run
            print(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    diff: dict[str, float] = {}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, fn in variants:
            t0 = time.perf_counter()
            y = fn()
            times[name].append(time.perf_counter() - t0)
            diff[name] = float((y - ref).abs().max() / ref.abs().max())
    base = statistics.median(times[variants[0][0]])
    print(f"DRCR {cfg}, batch {args.batch}×{args.size}², torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after (shared box)\n")
    print("| variant | median s | time vs eager | max rel. diff |\n| --- | ---: | ---: | ---: |")
    for name, _ in variants:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {med / base:.2f}× | {diff[name]:.1e} |")


if __name__ == "__main__":
    main()

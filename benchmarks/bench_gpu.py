"""The GPU inference matrix for DRCR: precision × channels_last × torch.compile × CUDA graphs × batch size.

Per row: median time, MP/s, achieved TFLOP/s and % of the card's dense peak (``--peak-tflops``, per
precision: fp32 / TF32 / bf16-fp16 dense figures from the card's datasheet), and the output's MRAE
against plain fp32 eager on the same input. Writes the table to ``--out`` (markdown) and prints it.

    # on a GPU machine (prepared for a lent device; e.g. H100 SXM dense: 67 fp32, 494 TF32, 989 bf16/fp16)
    python benchmarks/bench_gpu.py --config full --size 512 --batches 1,4,8 --peak-tflops 67,494,989 \
        --out benchmarks/results/gpu.md
    # CPU smoke mode (what the unit test runs): tiny model, fp32 rows only, CUDA rows listed as not run
    python benchmarks/bench_gpu.py --smoke --out /tmp/gpu_smoke.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_model import CONFIGS, count_flops  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def _runner(model, x, precision: str, channels_last: bool, compiled: bool, graphs: bool) -> Callable[[], object]:  # type: ignore[no-untyped-def]
    """A zero-argument function running one forward pass of the variant (CUDA graph captured up front)."""
    import torch

    cuda = x.device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    m = (
        model.to(memory_format=torch.channels_last)
        if channels_last
        else model.to(memory_format=torch.contiguous_format)
    )
    inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    if compiled:
        m = torch.compile(m, mode="max-autotune-no-cudagraphs" if cuda else "default")

    def step() -> object:
        with (
            torch.inference_mode(),
            torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            return m(inp)

    if not graphs:
        return step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    return lambda: (g.replay(), out)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="full", choices=list(CONFIGS))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--peak-tflops", default="", help="dense peak per precision: fp32,tf32,bf16/fp16 (TFLOP/s)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 16², 1 run: checks the script on a CPU")
    p.add_argument("--out", default="", help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.size, args.batches, args.runs = "tiny", 16, "1,2", 1

    import numpy as np
    import torch

    from drcr_model.net import DRCRNet

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    peaks = [float(v) for v in args.peak_tflops.split(",")] if args.peak_tflops else []
    peak_of = dict(zip(("fp32", "tf32", "bf16"), peaks)) | ({"fp16": peaks[2]} if len(peaks) > 2 else {})
    torch.manual_seed(0)
    model = DRCRNet(**CONFIGS[args.config]).eval().to(dev)
    rows, not_run = [], []
    load0 = os.getloadavg()
    for batch in map(int, args.batches.split(",")):
        shape = (batch, 3, args.size, args.size)
        x = torch.from_numpy(np.random.default_rng(batch).random(shape, dtype=np.float32)).to(dev)
        flops = count_flops(CONFIGS[args.config], shape)
        with torch.inference_mode():
            ref = model(x).float()
        for prec, cl, comp, graphs in itertools.product(PRECISIONS, (False, True), (False, True), (False, True)):
            name = f"{prec}, channels_last {cl}, compile {comp}, CUDA graphs {graphs}, batch {batch}"
            if not cuda and (prec != "fp32" or graphs or comp):  # the CUDA rows: for GPU runs
                not_run.append(name)
                continue
            fn = _runner(model, x, prec, cl, comp, graphs)
            fn()  # warm-up, compile, autotune
            times = []
            for _ in range(args.runs):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                y = fn()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            y = y.float()  # type: ignore[attr-defined]
            mrae = float(((y - ref).abs() / ref.abs().clamp_min(1e-3)).mean())
            tf = flops / med / 1e12
            pct = f"{100 * tf / peak_of[prec]:.1f}" if prec in peak_of else "—"
            mps = batch * args.size**2 / med / 1e6
            rows.append(
                f"| {prec} | {cl} | {comp} | {graphs} | {batch} | {med * 1e3:.2f} | {mps:.2f} | {tf:.2f} | {pct} | {mrae:.1e} |"
            )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    where = torch.cuda.get_device_name(0) if cuda else "CPU (smoke: CUDA rows not run)"
    cfg = CONFIGS[args.config]
    lines = [
        f"DRCR {args.config} ({cfg['channels']} ch / {cfg['n_blocks']} blocks), {args.size}², {where}, torch "
        f"{torch.__version__}; median of {args.runs}; load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after",
        "",
        "| precision | channels_last | compile | CUDA graphs | batch | median ms | MP/s | TFLOP/s | % of dense peak | MRAE vs fp32 eager |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]
    if not_run:
        lines += ["", f"Not run (no CUDA here): {len(not_run)} rows, e.g. {not_run[0]}."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

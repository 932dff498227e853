"""DRCR Net forward cost: counted FLOP per pixel, forward time, throughput and peak memory.

Each (configuration, variant) runs in a fresh subprocess so that the peak RSS reported is that
case's own (``resource.getrusage(...).ru_maxrss`` never goes down within a process). FLOPs are
counted with ``torch.utils.flop_counter.FlopCounterMode`` on meta tensors (exact, no compute);
like the spec (§4) it counts 2 FLOP per multiply-accumulate of convolutions and matmuls only.

    .venv/bin/python benchmarks/bench_model.py                  # full 100/10 + tiny 16/1 + small 32/2, 1x3x256x256
    .venv/bin/python benchmarks/bench_model.py --runs 5 --size 128 --configs tiny small
    .venv/bin/python benchmarks/bench_model.py --cpu-bf16       # also time bf16 autocast on the CPU (very slow on AVX2)

On CUDA the variants are fp32 (TF32 off), channels_last, bf16 and fp16 autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "full": {"in_channels": 3, "out_channels": 31, "channels": 100, "n_blocks": 10},
    "small": {"in_channels": 3, "out_channels": 31, "channels": 32, "n_blocks": 2},
    "tiny": {"in_channels": 3, "out_channels": 31, "channels": 16, "n_blocks": 1},
}
CPU_VARIANTS = ("fp32", "channels_last", "bf16")
CUDA_VARIANTS = ("fp32", "channels_last", "bf16", "fp16")


def cpu_threads() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS says so)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def count_flops(config: dict[str, int], shape: tuple[int, ...]) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from drcr_model.net import DRCRNet

    with torch.device("meta"):
        model = DRCRNet(**config).eval()
        x = torch.empty(shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def worker(args: argparse.Namespace) -> dict[str, object]:
    """One (config, variant) measurement in this process; returns a JSON-ready dict."""
    import torch

    from drcr_model.net import DRCRNet

    torch.set_num_threads(cpu_threads())
    device = torch.device(args.device)
    config = CONFIGS[args.config]
    shape = (args.batch, 3, args.size, args.size)
    flops = count_flops(config, shape)
    torch.manual_seed(0)
    model = DRCRNet(**config).eval().to(device)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    if args.variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.variant)

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        ):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.warmup):
        once()
    times = [once() for _ in range(args.runs)]
    out: dict[str, object] = {
        "config": args.config,
        "variant": args.variant,
        "params": sum(p.numel() for p in model.parameters()),
        "flops": flops,
        "pixels": args.batch * args.size * args.size,
        "times": times,
        "rss_before": rss_before,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


def run_case(args: argparse.Namespace, config: str, variant: str, runs: int) -> dict[str, object]:
    cmd = [
        sys.executable, __file__, "--worker", "--config", config, "--variant", variant, "--device", args.device,
        "--size", str(args.size), "--batch", str(args.batch), "--runs", str(runs), "--warmup", str(args.warmup),
    ]  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"config": config, "variant": variant, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_row(r: dict[str, object], args: argparse.Namespace) -> str:
    cfg = CONFIGS[str(r["config"])]
    name = f"{r['config']} ({cfg['channels']} ch / {cfg['n_blocks']} blk)"
    if "skip" in r:
        return f"| {name} | {r['variant']} | | | {r['skip']} | | | |"
    if "error" in r:
        return f"| {name} | {r['variant']} | | | failed: {r['error']} | | | |"
    times = list(r["times"])  # type: ignore[call-overload]
    med = statistics.median(times)
    mflop = r["flops"] / r["pixels"] / 1e6  # type: ignore[operator]
    mflop_s = f"{mflop:.2f}" if mflop >= 1 else f"{mflop:.3f}"
    mem = f"{r['peak_rss'] / 1e9:.2f} (before fwd {r['rss_before'] / 1e9:.2f})"  # type: ignore[operator]
    if "peak_cuda" in r:
        mem += f"; CUDA {r['peak_cuda'] / 1e9:.2f}"  # type: ignore[operator]
    return (
        f"| {name} | {r['variant']} | {r['params']:,} | {mflop_s} | {med:.3f} | "
        f"{min(times):.3f}–{max(times):.3f} (n={len(times)}) | {r['pixels'] / med / 1e6:.4f} | {mem} |"  # type: ignore[operator]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["full", "small", "tiny"])
    p.add_argument("--size", type=int, default=256, help="input is BATCH x 3 x SIZE x SIZE (multiple of 4)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=None, help="timed runs per case (default: 3 for full, 10 otherwise)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--cpu-bf16", action="store_true", help="also time bf16 autocast on the CPU")
    p.add_argument("--variants", nargs="+", default=None, help="subset of fp32 channels_last bf16 fp16")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.size % 4:
        p.error(f"--size must be a multiple of 4 (DRCR Net constraint), got {args.size}")

    import torch

    cuda = args.device.startswith("cuda")
    variants = args.variants or list(CUDA_VARIANTS if cuda else CPU_VARIANTS)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    for config in args.configs:
        runs = args.runs if args.runs is not None else (3 if config == "full" else 10)
        for variant in variants:
            if not cuda and variant == "fp16":
                rows.append({"config": config, "variant": variant, "skip": "not run: CPU (fp16 is a GPU path)"})
            elif not cuda and variant == "bf16" and not args.cpu_bf16:
                if {"avx512_bf16", "amx_bf16"} & cpu_flags():
                    why = "not run on CPU (this CPU has AVX-512 BF16; pass --cpu-bf16)"
                else:
                    why = "not run: CPU AVX2, ~400x slower (pass --cpu-bf16)"
                rows.append({"config": config, "variant": variant, "skip": why})
            else:
                rows.append(run_case(args, config, variant, runs))
                print(f"done {config}/{variant}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    dev = torch.cuda.get_device_name(0) if cuda else f"{cpu_name()}, {cpu_threads()} threads"
    print(
        f"DRCR Net forward, {args.batch}x3x{args.size}x{args.size}, eval + inference_mode, torch {torch.__version__}, {dev}"
    )
    print(f"load average (1 min) {load0[0]:.2f} before, {load1[0]:.2f} after; wall {time.perf_counter() - t0:.0f} s\n")
    print("| config | variant | params | MFLOP/px (counted) | median s | min–max s | MP/s | peak RSS GB |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | --- |")
    for r in rows:
        print(fmt_row(r, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Big images: prepare-task peak memory and decode time per MP, streaming path (libvips) vs Pillow, by size.

Each measurement is :func:`pipeline.work.prepare_image` run in a fresh process of its own (``ru_maxrss``,
so nothing else in the process counts): read, hash, decode, whole-image maximum, tile plan, cube metadata,
then every tile window cut and dropped (the driver's side, with its bounded window budget, is not in it).
Inputs are seeded generated JPEGs (a 256² noise tile over smooth ramps), written by libvips to ``--dir``
without ever holding an image whole. ``--dir`` also gets the decoded local copy of the streaming path.

    .venv/bin/python benchmarks/bench_bigimage.py                     # 1, 16, 108 MP and 1 GP
    .venv/bin/python benchmarks/bench_bigimage.py --sizes 1,16 --pillow-max-mp 200

Three paths per size: Pillow, the streaming path as the pipeline runs it (one libvips thread,
``bigdecode.VIPS_THREADS``) and the streaming path with libvips's default thread count (one per CPU), to show
what the one thread costs and saves. Decode and window times are the median of ``--repeats`` runs (paths
interleaved in each round, so load drift hits them alike); images over ``--repeat-max-mp`` are timed once.
A second table gives the same work in CPU seconds (all threads of the process), which load changes less.
The goal checked in the last columns (issue 16): the largest image's streaming peak ≤ 1.2 × the smallest
image's peak on its default path (Pillow at 1 MP) + the window budget (32 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]


def default_halo() -> int:
    """The default tiling's halo for the shipped default weights."""
    from drcr_model.weights import default_weights
    from pipeline.config import TilingSpec

    return TilingSpec().halo_for(int(default_weights().config["n_blocks"]))


SIDES = {1: (1024, 1024), 4: (2048, 2048), 16: (4096, 4096), 108: (12000, 9000), 1000: (32000, 31250)}


def make_jpeg(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A seeded JPEG, streamed to disk by libvips (memory independent of the size)."""
    import numpy as np
    import pyvips

    if path.exists():
        return path
    tile = np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    noise = pyvips.Image.new_from_array(tile).copy(interpretation="srgb")
    noise = noise.replicate(width // 256 + 1, height // 256 + 1).crop(0, 0, width, height)
    xyz = pyvips.Image.xyz(width, height)
    ramps = (xyz[0] * (200.0 / width) + xyz[1] * (55.0 / height)).bandjoin(
        [(xyz[0] * 0.01).sin() * 60 + 100, (xyz[1] * 0.013).sin() * 60 + 100]
    )
    image = (ramps * 0.85 + noise * 0.15).cast("uchar").copy(interpretation="srgb")
    tmp = path.with_suffix(".part.jpg")
    image.jpegsave(str(tmp), Q=85)
    tmp.rename(path)
    return path


PATHS = {"pillow": (2**62, 1), "stream": (0, 1), "stream_mt": (0, 0)}
"""Path name → (``decode.stream_pixels``, ``bigdecode.VIPS_THREADS``): Pillow, the streaming path as the
pipeline runs it (one libvips thread), and the streaming path with libvips's default thread count."""


def _set_threads(path: str) -> None:
    from pipeline import bigdecode

    bigdecode.VIPS_THREADS = PATHS[path][1]


def child(image: str, path: str, out: str) -> dict[str, float]:
    """One prepare task in this process; the figures as a dict."""
    from drcr_model.weights import untrained_demo_weights
    from pipeline.config import JobSpec
    from pipeline.sources import ImageRef
    from pipeline.work import JobContext, prepare_image

    stream_pixels = PATHS[path][0]
    _set_threads(path)
    spec = JobSpec.from_dict(
        {
            "inputs": [image],
            "output": out,
            "decode": {"max_pixels": 2_000_000_000, "stream_pixels": stream_pixels},
        }
    )
    w = untrained_demo_weights(Path(out) / "w").to_record()
    ctx = JobContext(spec=spec, weights=w, fingerprint="bench", run_id=f"bench-{time.time()}")
    t0 = time.perf_counter()
    items = prepare_image(ctx, ImageRef(image, None, "file"))
    meta = next(items)
    assert getattr(meta, "status", None) == "run", meta
    windows = sum(1 for _ in items)
    t2 = time.perf_counter()
    return {
        "mp": meta.width * meta.height / 1e6,
        "prepare_s": t2 - t0,
        "windows": windows,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def timed(image: str, path: str) -> dict[str, float]:
    """Decode time alone (fetch + hash + decode + maximum), then every window cut: no cube, no provenance."""
    from pipeline.bigdecode import decode_encoded, fetch_encoded
    from pipeline.config import DecodeSpec, TilingSpec
    from pipeline.sources import ImageRef
    from pipeline.tiling import extract_window, plan_tiles

    spec = DecodeSpec(max_pixels=2_000_000_000, stream_pixels=PATHS[path][0])
    _set_threads(path)
    t = TilingSpec(halo=default_halo())
    t0, c0 = time.perf_counter(), time.process_time()
    decoded = decode_encoded(fetch_encoded(ImageRef(image, None, "file"), None, None, spec), spec)
    decoded.max()
    t1, c1 = time.perf_counter(), time.process_time()
    tiles = plan_tiles(
        decoded.height, decoded.width, max_tile_pixels=t.max_tile_pixels, tile_core=t.tile_core, halo=t.halo
    )
    for tile in tiles:
        extract_window(decoded, tile)
    return {
        "decode_s": t1 - t0,
        "windows_s": time.perf_counter() - t1,
        "decode_cpu_s": c1 - c0,  # every thread of the process: what the work costs, whatever the load
        "windows_cpu_s": time.process_time() - c1,
    }


def compare(image: str) -> int:
    """Max |streaming − Pillow| over every tile window of ``image`` (both decoded in this process)."""
    import numpy as np

    from pipeline.bigdecode import EncodedImage, decode_encoded
    from pipeline.config import DecodeSpec, TilingSpec
    from pipeline.tiling import extract_window, plan_tiles

    data = Path(image).read_bytes()
    t = TilingSpec(halo=default_halo())

    def decoded(stream_pixels: int):  # type: ignore[no-untyped-def]
        spec = DecodeSpec(max_pixels=2_000_000_000, stream_pixels=stream_pixels)
        return decode_encoded(EncodedImage(name=image, sha256="", nbytes=len(data), data=data), spec)

    a, b = decoded(0), decoded(2**62)
    tiles = plan_tiles(a.height, a.width, max_tile_pixels=t.max_tile_pixels, tile_core=t.tile_core, halo=t.halo)
    worst = 0
    for tile in tiles:
        x, y = extract_window(a, tile), extract_window(b, tile)
        worst = max(worst, int(np.abs(x.astype(np.int32) - y).max()))
    return worst


GOAL_FACTOR, WINDOW_BUDGET_MB = 1.2, 32


def _run(args: list[str], env: dict[str, str]) -> dict[str, float]:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def measure(image: Path, paths: list[str], repeats: int, env: dict[str, str], root: Path) -> dict[str, object]:
    """Peak memory (one fresh prepare process per path) and median decode/window times per path."""
    row: dict[str, object] = {}
    for path in paths:
        with tempfile.TemporaryDirectory(dir=root) as out:
            row[path] = _run(["--child", str(image), path, out], env)
    times: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    for _ in range(repeats):
        for path in paths:
            times[path].append(_run(["--timed", str(image), path], env))
    for path in paths:
        for key in ("decode_s", "windows_s", "decode_cpu_s", "windows_cpu_s"):
            row[path][key] = _median([t[key] for t in times[path]])  # type: ignore[index]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,16,108,1000", help=f"MP, among {sorted(SIDES)}")
    p.add_argument("--pillow-max-mp", type=float, default=200, help="skip Pillow above this (≈ 4 bytes/pixel)")
    p.add_argument("--compare-max-mp", type=float, default=120, help="compare windows up to this size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    p.add_argument("--repeat-max-mp", type=float, default=2000, help="time larger images once")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "drcr-bench-bigimage"))
    p.add_argument("--child", nargs=3, metavar=("IMAGE", "PATH", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--compare", metavar="IMAGE", help=argparse.SUPPRESS)
    p.add_argument("--timed", nargs=2, metavar=("IMAGE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if args.timed:
        print(json.dumps(timed(*args.timed)))
        return 0
    if args.compare:
        print(json.dumps({"max_diff": compare(args.compare)}))
        return 0

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(root), OMP_NUM_THREADS="1")
    env.pop("VIPS_CONCURRENCY", None)  # "libvips's default threads" must be its default
    rows = []
    load_before = os.getloadavg()[0]
    for mp in [int(s) for s in args.sizes.split(",")]:
        width, height = SIDES[mp]
        image = make_jpeg(root / f"seeded_{width}x{height}.jpg", width, height)
        paths = [q for q in PATHS if not (q == "pillow" and width * height / 1e6 > args.pillow_max_mp)]
        repeats = args.repeats if width * height / 1e6 <= args.repeat_max_mp else 1
        row = {"mp": width * height / 1e6, "jpeg_mb": image.stat().st_size / 1e6, "repeats": repeats}
        row |= measure(image, paths, repeats, env, root)
        if width * height / 1e6 <= args.compare_max_mp:
            row["max_diff"] = _run(["--compare", str(image)], env)["max_diff"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print_table(rows, load_before, os.getloadavg()[0])
    return 0


def print_table(rows: list[dict[str, object]], load_before: float, load_after: float) -> None:
    """The markdown table, with the goal's check per row (streaming peak ÷ the smallest image's peak on its
    default path, and the goal's MB)."""
    first = rows[0]
    base = first.get("pillow", first.get("stream"))
    assert isinstance(base, dict)
    goal = GOAL_FACTOR * base["peak_mb"] + WINDOW_BUDGET_MB
    print(
        f"load average {load_before:.1f} at the start, {load_after:.1f} at the end, on {os.cpu_count()} CPUs; "
        f"seeded JPEG inputs; default tiling (512 + 2×{default_halo()}); times: median of the runs in 'n'"
    )
    print(
        f"goal: streaming peak ≤ {GOAL_FACTOR} × {base['peak_mb']:.0f} MB ({first['mp']:.0f} MP, default path) "
        f"+ {WINDOW_BUDGET_MB} MB (window budget) = {goal:.0f} MB"
    )
    print()
    print(
        "| image | JPEG | n | peak MB, Pillow | peak MB, streaming | peak MB, streaming, libvips threads | "
        "streaming ÷ 1 MP | vs goal | prepare s, Pillow | prepare s, streaming | decode s/MP, Pillow | "
        "decode s/MP, streaming | decode s/MP, streaming, libvips threads | windows s/MP, Pillow | "
        "windows s/MP, streaming | max \\|Δ\\| |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pil, st, mt = r.get("pillow"), r.get("stream"), r.get("stream_mt")

        def f(d, key, per_mp=False):  # type: ignore[no-untyped-def]
            if not d:
                return "—"
            return f"{d[key] / d['mp']:.4f}" if per_mp else f"{d[key]:.0f}" if key == "peak_mb" else f"{d[key]:.1f}"

        ratio = f"{st['peak_mb'] / base['peak_mb']:.2f}×" if st else "—"  # type: ignore[index]
        verdict = (f"{st['peak_mb'] - goal:+.0f} MB, " + ("met" if st["peak_mb"] <= goal else "missed")) if st else "—"  # type: ignore[index]
        print(
            f"| {r['mp']:.0f} MP | {r['jpeg_mb']:.1f} MB | {r['repeats']} | {f(pil, 'peak_mb')} | {f(st, 'peak_mb')} | "
            f"{f(mt, 'peak_mb')} | {ratio} | {verdict} | {f(pil, 'prepare_s')} | {f(st, 'prepare_s')} | "
            f"{f(pil, 'decode_s', True)} | {f(st, 'decode_s', True)} | {f(mt, 'decode_s', True)} | "
            f"{f(pil, 'windows_s', True)} | {f(st, 'windows_s', True)} | {r.get('max_diff', '—')} |"
        )
    print()
    print("CPU seconds per MP (user + sys of every thread of the process; less sensitive to load than wall time):")
    print()
    print(
        "| image | decode, Pillow | decode, streaming | decode, streaming, libvips threads | windows, Pillow | "
        "windows, streaming | windows, streaming, libvips threads |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            f"{d[key] / d['mp']:.4f}" if (d := r.get(path)) else "—"  # type: ignore[index, operator]
            for key in ("decode_cpu_s", "windows_cpu_s")
            for path in PATHS
        ]
        print(f"| {r['mp']:.0f} MP | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())

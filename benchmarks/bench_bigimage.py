"""Big images: prepare-task peak memory and decode time per MP, streaming path (libvips) vs Pillow, by size.

Each measurement is :func:`pipeline.work.prepare_image` run in a fresh process of its own (``ru_maxrss``,
so nothing else in the process counts): read, hash, decode, whole-image maximum, tile plan, cube metadata,
then every tile window cut and dropped (the driver's side, with its bounded window budget, is not in it).
Inputs are seeded generated JPEGs (a 256² noise tile over smooth ramps), written by libvips to ``--dir``
without ever holding an image whole. ``--dir`` also gets the decoded local copy of the streaming path.

    .venv/bin/python benchmarks/bench_bigimage.py                     # 1, 4, 16, 108 MP and 1 GP
    .venv/bin/python benchmarks/bench_bigimage.py --sizes 1,16 --pillow-max-mp 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

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


def child(image: str, path: str, out: str) -> dict[str, float]:
    """One prepare task in this process; the figures as a dict."""
    from drcr_model.weights import untrained_demo_weights
    from pipeline.config import JobSpec
    from pipeline.sources import ImageRef
    from pipeline.work import JobContext, prepare_image

    stream_pixels = 0 if path == "stream" else 2**62
    spec = JobSpec.from_dict(
        {
            "inputs": [image],
            "output": out,
            "decode": {"max_pixels": 2_000_000_000, "stream_pixels": stream_pixels},
            "inference": {"stand_in_latency_s": 0.001},
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

    spec = DecodeSpec(max_pixels=2_000_000_000, stream_pixels=0 if path == "stream" else 2**62)
    t = TilingSpec().with_halo_for(2)  # the default weights' 2 blocks
    t0 = time.perf_counter()
    decoded = decode_encoded(fetch_encoded(ImageRef(image, None, "file"), None, None, spec), spec)
    decoded.max()
    t1 = time.perf_counter()
    tiles = plan_tiles(
        decoded.height, decoded.width, max_tile_pixels=t.max_tile_pixels, tile_core=t.tile_core, halo=t.halo
    )
    for tile in tiles:
        extract_window(decoded, tile)
    return {"decode_s": t1 - t0, "windows_s": time.perf_counter() - t1}


def compare(image: str) -> int:
    """Max |streaming − Pillow| over every tile window of ``image`` (both decoded in this process)."""
    import numpy as np

    from pipeline.bigdecode import EncodedImage, decode_encoded
    from pipeline.config import DecodeSpec, TilingSpec
    from pipeline.tiling import extract_window, plan_tiles

    data = Path(image).read_bytes()
    t = TilingSpec().with_halo_for(2)  # the default weights' 2 blocks

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,4,16,108,1000", help=f"MP, among {sorted(SIDES)}")
    p.add_argument("--pillow-max-mp", type=float, default=200, help="skip Pillow above this (≈ 4 bytes/pixel)")
    p.add_argument("--compare-max-mp", type=float, default=120, help="compare windows up to this size")
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
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for mp in sizes:
        width, height = SIDES[mp]
        image = make_jpeg(root / f"seeded_{width}x{height}.jpg", width, height)
        row: dict[str, object] = {"mp": width * height / 1e6, "jpeg_mb": image.stat().st_size / 1e6}
        for path in ("pillow", "stream"):
            if path == "pillow" and width * height / 1e6 > args.pillow_max_mp:
                continue
            with tempfile.TemporaryDirectory(dir=root) as out:
                cmd = [sys.executable, __file__, "--child", str(image), path, out]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            row[path] = json.loads(res.stdout.strip().splitlines()[-1])
            cmd = [sys.executable, __file__, "--timed", str(image), path]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            row[path] |= json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[operator]
        if width * height / 1e6 <= args.compare_max_mp:
            res = subprocess.run(
                [sys.executable, __file__, "--compare", str(image)], capture_output=True, text=True, env=env, check=True
            )
            row["max_diff"] = json.loads(res.stdout.strip().splitlines()[-1])["max_diff"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    base = next((r["stream"]["peak_mb"] for r in rows if "stream" in r), None)  # type: ignore[index]
    small = rows[0].get("pillow", rows[0].get("stream"))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; JPEG inputs; default tiling (512 + 2×32)")
    print()
    print(
        "| image | JPEG | prepare peak MB, Pillow | prepare peak MB, streaming | prepare s, Pillow | prepare s, "
        "streaming | decode s/MP, Pillow | decode s/MP, streaming | windows s/MP, Pillow | windows s/MP, streaming "
        "| max \\|Δ\\| |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pil, st = r.get("pillow"), r.get("stream")

        def f(d, key, per_mp=False):  # type: ignore[no-untyped-def]
            if not d:
                return "—"
            return f"{d[key] / d['mp']:.4f}" if per_mp else f"{d[key]:.0f}" if key == "peak_mb" else f"{d[key]:.1f}"

        diff = r.get("max_diff", "—")
        print(
            f"| {r['mp']:.0f} MP | {r['jpeg_mb']:.1f} MB | {f(pil, 'peak_mb')} | {f(st, 'peak_mb')} | "
            f"{f(pil, 'prepare_s')} | {f(st, 'prepare_s')} | "
            f"{f(pil, 'decode_s', True)} | {f(st, 'decode_s', True)} | {f(pil, 'windows_s', True)} | "
            f"{f(st, 'windows_s', True)} | {diff} |"
        )
    if small and base and rows[-1].get("stream"):
        big = rows[-1]["stream"]["peak_mb"]  # type: ignore[index]
        budget = 32
        print()
        print(
            f"largest / smallest: {big:.0f} MB vs {small['peak_mb']:.0f} MB ({small['mp']:.0f} MP, fastest path) "
            f"= {big / small['peak_mb']:.2f}×; goal ≤ 1.2 × {small['peak_mb']:.0f} + {budget} (window budget) "
            f"= {1.2 * small['peak_mb'] + budget:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

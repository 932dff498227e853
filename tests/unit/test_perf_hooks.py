"""Benchmark hooks and the overlapped-write predictor: the stand-in predictor (``benchmarks/standin.py``), peak
RSS, thread safety."""

from __future__ import annotations

import platform
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from standin import StandIn, stand_in

from drcr_model.weights import untrained_demo_weights
from pipeline import cubes
from pipeline.config import JobSpec
from pipeline.tiling import plan_tiles
from pipeline.work import JobContext, Predictor, peak_rss

REPO = Path(__file__).resolve().parents[2]


def test_peak_rss_is_bytes() -> None:
    assert peak_rss() > 10 * 1024 * 1024


@pytest.mark.parametrize("latency_s", [None, 0.01], ids=["model", "stand-in"])
def test_concurrent_runs_write_every_core(tmp_path, monkeypatch, latency_s: float | None) -> None:  # type: ignore[no-untyped-def]
    from pipeline import work

    monkeypatch.setattr(work, "bound_heap", lambda: None)  # it cannot be undone in this test process
    w = untrained_demo_weights(tmp_path / "w")
    spec = JobSpec.from_dict({"inputs": ["x"], "output": str(tmp_path / "out"), "output_options": {"chunk": 16}})
    ctx = JobContext(spec=spec, weights=w.to_record(), fingerprint="f", run_id="r")
    pred = Predictor(ctx, device="cpu") if latency_s is None else StandIn(ctx, latency_s=latency_s, device="cpu")
    tiles = plan_tiles(64, 64, max_tile_pixels=16, tile_core=16, halo=8)
    cubes.create_cube(pred.store, "g", height=64, width=64, bands_nm=ctx.bands_nm, spec=spec.output_options, provenance={})
    windows = [np.full((t.height, t.width, 3), 100, np.uint8) for t in tiles]
    batches = [(tiles[i : i + 4], windows[i : i + 4]) for i in range(0, len(tiles), 4)]
    results: list[dict] = []
    threads = [threading.Thread(target=lambda b=b: results.append(pred.run("g", 200.0, list(b[0]), list(b[1])))) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cube = zarr.open_array(pred.store, path="g/cube", mode="r")[:]
    assert len(results) == len(batches) and all(r["peak_rss"] > 0 for r in results)
    assert not np.isnan(cube).any()  # every core written before each run() returned
    if latency_s is not None:
        assert (cube == 0).all()


_HEAP_PROBE = """
import sys
import numpy as np
if sys.argv[1] == "bounded":
    from pipeline.work import bound_heap
    bound_heap()
a = np.ones(16 << 20, np.uint8)  # mmapped; freeing it makes glibc raise its mmap threshold to 16 MiB ...
del a
b = np.ones(8 << 20, np.uint8)  # ... so this one comes from the heap, unless the threshold is fixed
addr = b.ctypes.data
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        print("heap" if lo <= addr < hi else "mmap")
        break
else:
    print("mmap")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc malloc behaviour")
def test_bound_heap_maps_big_buffers_on_their_own() -> None:
    """Without ``bound_heap`` glibc serves a batch-sized buffer from the heap once a bigger one was freed
    (the heap then fragments and holds more than is in use); with it, the buffer is mapped on its own and
    returned to the OS when freed."""
    import subprocess

    def where(mode: str) -> str:
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True, cwd=REPO)
        return out.stdout.strip()

    assert where("default") == "heap"  # the mechanism, as glibc does it
    assert where("bounded") == "mmap"


def test_cpu_predictor_trims_every_few_batches_and_others_bound_the_heap(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Fixing the mmap threshold made CPU convolutions 1.55× slower: a CPU predictor keeps glibc's default
    and trims its heaps every ``TRIM_EVERY`` batches instead; the stand-in (no compute) bounds the heap."""
    from pipeline import work

    calls: list[str] = []
    monkeypatch.setattr(work, "bound_heap", lambda: calls.append("bound"))
    monkeypatch.setattr(work, "release_free_memory", lambda: calls.append("trim"))
    w = untrained_demo_weights(cache_dir=tmp_path / "w")
    tiles = plan_tiles(16, 16, max_tile_pixels=1, tile_core=8, halo=4)
    window = np.zeros((16, 16, 3), np.uint8)
    for name, make, expect in [("model", Predictor, ["trim", "trim"]), ("stand-in", stand_in(0.01), ["bound"])]:
        calls.clear()
        spec = JobSpec.from_dict({"inputs": ["x"], "output": str(tmp_path / f"o-{name}"), "weights": {"path": w.url}, "inference": {"device": "cpu"}, "tiling": {"tile_core": 8, "halo": 4}, "output_options": {"chunk": 8}})
        ctx = JobContext(spec=spec, weights=w.to_record(), fingerprint="f", run_id="r")
        cubes.create_cube(cubes.open_cubes(spec.output), "g", height=16, width=16, bands_nm=ctx.bands_nm, spec=spec.output_options, provenance={})
        predictor = make(ctx, num_cpus=1)
        for _ in range(2 * work.TRIM_EVERY + 1):
            predictor.run("g", 255.0, tiles[:1], [window])
        assert calls == expect, name


def test_cpu_predictor_trims_during_statistics_passes_too(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An image with global statistics runs its passes on the actor before its batches: a pass's batches
    count toward ``TRIM_EVERY`` as predictions do (untrimmed, the tiny model's CPU actor reached 1.86x its
    1024² peak at 8192²)."""
    from pipeline import work

    calls: list[str] = []
    monkeypatch.setattr(work, "release_free_memory", lambda: calls.append("trim"))
    w = untrained_demo_weights(cache_dir=tmp_path / "w")
    tiles = plan_tiles(32, 32, max_tile_pixels=1, tile_core=8, halo=4)  # 16 tiles
    spec = JobSpec.from_dict({"inputs": ["x"], "output": str(tmp_path / "o"), "weights": {"path": w.url}, "inference": {"device": "cpu"}, "tiling": {"tile_core": 8, "halo": 4}, "output_options": {"chunk": 8}})
    ctx = JobContext(spec=spec, weights=w.to_record(), fingerprint="f", run_id="r")
    predictor = Predictor(ctx, num_cpus=1)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    _, passes = predictor.gather_means(255.0, image, tiles, batch_size=1)
    assert passes >= 1 and calls.count("trim") == passes * len(tiles) // work.TRIM_EVERY


@pytest.mark.integration
def test_stand_in_injected_through_run_job_writes_every_core(tmp_path: Path, ray_local) -> None:  # type: ignore[no-untyped-def]
    """The benchmarks' way in: ``run_job(spec, predictor=stand_in(latency))`` runs the stand-in on every
    actor (its latency in each batch's compute time, its zeros in every cube), and every core of every image
    is written and marked complete, tiled images with global statistics (one row per image) and with tile
    statistics (batch rows) alike."""
    from PIL import Image

    from pipeline.execution import run_job
    from pipeline.sample import sample_image

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(7)
    for name, (h, w) in {"a.png": (40, 56), "b.png": (48, 32)}.items():
        Image.fromarray(sample_image(rng, h, w)).save(src / name)
    weights = untrained_demo_weights(tmp_path / "w")
    latency = 0.02
    for statistics in ("global", "tile"):
        out = tmp_path / f"out-{statistics}"
        spec = JobSpec.from_dict({"inputs": [str(src)], "output": str(out), "weights": {"path": weights.url}, "tiling": {"max_tile_pixels": 256, "tile_core": 16, "halo": 8, "statistics": statistics}, "output_options": {"chunk": 16}, "ray": {"actors": 1, "num_cpus_per_actor": 1, "batch_size": 2}})  # fmt: skip
        summary = run_job(spec, predictor=stand_in(latency))
        assert (summary.ok, summary.failed) == (2, 0), summary.to_dict()
        batches = summary.compute["batches"]
        assert batches == 12 // 2 + 6 // 2  # cores of 16²: 3 × 4 and 3 × 2 tiles, 2 per batch
        assert summary.compute["busy_s"] >= batches * latency  # every batch slept: the stand-in, not the model
        store = cubes.open_cubes(str(out), {})
        for row in pq.read_table(out / "manifest" / "manifest.parquet").to_pylist():
            assert (cubes.read_status(store, row["group"]) or {}).get("complete") is True
            cube = zarr.open_array(store, path=f"{row['group']}/cube", mode="r")[:]
            assert cube.shape == (31, row["height"], row["width"])
            assert (cube == 0).all()  # every core written (no fill left), with the stand-in's zeros

"""Benchmark hooks and the overlapped-write predictor: stand-in latency, peak RSS, thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr

from drcr_model.weights import untrained_demo_weights
from pipeline import cubes
from pipeline.config import InferenceSpec, JobSpec
from pipeline.errors import ConfigError
from pipeline.tiling import plan_tiles
from pipeline.work import JobContext, Predictor, peak_rss


def test_stand_in_latency_is_validated() -> None:
    assert InferenceSpec().stand_in_latency_s == 0.0
    with pytest.raises(ConfigError, match="stand_in_latency_s"):
        InferenceSpec(stand_in_latency_s=-1)


def test_peak_rss_is_bytes() -> None:
    assert peak_rss() > 10 * 1024 * 1024


@pytest.mark.parametrize("stand_in", [0.0, 0.01])
def test_concurrent_runs_write_every_core(tmp_path, stand_in: float) -> None:  # type: ignore[no-untyped-def]
    w = untrained_demo_weights(tmp_path / "w")
    spec = JobSpec.from_dict({"inputs": ["x"], "output": str(tmp_path / "out"), "inference": {"stand_in_latency_s": stand_in}, "output_options": {"chunk": 16}})
    ctx = JobContext(spec=spec, weights=w.to_record(), fingerprint="f", run_id="r")
    pred = Predictor(ctx, device="cpu")
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
    if stand_in:
        assert (cube == 0).all()

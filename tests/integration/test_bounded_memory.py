"""Memory that does not grow with the image: the prepare task waits for the driver instead of putting every
window of a big image into the object store, and its own peak (after all windows) reaches the run summary."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.config import JobSpec
from pipeline.sample import sample_image

pytestmark = pytest.mark.integration


def _context(tmp_path, ray_section):  # type: ignore[no-untyped-def]
    from pipeline.execution import resolve_weights
    from pipeline.work import JobContext

    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    path = src / "big.png"
    Image.fromarray(sample_image(np.random.default_rng(0), 256, 256)).save(path)
    spec = JobSpec.from_dict(
        {
            "inputs": [str(src)],
            "output": str(tmp_path / "out"),
            "tiling": {"max_tile_pixels": 1024, "tile_core": 32, "halo": 8},  # 64 tiles
            "output_options": {"chunk": 32},
            "ray": ray_section,
        }
    )
    w = resolve_weights(spec)
    return spec, JobContext(spec=spec, weights=w, fingerprint=spec.fingerprint(w["sha256"]), run_id="bounded"), str(path)


def test_prepare_task_runs_only_a_few_windows_ahead(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    import ray

    from pipeline.execution import _prepare_remote, tiles_ahead
    from pipeline.sources import ImageRef

    spec, ctx, path = _context(tmp_path, {"actors": 1, "max_batches_per_actor": 1, "batch_size": 2})
    assert tiles_ahead(spec) == 3
    gen = _prepare_remote(spec).remote(ctx, ImageRef(source=path, member=None, kind="file"))
    meta = ray.get(next(gen))
    assert meta.status == "run" and len(meta.tiles) == 64
    # Nobody takes the windows: the task must be parked, not finished with 64 windows in the object store.
    done, _ = ray.wait([gen.completed()], timeout=4.0)
    assert not done, "the prepare task ran to the end without the driver taking its windows"
    windows = [ray.get(next(gen)) for _ in range(64)]
    assert all(w.shape == (48, 48, 3) for w in windows)
    trailer = ray.get(next(gen))
    assert trailer["peak_rss"] > 10 * 1024 * 1024
    with pytest.raises(StopIteration):
        next(gen)
    ray.get(gen.completed())


def test_prepare_task_without_backpressure_would_finish(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    """The control for the test above: with room for every window, the same task finishes on its own."""
    import ray

    from pipeline.execution import _prepare_remote, tiles_ahead
    from pipeline.sources import ImageRef

    spec, ctx, path = _context(tmp_path, {"actors": 1, "max_batches_per_actor": 1, "batch_size": 80})
    assert tiles_ahead(spec) > 66
    gen = _prepare_remote(spec).remote(ctx, ImageRef(source=path, member=None, kind="file"))
    done, _ = ray.wait([gen.completed()], timeout=30.0)
    assert done


def test_tiled_job_reports_each_process_kinds_peak(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    from pipeline.execution import run_job

    spec, _, _ = _context(tmp_path, {"actors": 1, "max_batches_per_actor": 1, "batch_size": 4})
    summary = run_job(spec)
    assert summary.ok == 1
    assert all(summary.peak_rss[k] > 10 * 1024 * 1024 for k in ("driver", "prepare", "actor")), summary.peak_rss

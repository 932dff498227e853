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


def test_prepare_task_runs_only_a_few_windows_ahead(tmp_path, ray_local, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ray

    from pipeline.execution import _prepare_remote, tiles_ahead
    from pipeline.sources import ImageRef

    spec, ctx, path = _context(tmp_path, {"actors": 1, "max_batches_per_actor": 1, "batch_size": 2})
    monkeypatch.setattr("pipeline.execution.WINDOWS_AHEAD_BYTES", 0)  # the driver-side setting; windows are tiny here
    assert tiles_ahead(spec) == 4
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
    """The control for the test above, and the default: windows this small never make a task pause, so it
    finishes on its own (and frees its CPU while the actors work)."""
    import ray

    from pipeline.execution import _prepare_remote, tiles_ahead
    from pipeline.sources import ImageRef

    spec, ctx, path = _context(tmp_path, {"actors": 1, "max_batches_per_actor": 1, "batch_size": 2})
    assert tiles_ahead(spec) > 66  # 48² windows: 32 MB of them is far more than the 64 of this image
    gen = _prepare_remote(spec).remote(ctx, ImageRef(source=path, member=None, kind="file"))
    done, _ = ray.wait([gen.completed()], timeout=30.0)
    assert done


def test_tiled_job_reports_each_process_kinds_peak(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    """The run summary carries a peak for every process kind (the prepare task's includes its trailing
    item's figure, taken after the last window; that one is checked in the test above)."""
    from pipeline.execution import run_job

    spec, _, _ = _context(tmp_path, {"actors": 1, "max_batches_per_actor": 1, "batch_size": 4})
    summary = run_job(spec)
    assert summary.ok == 1
    assert all(summary.peak_rss[k] > 10 * 1024 * 1024 for k in ("driver", "prepare", "actor")), summary.peak_rss


def test_big_targz_with_the_default_resources(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    """A .tar.gz of 30 images on 2 CPUs with the default resources (1 actor × 1 CPU, 1 decode CPU). Its
    stream pauses (backpressure) until the driver takes entries; holding the decode CPU while paused, it
    starved the prepare tasks it feeds (a deadlock, later ~100 s of stall recovery); it reserves no CPU now."""
    import io
    import tarfile

    from pipeline.execution import run_job

    rng = np.random.default_rng(5)
    with tarfile.open(tmp_path / "big.tar.gz", "w:gz") as tf:
        for i in range(30):
            buf = io.BytesIO()
            Image.fromarray(sample_image(rng, 24, 32)).save(buf, "PNG")
            info = tarfile.TarInfo(f"im{i:02d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    spec = JobSpec.from_dict({"inputs": [str(tmp_path / "big.tar.gz")], "output": str(tmp_path / "out")})
    summary = run_job(spec)
    assert (summary.ok, summary.failed, summary.skipped) == (30, 0, 0)

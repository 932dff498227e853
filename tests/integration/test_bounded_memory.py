"""Memory that does not grow with the image: the prepare stage hands over windows in bounded blocks (which
Ray Data's backpressure pauses instead of putting every window of a big image into the object store), and
each process kind's peak reaches the run summary."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.config import JobSpec
from pipeline.sample import sample_image

pytestmark = pytest.mark.integration


def _context(tmp_path, ray_section, statistics="global"):  # type: ignore[no-untyped-def]
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
            "tiling": {"max_tile_pixels": 1024, "tile_core": 32, "halo": 8, "statistics": statistics},  # 64 tiles
            "output_options": {"chunk": 32},
            "ray": ray_section,
        }
    )
    w = resolve_weights(spec)
    return (
        spec,
        JobContext(spec=spec, weights=w, fingerprint=spec.fingerprint(w["sha256"]), run_id="bounded"),
        str(path),
    )


def test_prepare_stage_hands_over_windows_in_bounded_blocks(tmp_path, ray_local, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The prepare stage's output is cut into blocks of about ``BLOCK_BYTES`` (Ray Data's target block size
    for the job), so a prepare task never holds a whole big image's windows to hand over at once, and Ray
    Data's backpressure pauses it block by block. With a block budget below one batch, every batch is a
    block of its own; with the default, this small image's 32 batches fit one block (the control).
    (``tiling.statistics = "tile"``: an image with gathered statistics sends no window, next test.)"""
    import ray.data

    from pipeline import execution
    from pipeline.planning import ImageTask
    from pipeline.prepare import prepare_rows
    from pipeline.sources import ImageRef
    from pipeline.tracking import PreparedBatch, pack, unpack

    spec, ctx, path = _context(tmp_path, {"actors": 1, "max_batches_per_actor": 1, "batch_size": 2}, "tile")
    work = [ImageTask(ref=ImageRef(source=path, member=None, kind="file"))]

    def blocks() -> list[int]:
        execution._configure_data_context()
        ds = ray.data.from_items([{"item": pack(w)} for w in work])
        ds = ds.flat_map(prepare_rows, fn_args=(ctx,)).materialize()
        sizes = [e.metadata.num_rows for bundle in ds.iter_internal_ref_bundles() for e in bundle.blocks]
        batches = [unpack(r["batch"]) for r in ds.iter_rows()]
        assert all(isinstance(b, PreparedBatch) for b in batches) and len(batches) == 32
        assert sorted(b.index for b in batches) == list(range(32))
        return sizes

    monkeypatch.setattr(execution, "BLOCK_BYTES", 1024)  # below one batch (2 windows of 48² × 3 bytes)
    assert blocks() == [1] * 32
    monkeypatch.undo()
    assert blocks() == [32]


def test_an_image_with_gathered_statistics_leaves_prepare_as_one_row_without_windows(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    """With ``tiling.statistics = "global"`` the actor that takes the image decodes it again and gathers its
    statistics itself: prepare sends one row, the plan and the encoded bytes it read (no window), whatever
    the image's size."""
    import ray.data

    from pipeline.planning import ImageTask
    from pipeline.prepare import prepare_rows
    from pipeline.sources import ImageRef
    from pipeline.tracking import PreparedImage, pack, unpack

    spec, ctx, path = _context(tmp_path, {"actors": 1, "max_batches_per_actor": 1, "batch_size": 2})
    work = [ImageTask(ref=ImageRef(source=path, member=None, kind="file"))]
    ds = ray.data.from_items([{"item": pack(w)} for w in work])
    rows = [unpack(r["batch"]) for r in ds.flat_map(prepare_rows, fn_args=(ctx,)).iter_rows()]
    assert len(rows) == 1 and isinstance(rows[0], PreparedImage)
    image = rows[0]
    assert (image.count, len(image.meta.tiles)) == (32, 64)
    with open(path, "rb") as f:
        assert image.encoded == f.read()  # what prepare read and hashed, not pixels


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

"""A photo past Pillow's 89.5 MP guard: refused by default, converted once ``decode.max_pixels`` is raised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from drcr_model.weights import untrained_demo_weights
from pipeline import cubes
from pipeline.config import JobSpec
from pipeline.sources import ImageRef
from pipeline.work import ImageMeta, JobContext, Predictor, finish_image, prepare_image

pyvips = pytest.importorskip("pyvips")

WIDTH, HEIGHT = 10_240, 8_832  # 90.4 MP, tile_core multiples: 10 × 8.6 cores of 1024


def _big_jpeg(path: Path) -> Path:
    """A seeded, highly compressible 90 MP JPEG, made by libvips without holding it whole (a few MB)."""
    tile = np.random.default_rng(16).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    noise = pyvips.Image.new_from_array(tile).copy(interpretation="srgb").replicate(WIDTH // 64, HEIGHT // 64)
    ramp = pyvips.Image.xyz(WIDTH, HEIGHT)[0] * (200 / WIDTH)
    (noise * 0.2 + ramp).cast("uchar").copy(interpretation="srgb").jpegsave(str(path), Q=80)
    return path


def _context(tmp_path: Path, **decode: int) -> JobContext:
    spec = JobSpec.from_dict(
        {
            "inputs": ["x"],
            "output": str(tmp_path / "out"),
            "decode": decode,
            "tiling": {"tile_core": 1024, "halo": 32},
            "output_options": {"chunk": 1024},
            "inference": {"stand_in_latency_s": 0.001, "device": "cpu"},
        }
    )
    w = untrained_demo_weights(tmp_path / "w").to_record()
    return JobContext(spec=spec, weights=w, fingerprint="f", run_id="big")


@pytest.mark.slow
def test_90_megapixel_photo_refused_by_default_and_converted_when_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import work

    monkeypatch.setattr(work, "bound_heap", lambda: None)  # it cannot be undone in this test process
    ref = ImageRef(str(_big_jpeg(tmp_path / "scan.jpg")), None, "file")

    (refused,) = list(prepare_image(_context(tmp_path), ref))
    assert isinstance(refused, ImageMeta) and refused.status == "failed"
    assert refused.error_type == "DecodeError"
    assert f"scan.jpg: cannot decode image: decompression bomb guard: {WIDTH}×{HEIGHT} = {WIDTH * HEIGHT} pixels " in (
        refused.error or ""
    )
    assert "exceeds the limit of 89478485 pixels" in (refused.error or "")

    ctx = _context(tmp_path, max_pixels=100_000_000)
    stream = prepare_image(ctx, ref)
    meta = next(stream)
    assert isinstance(meta, ImageMeta) and meta.status == "run", meta.error
    assert (meta.height, meta.width, meta.mode) == (HEIGHT, WIDTH, "RGB") and meta.scale > 200
    predictor = Predictor(ctx, device="cpu")
    results, batch = [], []
    for tile, window in zip(meta.tiles, stream, strict=False):
        assert isinstance(window, np.ndarray) and window.shape == (tile.height, tile.width, 3)
        batch.append((tile, window))
        if len(batch) == ctx.spec.ray.batch_size or tile is meta.tiles[-1]:
            results.append(predictor.run(meta.group, meta.scale, [t for t, _ in batch], [w for _, w in batch]))
            batch = []
    finish_image(ctx, meta, results)
    store = cubes.open_cubes(ctx.spec.output, {})
    assert (cubes.read_status(store, meta.group) or {}).get("complete") is True
    cube = zarr.open_array(store, path=f"{meta.group}/cube", mode="r")
    assert cube.shape == (31, HEIGHT, WIDTH)
    assert not np.isnan(cube[:, -5:, -5:]).any() and not np.isnan(cube[:, :5, :5]).any()  # every core written

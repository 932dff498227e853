"""A photo past Pillow's 89.5 MP guard: refused by default, converted once ``decode.max_pixels`` is raised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from standin import StandIn

from drcr_model.weights import untrained_demo_weights
from pipeline import cubes
from pipeline.config import JobSpec
from pipeline.sources import ImageRef
from pipeline.work import ImageMeta, JobContext, finish_image, prepare_image

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
            "inference": {"device": "cpu"},
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
    predictor = StandIn(ctx, latency_s=0.001, device="cpu")  # decoding and writing are tested, not the model
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


def _tiled_tiff(path: Path, width: int = 256, height: int = 192) -> Path:
    """An uncompressed tiled RGB TIFF (streams in place by ranges), seeded."""
    pixels = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = pyvips.Image.new_from_array(pixels).copy(interpretation="srgb")
    image.tiffsave(str(path), tile=True, tile_width=64, tile_height=64, compression="none")
    return path


def _convert(ctx: JobContext, ref: ImageRef) -> ImageMeta:
    """prepare → predict → finish one image; its meta (``status`` ``failed`` if prepare refused it)."""
    stream = prepare_image(ctx, ref)
    meta = next(stream)
    assert isinstance(meta, ImageMeta)
    if meta.status != "run":
        return meta
    windows = list(stream)
    predictor = StandIn(ctx, latency_s=0.001, device="cpu")  # decoding and writing are tested, not the model
    results = [predictor.run(meta.group, meta.scale, list(meta.tiles), windows)]  # type: ignore[arg-type]
    finish_image(ctx, meta, results)
    return meta


@pytest.mark.parametrize("streamed", [True, False], ids=["streaming path", "Pillow path"])
def test_file_over_max_member_bytes_refused_clearly_and_converted_when_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    """The bound is the job's: one byte over it refuses the file (from its size, nothing read) with one line
    naming it, its size and the field; at its size the same file converts to a complete cube."""
    from pipeline import work

    monkeypatch.setattr(work, "bound_heap", lambda: None)
    if streamed:  # big files stream; this one stands in for a gigapixel TIFF over 256 MiB
        monkeypatch.setattr("pipeline.bigdecode.WHOLE_READ_BYTES", 1024)

        def never(*args: object, **kwargs: object) -> bytes:
            raise AssertionError("a streamed file must not be read whole into memory")

        monkeypatch.setattr("pipeline.bigdecode.read_member", never)
    path = _tiled_tiff(tmp_path / "scan.tif")
    size = path.stat().st_size
    ref = ImageRef(str(path), None, "file")
    stream_pixels = 0 if streamed else 2**40

    refused = _convert(_context(tmp_path, max_member_bytes=size - 1, stream_pixels=stream_pixels), ref)
    assert (refused.status, refused.error_type) == ("failed", "ArchiveError")
    assert refused.error == (
        f"ArchiveError: {path}: {size} bytes ({size / 2**20:.1f} MiB), over the {size - 1} byte limit for one image file or "
        "member (raise decode.max_member_bytes if it is genuine)"
    )
    assert "\n" not in refused.error

    ctx = _context(tmp_path, max_member_bytes=size, stream_pixels=stream_pixels)
    meta = _convert(ctx, ref)
    assert meta.status == "run", meta.error
    assert meta.nbytes == size and (meta.height, meta.width) == (192, 256)
    store = cubes.open_cubes(ctx.spec.output, {})
    assert (cubes.read_status(store, meta.group) or {}).get("complete") is True
    assert np.isfinite(zarr.open_array(store, path=f"{meta.group}/cube", mode="r")[:]).all()


def test_archive_members_over_max_member_bytes_are_rejected_by_the_jobs_bound(tmp_path: Path) -> None:
    """tar, zip and tar.gz members: rejected from their declared size at listing (and before a read) over
    ``max_bytes``, listed and read at it; the default is the hostile-input bound."""
    import io
    import tarfile
    import zipfile

    from pipeline.config import DecodeSpec
    from pipeline.errors import ArchiveError
    from pipeline.sources import MAX_MEMBER_BYTES, iter_targz, list_members, read_member

    assert DecodeSpec().max_member_bytes == MAX_MEMBER_BYTES == 256 * 1024 * 1024
    data = _tiled_tiff(tmp_path / "scan.tif").read_bytes()
    size = len(data)
    for kind, name in (("tar", "a.tar"), ("targz", "a.tar.gz")):
        with tarfile.open(tmp_path / name, "w:gz" if kind == "targz" else "w") as tf:
            info = tarfile.TarInfo("scans/scan.tif")
            info.size = size
            tf.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("scans/scan.tif", data)
    reason = f"{size} bytes ({size / 2**20:.1f} MiB), over the {size - 1} byte limit for one image file or member "
    for kind, name in (("tar", "a.tar"), ("zip", "a.zip"), ("targz", "a.tar.gz")):
        url = str(tmp_path / name)
        images, rejected = list_members(url, kind, max_bytes=size - 1)  # type: ignore[arg-type]
        assert images == [] and [r.ref.member for r in rejected] == ["scans/scan.tif"], kind
        assert rejected[0].reason.startswith(reason) and "decode.max_member_bytes" in rejected[0].reason
        (ref,), rejected = list_members(url, kind, max_bytes=size)  # type: ignore[arg-type]
        assert rejected == [] and read_member(ref, max_bytes=size) == data
        with pytest.raises(ArchiveError, match=rf"{name}!scans/scan.tif: {size} bytes .* over the {size - 1} byte"):
            read_member(ref, max_bytes=size - 1)
    seen: list[object] = []
    assert list(iter_targz(str(tmp_path / "a.tar.gz"), on_rejected=seen.append, max_bytes=size - 1)) == []
    assert len(seen) == 1
    assert [d for _, d in iter_targz(str(tmp_path / "a.tar.gz"), max_bytes=size)] == [data]


def test_max_member_bytes_is_checked_at_spec_load(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="decode.max_member_bytes"):
        _context(tmp_path, max_member_bytes=0)
    assert _context(tmp_path, max_member_bytes=2**40).spec.decode.max_member_bytes == 2**40

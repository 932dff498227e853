"""A big tiled TIFF in the real S3 server is read by byte ranges, never whole (bytes counted per GET)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import s3fs
from PIL import Image

from pipeline.bigdecode import RANGE_BLOCK, READ_BLOCK, decode_encoded, fetch_encoded
from pipeline.config import DecodeSpec
from pipeline.sources import ImageRef
from pipeline.storage import join, open_fs, write_bytes
from pipeline.tiling import extract_window, plan_tiles

pytestmark = pytest.mark.integration
pyvips = pytest.importorskip("pyvips")

SIDE = 4608  # 21 MP: past the default stream_pixels; 64 MB uncompressed, past WHOLE_READ_BYTES


class _Counter:
    """Counts the ranged GETs s3fs files make (``S3File._fetch_range`` is where each one is sent)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests: list[int] = []
        original = s3fs.core.S3File._fetch_range

        def counted(f: s3fs.core.S3File, start: int, end: int) -> bytes:
            out = original(f, start, end)
            self.requests.append(len(out))
            return out

        monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)

    def take(self) -> tuple[int, int, int]:
        """(bytes, requests, largest request) since the last take."""
        got, self.requests = self.requests, []
        return sum(got), len(got), max(got, default=0)


def test_tiled_tiff_from_s3_is_read_by_ranges(s3_bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    url, options = s3_bucket
    rng = np.random.default_rng(16)
    tile = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    image = pyvips.Image.new_from_array(tile).copy(interpretation="srgb").replicate(SIDE // 256, SIDE // 256)
    image = (image + pyvips.Image.xyz(SIDE, SIDE)[0] // 64).cast("uchar")  # no two tiles alike
    data = bytes(image.tiffsave_buffer(tile=True, tile_width=256, tile_height=256, compression="none"))
    src = join(url, "scans/big.tif")
    fs, path = open_fs(src, options)
    write_bytes(fs, path, data)
    size = len(data)
    counter = _Counter(monkeypatch)

    encoded = fetch_encoded(ImageRef(src, None, "file"), options, None, DecodeSpec())
    hashed, _, largest = counter.take()
    assert encoded.data is None and encoded.remote is not None and encoded.local_path is None
    assert size <= hashed <= size + 2 * RANGE_BLOCK and largest <= READ_BLOCK + RANGE_BLOCK  # one pass, in blocks

    decoded = decode_encoded(encoded, DecodeSpec())
    tiles = plan_tiles(SIDE, SIDE, max_tile_pixels=2048 * 2048, tile_core=512, halo=32)
    middle = tiles[len(tiles) // 2 + 4]
    window = extract_window(decoded, middle)
    one_window, requests, largest = counter.take()
    # A 576² window touches at most 4×4 tiles of 192 KB, each request a read-ahead block: a few MB of 64.
    assert one_window <= 16 * 256 * 256 * 3 + (requests + 2) * RANGE_BLOCK, (one_window, requests)
    assert one_window < size / 10 and largest <= 2 * RANGE_BLOCK

    with Image.open(io.BytesIO(data)) as reference:
        whole = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(window, extract_window(whole, middle))
    assert decoded.max() == int(whole.max())
    max_pass, _, largest = counter.take()
    print(f"\nbytes read: file {size}, hash {hashed}, one window {one_window} in {requests} GETs, max pass {max_pass}")
    assert max_pass <= 1.2 * size and largest <= 2 * RANGE_BLOCK  # one pass over the tiles, by ranges
    for t in tiles[:: max(1, len(tiles) // 12)]:
        np.testing.assert_array_equal(extract_window(decoded, t), extract_window(whole, t))

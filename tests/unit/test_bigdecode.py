"""The streaming decode path (libvips, region reads) against Pillow's whole-image decode."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fixtures.make_bad_inputs import make_corpus, png_bytes_16bit
from PIL import Image

from pipeline.bigdecode import EncodedImage, VipsRegions, decode_encoded, fetch_encoded
from pipeline.config import DecodeSpec
from pipeline.decode import DecodedImage, decode_image
from pipeline.errors import DecodeError
from pipeline.sources import ImageRef

pytest.importorskip("pyvips")

STREAM_ALL = DecodeSpec(stream_pixels=0)
RNG = np.random.default_rng(7)


def _streamed(data: bytes, name: str = "big", spec: DecodeSpec = STREAM_ALL) -> DecodedImage:
    return decode_encoded(EncodedImage(name=name, sha256="", nbytes=len(data), data=data), spec)


def _assert_same(
    streamed: DecodedImage, pillow: DecodedImage, seed: int = 0, notes: tuple[str, ...] | None = None
) -> None:
    """Same pixels, crops, maximum, mode, depth and notes (``notes``: the expected ones, if not Pillow's)."""
    assert isinstance(streamed.pixels, VipsRegions)
    assert (streamed.shape, streamed.mode, streamed.bit_depth) == (pillow.shape, pillow.mode, pillow.bit_depth)
    assert streamed.notes == (pillow.notes if notes is None else notes)
    whole = pillow.array
    np.testing.assert_array_equal(streamed.array, whole)
    rng = np.random.default_rng(seed)
    for _ in range(10):
        y0, x0 = int(rng.integers(0, streamed.height)), int(rng.integers(0, streamed.width))
        y1, x1 = int(rng.integers(y0 + 1, streamed.height + 1)), int(rng.integers(x0 + 1, streamed.width + 1))
        crop = streamed.crop(y0, y1, x0, x1)
        assert crop.flags.c_contiguous and crop.flags.writeable and crop.dtype == whole.dtype
        np.testing.assert_array_equal(crop, whole[y0:y1, x0:x1])
    assert streamed.max() == pillow.max() == int(whole.max())


# Cases of the bad-input corpus that decode ("ok"), and whether the streaming path takes them.
STREAMED_CASES = {
    "one_by_one": True,
    "three_by_five": True,
    "rgb_16bit_png": True,
    "gray_16bit_png": True,
    "palette_transparency": True,
    "gray_l": True,
    "gray_la": True,
    "rgba": True,
    "bilevel": False,  # Pillow only: 1-bit
    "cmyk_jpeg": False,  # Pillow only: its CMYK conversion is the policy
    "exif_rotated_jpeg": True,
    "multi_frame_tiff": True,
    "multi_frame_gif": False,  # Pillow only: GIF
    "unicode_spaces_name": True,
}


def test_corpus_streams_equal_pillow(tmp_path: Path) -> None:
    ok = [c for c in make_corpus(tmp_path) if c.expected[0].status == "ok" and c.path.is_file()]
    seen = set()
    for case in ok:
        if case.name not in STREAMED_CASES:
            continue
        seen.add(case.name)
        data = case.path.read_bytes()
        pillow = decode_image(data, name=case.name)
        streamed = _streamed(data, case.name)
        if STREAMED_CASES[case.name]:
            _assert_same(streamed, pillow)
        else:
            assert not isinstance(streamed.pixels, VipsRegions), case.name
            np.testing.assert_array_equal(streamed.array, pillow.array)
    assert seen == set(STREAMED_CASES)


def _png_with_exif(data: bytes, orientation: int) -> bytes:
    """A PNG with an eXIf chunk (orientation) before the pixels, added by hand so 16-bit PNGs keep their bytes."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()[6:]
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk + data[at:]


def _source(kind: str, h: int, w: int, orientation: int = 1) -> bytes:
    """An image of ``kind`` ("mode format"), h×w stored, with that EXIF / TIFF orientation."""
    data = _encoded(kind, h, w, orientation)
    return _png_with_exif(data, orientation) if kind.endswith("png") and orientation != 1 else data


def _encoded(kind: str, h: int, w: int, orientation: int) -> bytes:
    def enc(im: Image.Image, fmt: str, **kw: object) -> bytes:
        if orientation != 1 and fmt == "JPEG":
            exif = im.getexif()
            exif[0x0112] = orientation
            kw["exif"] = exif.tobytes()
        if orientation != 1 and fmt == "TIFF":
            kw["exif"] = im.getexif()
            kw["exif"][0x0112] = orientation
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    px = RNG.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if kind == "RGB png":
        return enc(Image.fromarray(px[..., :3]), "PNG")
    if kind == "RGBA png":
        return enc(Image.fromarray(px, "RGBA"), "PNG")
    if kind == "L png":
        return enc(Image.fromarray(px[..., 0], "L"), "PNG")
    if kind == "LA png":
        return enc(Image.fromarray(px[..., :2], "LA"), "PNG")
    if kind == "P png":
        return enc(Image.fromarray(px[..., :3]).quantize(17), "PNG", transparency=3)
    if kind == "I;16 png":
        return png_bytes_16bit(RNG.integers(0, 65536, (h, w, 1), dtype=np.uint16))
    if kind in ("RGB16 png", "RGBA16 png"):
        channels = 3 if kind == "RGB16 png" else 4
        return png_bytes_16bit(RNG.integers(0, 65536, (h, w, channels), dtype=np.uint16))
    if kind == "RGB jpeg":
        return enc(Image.fromarray(px[..., :3]), "JPEG", quality=95)
    if kind == "L jpeg":
        return enc(Image.fromarray(px[..., 0], "L"), "JPEG", quality=95)
    if kind == "RGB tiled tiff":
        return _tiled_tiff(px[..., :3], orientation)
    if kind == "RGBA tiff":
        return enc(Image.fromarray(px, "RGBA"), "TIFF", compression="tiff_lzw")
    if kind == "L tiled tiff":
        return _tiled_tiff(px[..., :1], orientation)
    if kind == "I;16 tiff":
        return enc(Image.fromarray(RNG.integers(0, 65536, (h, w), dtype=np.uint16)), "TIFF")
    raise AssertionError(kind)


def _tiled_tiff(pixels: np.ndarray, orientation: int, tile: int = 16) -> bytes:
    """A deflate-compressed tiled TIFF (libvips writes it: Pillow cannot tile)."""
    import pyvips

    image = pyvips.Image.new_from_array(np.ascontiguousarray(pixels))
    image = image.copy(interpretation="srgb" if pixels.shape[2] == 3 else "b-w")
    if orientation != 1:
        image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    data = image.tiffsave_buffer(tile=True, tile_width=tile, tile_height=tile, compression="deflate")
    with Image.open(io.BytesIO(data)) as im:
        assert 322 in im.tag_v2  # TileWidth: really tiled
    return bytes(data)


KINDS = [
    "RGB png",
    "RGBA png",
    "L png",
    "LA png",
    "P png",
    "I;16 png",
    "RGB16 png",
    "RGBA16 png",
    "RGB jpeg",
    "L jpeg",
    "RGB tiled tiff",
    "RGBA tiff",
    "L tiled tiff",
    "I;16 tiff",
]


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", KINDS)
def test_every_streamed_mode_and_orientation_equals_pillow(kind: str, orientation: int) -> None:
    data = _source(kind, 37, 53, orientation)
    pillow = decode_image(data, name=kind)
    streamed = _streamed(data, kind)
    assert streamed.orientation == orientation
    notes = None
    if pillow.orientation != orientation:
        # libtiff (Pillow's decoder of tiled and compressed TIFFs) applies the orientation tag while loading
        # and Pillow then drops the tag: same pixels, but Pillow's notes miss "EXIF orientation N applied".
        assert kind.endswith("tiff") and pillow.orientation == 1
        notes = (f"EXIF orientation {orientation} applied", *pillow.notes)  # before the mode's note
    _assert_same(streamed, pillow, seed=orientation, notes=notes)


def test_small_images_keep_pillow() -> None:
    data = _source("RGB png", 20, 30)
    image = _streamed(data, spec=DecodeSpec(stream_pixels=600))
    assert isinstance(image.pixels, Image.Image)
    assert isinstance(_streamed(data, spec=DecodeSpec(stream_pixels=599)).pixels, VipsRegions)


def _header_only_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def test_limit_refuses_from_the_header_on_both_paths() -> None:
    data = _header_only_png(12_000, 9_000)  # 108 MP
    for spec in (DecodeSpec(), DecodeSpec(stream_pixels=0), DecodeSpec(stream_pixels=10**9)):
        with pytest.raises(DecodeError, match=r"big: cannot decode image: decompression bomb guard: .* 108000000 "):
            _streamed(data, spec=spec)
    # Raised: the header passes, and the (fake) pixel data is what fails, clearly.
    with pytest.raises(DecodeError, match="big: cannot decode image"):
        _streamed(data, spec=DecodeSpec(max_pixels=120_000_000)).max()


def test_truncated_streamed_image_fails_clearly() -> None:
    data = _source("RGB jpeg", 64, 64)
    for cut in (data[: len(data) // 2], _source("RGB png", 64, 64)[:400]):
        with pytest.raises(DecodeError, match="cut.jpg: cannot decode image"):
            _streamed(cut, "cut.jpg").max()


def test_fetch_reads_big_local_files_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _source("RGB jpeg", 64, 80)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    monkeypatch.setattr("pipeline.bigdecode.WHOLE_READ_BYTES", 100)
    encoded = fetch_encoded(ImageRef(str(path), None, "file"), None, None, STREAM_ALL)
    import hashlib

    assert encoded.data is None and encoded.local_path == str(path)
    assert (encoded.sha256, encoded.nbytes) == (hashlib.sha256(data).hexdigest(), len(data))
    _assert_same(decode_encoded(encoded, STREAM_ALL), decode_image(data, name="a"))
    assert path.exists()  # a local input is never deleted


def test_tar_members_stream_in_place_or_from_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tarfile

    from pipeline.sources import list_members

    members = {"a/scan.tif": _source("RGB tiled tiff", 70, 90, 6), "a/photo.jpg": _source("RGB jpeg", 64, 80, 8)}
    archive = tmp_path / "batch.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setattr("pipeline.bigdecode.WHOLE_READ_BYTES", 100)
    refs, _ = list_members(str(archive), "tar")
    assert sorted(r.member for r in refs) == sorted(members)
    for ref in refs:
        data = members[ref.member or ""]
        encoded = fetch_encoded(ref, None, None, STREAM_ALL)
        assert encoded.data is None and encoded.nbytes == len(data)
        if ref.member == "a/scan.tif":
            assert encoded.remote == (str(archive), ref.offset, len(data))  # ranged reads in the archive
        else:
            assert encoded.local_path is not None and Path(encoded.local_path).read_bytes() == data  # a copy
        pillow = decode_image(data, name="x")
        notes = ("EXIF orientation 6 applied", *pillow.notes) if pillow.orientation == 1 else None
        _assert_same(decode_encoded(encoded, STREAM_ALL), pillow, notes=notes)

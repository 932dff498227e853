"""Decode policy per Pillow mode: values, dtypes, orientation, limits and errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from fixtures.make_bad_inputs import png_bytes_16bit
from PIL import Image, ImageOps

from pipeline.decode import DecodedImage, _orient, decode_image
from pipeline.errors import DecodeError

RNG = np.random.default_rng(0)


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _decode(data: bytes, **kwargs: object) -> DecodedImage:
    image = decode_image(data, name="test-image", **kwargs)  # type: ignore[arg-type]
    assert image.array.ndim == 3 and image.array.shape == (image.height, image.width, 3)
    assert image.array.flags.c_contiguous
    assert image.array.dtype == (np.uint8 if image.bit_depth == 8 else np.uint16)
    return image


def test_rgb_as_is() -> None:
    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = _decode(_encode(Image.fromarray(rgb)))
    np.testing.assert_array_equal(image.array, rgb)
    assert (image.mode, image.bit_depth, image.width, image.height, image.notes) == ("RGB", 8, 7, 5, ())


def test_l_is_replicated() -> None:
    grey = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
    image = _decode(_encode(Image.fromarray(grey, "L")))
    assert image.mode == "L"
    for c in range(3):
        np.testing.assert_array_equal(image.array[..., c], grey)


def test_la_drops_alpha() -> None:
    la = RNG.integers(0, 256, (4, 6, 2), dtype=np.uint8)
    image = _decode(_encode(Image.fromarray(la, "LA")))
    assert image.mode == "LA" and "alpha dropped" in image.notes
    np.testing.assert_array_equal(image.array, np.repeat(la[..., :1], 3, axis=2))


def test_rgba_drops_alpha_without_compositing() -> None:
    rgba = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # fully transparent pixel keeps its colour
    image = _decode(_encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(image.array, rgba[..., :3])
    assert image.notes == ("alpha dropped",)


def test_palette_with_transparency_keeps_palette_colours() -> None:
    index = RNG.integers(0, 3, (5, 5), dtype=np.uint8)
    palette = np.array([[200, 10, 10], [10, 200, 10], [1, 2, 3]], dtype=np.uint8)
    im = Image.fromarray(index).convert("P")
    im.putpalette(palette.ravel().tolist())
    image = _decode(_encode(im, transparency=2))
    assert image.mode == "P"
    np.testing.assert_array_equal(image.array, palette[index])
    assert image.notes == ("palette converted to RGB; transparency dropped",)


def test_bilevel_becomes_0_or_255() -> None:
    bits = RNG.integers(0, 2, (3, 9)).astype(bool)
    image = _decode(_encode(Image.fromarray(bits)))
    assert image.mode == "1"
    np.testing.assert_array_equal(image.array[..., 1], np.where(bits, 255, 0))


def test_cmyk_jpeg_is_converted() -> None:
    cmyk = np.zeros((8, 8, 4), dtype=np.uint8)  # no ink: white
    image = _decode(_encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100))
    assert image.mode == "CMYK" and image.notes == ("CMYK converted to RGB by Pillow",)
    assert image.array.min() >= 250


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_rgb_png_keeps_full_depth(channels: int) -> None:
    values = RNG.integers(0, 65536, (6, 5, channels), dtype=np.uint16)
    values[0, 0, :3] = [0x0102, 0xFF00, 0x00FF]  # high and low bytes must not mix up
    image = _decode(png_bytes_16bit(values))
    assert image.bit_depth == 16
    np.testing.assert_array_equal(image.array, values[..., :3])
    assert ("alpha dropped" in image.notes) == (channels == 4)


def test_16bit_grey_png_keeps_values() -> None:
    values = RNG.integers(0, 65536, (4, 3, 1), dtype=np.uint16)
    image = _decode(png_bytes_16bit(values))
    assert (image.mode, image.bit_depth) == ("I;16", 16)
    np.testing.assert_array_equal(image.array, np.repeat(values, 3, axis=2))


def test_int32_in_range_becomes_uint16_and_out_of_range_fails() -> None:
    values = RNG.integers(0, 65536, (3, 4), dtype=np.int32)
    image = _decode(_encode(Image.fromarray(values, "I"), "TIFF"))
    assert (image.mode, image.bit_depth) == ("I", 16)
    np.testing.assert_array_equal(image.array[..., 2], values)
    values[0, 0] = 70_000
    with pytest.raises(DecodeError, match=r"test-image.*outside 0\.\.65535"):
        decode_image(_encode(Image.fromarray(values, "I"), "TIFF"), name="test-image")


def test_float_is_unsupported() -> None:
    data = _encode(Image.fromarray(np.ones((2, 2), np.float32)), "TIFF")
    with pytest.raises(DecodeError, match=r"test-image: cannot decode image: unsupported mode 'F'"):
        decode_image(data, name="test-image")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation: int) -> None:
    rgb = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = orientation
    data = _encode(im, exif=exif.tobytes())  # PNG: lossless, so values can be compared
    image = _decode(data)
    with Image.open(io.BytesIO(data)) as again:
        expected = np.asarray(ImageOps.exif_transpose(again).convert("RGB"))
    np.testing.assert_array_equal(image.array, expected)
    # The numpy twin used for 16-bit RGB agrees with Pillow.
    np.testing.assert_array_equal(_orient(rgb, orientation), expected)
    if orientation in (5, 6, 7, 8):
        assert (image.height, image.width) == (6, 4)
        assert f"EXIF orientation {orientation} applied" in image.notes


def test_exif_rotation_on_jpeg_transposes_shape() -> None:
    im = Image.fromarray(RNG.integers(0, 256, (4, 8, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    image = _decode(_encode(im, "JPEG", exif=exif.tobytes()))
    assert (image.height, image.width) == (8, 4)


@pytest.mark.parametrize(("fmt", "kwargs"), [("GIF", {"duration": 50}), ("TIFF", {})])
def test_multi_frame_first_frame_only(fmt: str, kwargs: dict[str, object]) -> None:
    frames = [Image.fromarray(np.full((3, 4, 3), v, np.uint8)) for v in (10, 200)]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)
    image = _decode(data)
    assert image.notes[0] == "multi-frame image (2 frames): first frame only"
    assert abs(int(image.array.mean()) - 10) <= 2


@pytest.mark.parametrize(("height", "width"), [(1, 1), (5, 3), (1, 17)])
def test_tiny_images(height: int, width: int) -> None:
    rgb = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = _decode(_encode(Image.fromarray(rgb)))
    np.testing.assert_array_equal(image.array, rgb)


def _png_header_only(width: int, height: int) -> bytes:
    im = Image.new("RGB", (1, 1))
    data = bytearray(_encode(im))
    # Rewrite IHDR width/height (bytes 16..24) and its CRC: a tiny file that declares a huge image.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)])
def test_decompression_bomb_is_a_decode_error(size: tuple[int, int]) -> None:
    # 10000² is between Pillow's warning and error thresholds: the warning must also refuse the image.
    data = _png_header_only(*size)
    assert len(data) < 200
    with pytest.raises(DecodeError, match="test-image: cannot decode image: decompression bomb"):
        decode_image(data, name="test-image")


def test_max_pixels_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(Image.fromarray(RNG.integers(0, 256, (12, 12, 3), dtype=np.uint8)))
    with pytest.raises(DecodeError, match="144 pixels exceeds the limit of 100"):
        decode_image(data, name="x", max_pixels=100)
    # Pillow's process-wide limit applies by default, and an explicit max_pixels overrides its warning.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(data, name="x")
    assert decode_image(data, name="x", max_pixels=144).width == 12


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_pixels_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        decode_image(b"x", name="x", max_pixels=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"GIF89a not really", "cannot decode image"),
        (b"plain text", "not a recognised image format"),
    ],
)
def test_garbage_is_a_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=f"archive.tar!a.png: .*{reason}"):
        decode_image(data, name="archive.tar!a.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF"])
def test_truncated_is_a_decode_error(fmt: str) -> None:
    data = _encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(DecodeError, match="t.img: cannot decode image"):
        decode_image(data[: len(data) * 2 // 3], name="t.img")


# --- crops: the pipeline never makes the whole array; every crop must equal the whole image's slice ------------


def _expected_whole(data: bytes) -> np.ndarray:
    """The policy applied to the whole image with Pillow alone (independent of the crop path)."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16L", "I;16B", "I"):
            return np.repeat(np.asarray(im).astype(np.uint16)[..., None], 3, axis=2)
        if im.mode in ("P", "PA"):
            return np.asarray(im.convert("RGBA"))[..., :3]
        if im.mode in ("L", "LA", "1"):
            return np.repeat(np.asarray(im.convert("L"))[..., None], 3, axis=2)
        return np.asarray(im.convert("RGB"))


def _source(mode: str, h: int, w: int) -> tuple[Image.Image, str]:
    if mode == "RGB":
        return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)), "PNG"
    if mode == "RGBA":
        return Image.fromarray(RNG.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA"), "PNG"
    if mode == "L":
        return Image.fromarray(RNG.integers(0, 256, (h, w), dtype=np.uint8), "L"), "PNG"
    if mode == "P":
        return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(17), "PNG"
    if mode == "CMYK":
        return Image.fromarray(RNG.integers(0, 256, (h, w, 4), dtype=np.uint8), "CMYK"), "JPEG"
    if mode == "I;16":
        return Image.fromarray(RNG.integers(0, 65536, (h, w), dtype=np.uint16)), "PNG"  # mode I;16
    raise AssertionError(mode)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_crops_equal_slices_of_the_whole_image(mode: str, orientation: int) -> None:
    im, fmt = _source(mode, 23, 37)
    exif = im.getexif()
    exif[0x0112] = orientation
    data = _encode(im, fmt, exif=exif.tobytes())
    image = decode_image(data, name="crop-test")
    expected = _expected_whole(data)
    assert image.shape == expected.shape
    rng = np.random.default_rng(orientation)
    for _ in range(20):
        y0, x0 = int(rng.integers(0, image.height)), int(rng.integers(0, image.width))
        y1, x1 = int(rng.integers(y0 + 1, image.height + 1)), int(rng.integers(x0 + 1, image.width + 1))
        crop = image.crop(y0, y1, x0, x1)
        assert crop.flags.c_contiguous and crop.dtype == expected.dtype
        np.testing.assert_array_equal(crop, expected[y0:y1, x0:x1])
    assert image.max() == int(expected.max())
    np.testing.assert_array_equal(image.array, expected)


@pytest.mark.parametrize("orientation", [1, 6, 7])
def test_crops_of_16bit_rgb(orientation: int) -> None:
    data = png_bytes_16bit(np.random.default_rng(1).integers(0, 65536, (9, 14, 3), dtype=np.uint16))
    if orientation != 1:  # re-save the header with an orientation: add an eXIf chunk by hand
        exif = Image.Exif()
        exif[0x0112] = orientation
        payload = exif.tobytes()[6:]  # PNG eXIf holds the TIFF structure without the "Exif\0\0" prefix
        chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
        chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF)
        at = data.index(b"IDAT") - 4
        data = data[:at] + chunk + data[at:]
    image = decode_image(data, name="rgb16")
    assert image.bit_depth == 16 and image.orientation == orientation
    whole = image.array
    assert whole.shape == ((14, 9, 3) if orientation in (6, 7) else (9, 14, 3))
    np.testing.assert_array_equal(image.crop(2, 7, 1, 5), whole[2:7, 1:5])
    assert image.max() == int(whole.max())


def test_crop_outside_the_image_is_refused() -> None:
    image = decode_image(_encode(Image.new("RGB", (5, 4))), name="x")
    for box in [(0, 5, 0, 5), (-1, 2, 0, 2), (2, 2, 0, 3), (0, 4, 3, 6)]:
        with pytest.raises(ValueError, match="not inside the 4×5 image"):
            image.crop(*box)


def test_windows_never_make_the_whole_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cutting every tile window out of a decoded 1024² image allocates (numpy, tracemalloc) about one
    window at a time, not the 3 MB image: the pipeline's decode task stays near Pillow's own buffer."""
    import tracemalloc

    from pipeline.tiling import extract_window, plan_tiles

    rgb = np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    image = decode_image(_encode(Image.fromarray(rgb), "PNG"), name="big")
    tiles = plan_tiles(1024, 1024, max_tile_pixels=64 * 64, tile_core=128, halo=16)
    monkeypatch.setattr("pipeline.decode.STRIP_PIXELS", 64 * 1024)
    tracemalloc.start()
    try:
        for tile in tiles:
            window = extract_window(image, tile)
            np.testing.assert_array_equal(window, extract_window(rgb, tile))  # the reference array is not traced
            del window
        assert image.max() == int(rgb.max())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    window_bytes, strip_bytes = 160 * 160 * 3, 64 * 1024 * 3
    # Pillow → numpy passes through a bytes copy: 2 × (a window or a strip), plus slack; the image is 3 MB.
    assert peak < 3 * max(window_bytes, strip_bytes) + 256 * 1024, peak
    assert "array" not in vars(image)  # the whole-image array was never made


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "GIF", "JPEG", "WEBP"])
def test_decoded_image_does_not_keep_the_encoded_file(fmt: str) -> None:
    """Only the pixels stay: the encoded bytes can be freed once decoded (an opened Pillow image keeps its
    file object, and with it the whole encoded file, for PNG, TIFF and GIF)."""
    import sys

    rgb = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(rgb), fmt)
    before = sys.getrefcount(data)
    image = decode_image(data, name="x")
    assert sys.getrefcount(data) == before  # nothing the image holds refers to the encoded bytes
    assert image.crop(0, 16, 0, 24).shape == (16, 24, 3)

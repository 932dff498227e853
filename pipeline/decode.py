"""Decode image bytes into an H×W×3 array with one documented policy per Pillow mode.

Every image is decoded fully (``Image.load()``) inside the error handling, so a truncated or corrupt file fails
here, as :class:`~pipeline.errors.DecodeError` naming the input, and never later in the model.
``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set: a truncated image is an error, not a grey bottom half.

Policy (the ``notes`` of :class:`DecodedImage` say which rows applied):

=====================================  ==========================================================  =========
Pillow mode (source)                   result                                                      dtype
=====================================  ==========================================================  =========
``RGB``                                as is                                                       uint8
``RGBA``, ``RGBX``                     alpha / padding dropped (no compositing; note)              uint8
``L``                                  grey replicated to 3 channels                               uint8
``LA``                                 alpha dropped, grey replicated (note)                       uint8
``1`` (bilevel)                        converted to ``L`` (0 / 255), replicated (note)             uint8
``P``, ``PA`` (palette)                palette colours; transparency dropped, not composited        uint8
                                       (note)
``CMYK``, ``YCbCr``                    converted to RGB by Pillow (note)                           uint8
``I;16``, ``I;16L``, ``I;16B``,        16-bit grey replicated to 3 channels, values unchanged      uint16
``I;16N`` (16-bit grey PNG / TIFF)
``I`` (32-bit int)                     as 16-bit grey if all values are in 0..65535, else          uint16
                                       DecodeError
16-bit RGB / RGBA PNG                  full 16-bit depth (Pillow alone keeps only the high         uint16
                                       byte); alpha dropped (note)
multi-frame GIF / TIFF / APNG          first frame only (note)                                     —
EXIF orientation 2..8                  applied (``ImageOps.exif_transpose``), so H and W may        —
                                       swap (note)
``F``, ``LAB``, ``HSV``, other         DecodeError ``unsupported mode``                            —
truncated / corrupt / not an image     DecodeError naming the input and the reason                 —
more pixels than ``max_pixels``        DecodeError ``decompression bomb``, raised from the header, —
                                       before any pixel is decoded
=====================================  ==========================================================  =========

Alpha is dropped rather than composited onto a background because DRCR Net reconstructs reflectance from the
camera's RGB; a composited background colour would be invented data. Tiny images (1×1, 3×5) decode normally;
padding to the model's tile size happens later. Pillow warnings raised while decoding (e.g. corrupt EXIF) are
kept as notes, except the decompression-bomb warning, which is an error.

Thread safety: the warning capture uses :func:`warnings.catch_warnings`, which is process-global before Python
3.14; decode in processes (Ray tasks/actors), not in threads of one process, if warnings must be attributed.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.errors import DecodeError

__all__ = ["DEFAULT_MAX_PIXELS", "DecodedImage", "decode_image"]

# Pillow's own default (Image.MAX_IMAGE_PIXELS, ~ 1024 * 1024 * 1024 // 4 // 3); used if someone set it to None.
DEFAULT_MAX_PIXELS = 89_478_485

_GREY16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_RGB16_RAWMODES = {"RGB;16B": ("RGB;16B", "RGB;16L"), "RGBA;16B": ("RGBA;16B", "RGBA;16L")}
# Errors Pillow and its plugins raise on bad bytes. Anything else (TypeError, AttributeError ...) is a bug and
# propagates.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image.

    Args:
        array: H×W×3, ``np.uint8`` (0..255) or ``np.uint16`` (0..65535), RGB, C-contiguous, EXIF orientation applied.
        mode: Pillow's mode of the source image before any conversion (e.g. ``"P"``, ``"I;16"``, ``"CMYK"``).
        bit_depth: 8 or 16, matching ``array.dtype``.
        width: W in pixels, after orientation.
        height: H in pixels, after orientation.
        notes: what the policy did, one short sentence each (empty for a plain RGB image).
    """

    array: np.ndarray
    mode: str
    bit_depth: int
    width: int
    height: int
    notes: tuple[str, ...] = field(default_factory=tuple)


def decode_image(data: bytes, *, name: str, max_pixels: int | None = None) -> DecodedImage:
    """Decode ``data`` (the bytes of one image file) following the module's policy table.

    Args:
        data: encoded image bytes (JPEG, PNG, TIFF, BMP, WebP, GIF ... whatever Pillow opens).
        name: the input's name, used in error messages (e.g. ``ImageRef.name``).
        max_pixels: decompression-bomb limit in pixels (W×H); ``None`` uses ``PIL.Image.MAX_IMAGE_PIXELS``.
            Limits above ``2 * Image.MAX_IMAGE_PIXELS`` also need that process-wide setting raised, because
            Pillow refuses such images in ``Image.open``.

    Raises:
        DecodeError: empty, truncated, corrupt, unsupported mode, or more pixels than ``max_pixels``.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    limit = max_pixels if max_pixels is not None else (Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)
    if not data:
        raise DecodeError(f"{name}: cannot decode image: empty file (0 bytes)")
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(io.BytesIO(data)) as im:
                _check_bomb(im, caught, name, limit, max_pixels)
                array, bit_depth, mode = _decode_opened(im, data, name, notes)
        except DecodeError:
            raise
        except UnidentifiedImageError as e:
            raise DecodeError(f"{name}: cannot decode image: not a recognised image format") from e
        except Image.DecompressionBombError as e:
            raise DecodeError(f"{name}: cannot decode image: decompression bomb ({e})") from e
        except _DECODE_ERRORS as e:
            raise DecodeError(f"{name}: cannot decode image: {e or type(e).__name__}") from e
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):
            notes.append(f"Pillow warning: {w.message}")
    height, width = array.shape[:2]
    return DecodedImage(
        array=np.ascontiguousarray(array),
        mode=mode,
        bit_depth=bit_depth,
        width=width,
        height=height,
        notes=tuple(notes),
    )


def _check_bomb(
    im: Image.Image, caught: list[warnings.WarningMessage], name: str, limit: int, max_pixels: int | None
) -> None:
    """Refuse an image whose header declares more than ``limit`` pixels, before decoding any pixel data."""
    width, height = im.size
    pixels = width * height
    pillow_warned = any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    # An explicit max_pixels overrides Pillow's warning threshold in both directions.
    if pixels > limit or (pillow_warned and max_pixels is None):
        raise DecodeError(
            f"{name}: cannot decode image: decompression bomb guard: {width}×{height} = {pixels} pixels "
            f"exceeds the limit of {limit} pixels (raise max_pixels if the image is genuine)"
        )
    if width < 1 or height < 1:
        raise DecodeError(f"{name}: cannot decode image: empty image ({width}×{height})")


def _decode_opened(im: ImageFile.ImageFile, data: bytes, name: str, notes: list[str]) -> tuple[np.ndarray, int, str]:
    """Apply the policy to an opened image; returns ``(H×W×3 array, bit_depth, source mode)``."""
    mode = im.mode
    if getattr(im, "is_animated", False):
        notes.append(f"multi-frame image ({getattr(im, 'n_frames', '?')} frames): first frame only")
        im.seek(0)
    rgb16 = _rgb16_rawmodes(im)
    if rgb16 is not None:
        array = _load_rgb16(data, im.tile[0], rgb16)
        if mode == "RGBA":
            notes.append("alpha dropped")
        orientation = _orientation(im, notes)
        if orientation != 1:
            notes.append(f"EXIF orientation {orientation} applied")
        return _orient(array, orientation), 16, mode
    im.load()
    img = _exif_transpose(im, notes)
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8), 8, mode
    if mode in ("RGBA", "RGBX"):
        notes.append("alpha dropped" if mode == "RGBA" else "padding channel dropped")
        return np.asarray(img.convert("RGB"), dtype=np.uint8), 8, mode
    if mode in ("L", "LA", "1"):
        if mode == "LA":
            notes.append("alpha dropped")
        if mode == "1":
            notes.append("bilevel converted to L (0/255)")
        grey = np.asarray(img.convert("L") if mode != "L" else img, dtype=np.uint8)
        return _replicate(grey), 8, mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        # Via RGBA, not RGB: Pillow warns when a palette image with byte transparency goes straight to RGB.
        rgb = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., :3]
        notes.append("palette converted to RGB" + ("; transparency dropped" if has_alpha else ""))
        return rgb, 8, mode
    if mode in ("CMYK", "YCbCr"):
        notes.append(f"{mode} converted to RGB by Pillow")
        return np.asarray(img.convert("RGB"), dtype=np.uint8), 8, mode
    if mode in _GREY16_MODES:
        return _replicate(np.asarray(img).astype(np.uint16)), 16, mode
    if mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DecodeError(
                f"{name}: cannot decode image: mode I values {values.min()}..{values.max()} are outside 0..65535"
            )
        notes.append("32-bit integer image stored as 16-bit")
        return _replicate(values.astype(np.uint16)), 16, mode
    raise DecodeError(f"{name}: cannot decode image: unsupported mode {mode!r}")


def _replicate(grey: np.ndarray) -> np.ndarray:
    """H×W → H×W×3 with the three channels equal."""
    return np.repeat(grey[:, :, None], 3, axis=2)


def _rgb16_rawmodes(im: ImageFile.ImageFile) -> tuple[str, str] | None:
    """``(high-byte, low-byte)`` rawmodes if ``im`` is a 16-bit RGB(A) PNG Pillow would truncate to 8 bits."""
    if im.format != "PNG" or im.mode not in ("RGB", "RGBA") or len(im.tile) != 1:
        return None
    args = im.tile[0].args
    return _RGB16_RAWMODES.get(args) if isinstance(args, str) else None


def _load_rgb16(data: bytes, tile: ImageFile._Tile, rawmodes: tuple[str, str]) -> np.ndarray:
    """Decode a 16-bit RGB(A) PNG at full depth, as H×W×3 uint16.

    Pillow has no 16-bit RGB mode and keeps only the high byte of each sample. Its ``RGB;16L`` unpacker reads
    the *other* byte of each 16-bit sample, so decoding the same stream once with each rawmode gives the high
    and the low bytes; both passes unpack 48/64-bit pixels, so PNG filtering is undone identically (and
    interlacing, which Pillow's decoder handles before unpacking; not covered by the tests).
    """
    planes = []
    for rawmode in rawmodes:
        with Image.open(io.BytesIO(data)) as again:
            again.tile = [tile._replace(args=rawmode)]
            again.load()
            planes.append(np.asarray(again, dtype=np.uint8)[..., :3].astype(np.uint16))
    return (planes[0] << 8) | planes[1]


def _orientation(im: Image.Image, notes: list[str]) -> int:
    """EXIF orientation tag (1..8), 1 if absent or unreadable."""
    try:
        value = im.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        notes.append("EXIF unreadable; orientation not applied")
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _exif_transpose(im: Image.Image, notes: list[str]) -> Image.Image:
    """``ImageOps.exif_transpose`` with a note; unreadable EXIF leaves the image as stored."""
    orientation = _orientation(im, notes)
    if orientation == 1:
        return im
    notes.append(f"EXIF orientation {orientation} applied")
    return ImageOps.exif_transpose(im)


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """The numpy equivalent of ``ImageOps.exif_transpose`` for H×W×C arrays (used where Pillow cannot hold the data)."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(array, -1)
    if orientation == 7:
        return np.rot90(array, 2).transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(array, 1)
    return array

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

Memory: the decoded pixels stay in the decoder's buffer, as stored; the table's conversions and the orientation
are applied per crop (:meth:`DecodedImage.crop`), so cutting tile windows never needs a whole-image array
(an 8-bit RGB image costs Pillow's 4 bytes/pixel, not 4 + 3).

Thread safety: the warning capture uses :func:`warnings.catch_warnings`, which is process-global before Python
3.14; decode in processes (Ray tasks/actors), not in threads of one process, if warnings must be attributed.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.errors import DecodeError

__all__ = ["DEFAULT_MAX_PIXELS", "FORMATS", "DecodedImage", "StoredRegions", "decode_image"]

# Pillow's own default (Image.MAX_IMAGE_PIXELS, ~ 1024 * 1024 * 1024 // 4 // 3); used if someone set it to None.
DEFAULT_MAX_PIXELS = 89_478_485
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
"""The only Pillow plugins tried (``Image.open(formats=...)``), those of ``sources.IMAGE_EXTENSIONS``: by
default Pillow tries every plugin it has, and a ``.png`` holding EPS made it run Ghostscript on archive bytes
(issue 15). Anything else is "not a recognised image format"."""
STRIP_PIXELS = 1 << 20
"""Pixels converted at once by :meth:`DecodedImage.max` (transient memory ≈ 2 × 3 bytes × this)."""

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


class StoredRegions(Protocol):
    """Stored pixels (before orientation) read a region at a time, the policy's conversion already applied
    (:class:`pipeline.bigdecode.VipsRegions`: images too big to hold decoded)."""

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the stored pixels."""
        ...

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Stored rows ``y0 .. y1-1`` × columns ``x0 .. x1-1`` as h×w×3 ``np.uint8`` / ``np.uint16``."""
        ...

    def max(self) -> int:
        """The largest sample over all pixels and the three channels (one streaming pass)."""
        ...


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded image, held compactly; RGB pixels come out a crop at a time.

    The pixels stay in the decoder's own buffer (a loaded Pillow image in its source mode, or the H×W×3 uint16
    array of a 16-bit RGB PNG), as stored in the file: the policy (mode conversion, channel replication, EXIF
    orientation) is applied per crop. Every conversion in the policy is per pixel, so a crop equals the same
    slice of the whole converted image. An 8-bit RGB image costs Pillow's 4 bytes/pixel, a grey one 1; the
    whole-image array (:attr:`array`, 3 bytes/pixel more) is made only when asked for.

    Args:
        pixels: the stored pixels (before orientation): a loaded Pillow image, an H×W×3 ``np.uint16`` array, or
            :class:`StoredRegions` read on demand (the streaming path).
        mode: Pillow's mode of the source image before any conversion (e.g. ``"P"``, ``"I;16"``, ``"CMYK"``).
        bit_depth: 8 or 16: crops are ``np.uint8`` (0..255) or ``np.uint16`` (0..65535).
        width: W in pixels, after orientation.
        height: H in pixels, after orientation.
        notes: what the policy did, one short sentence each (empty for a plain RGB image).
        orientation: the EXIF orientation (1..8) applied to every crop.
    """

    pixels: Image.Image | np.ndarray | StoredRegions = field(repr=False)
    mode: str
    bit_depth: int
    width: int
    height: int
    notes: tuple[str, ...] = field(default_factory=tuple)
    orientation: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, 3)``, as the array would have."""
        return (self.height, self.width, 3)

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``y0 .. y1-1`` and columns ``x0 .. x1-1`` of the RGB image (after orientation), as a new
        C-contiguous h×w×3 array (``np.uint8`` or ``np.uint16``). The box must lie inside the image."""
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ValueError(
                f"crop rows {y0}..{y1} × columns {x0}..{x1} is not inside the {self.height}×{self.width} image"
            )
        sy0, sy1, sx0, sx1 = _stored_box(self.orientation, self.pixels_size, y0, y1, x0, x1)
        if isinstance(self.pixels, np.ndarray):
            rgb = self.pixels[sy0:sy1, sx0:sx1]
        elif isinstance(self.pixels, Image.Image):
            rgb = _rgb(self.pixels.crop((sx0, sy0, sx1, sy1)))
        else:
            rgb = self.pixels.read(sy0, sy1, sx0, sx1)
        return np.ascontiguousarray(_orient(rgb, self.orientation))

    @property
    def pixels_size(self) -> tuple[int, int]:
        """``(height, width)`` of the stored pixels (before orientation)."""
        if isinstance(self.pixels, np.ndarray):
            return int(self.pixels.shape[0]), int(self.pixels.shape[1])
        if isinstance(self.pixels, Image.Image):
            return self.pixels.height, self.pixels.width
        return self.pixels.size

    def max(self) -> int:
        """The largest sample over all pixels and channels, converted in strips of ``STRIP_PIXELS`` (never
        the whole image at once)."""
        if isinstance(self.pixels, np.ndarray):
            return int(self.pixels.max())
        if not isinstance(self.pixels, Image.Image):
            return self.pixels.max()
        pixels = self.pixels
        h, w = self.pixels_size
        rows = max(1, STRIP_PIXELS // w)
        return max(int(_rgb(pixels.crop((0, y, w, min(h, y + rows)))).max()) for y in range(0, h, rows))

    @functools.cached_property
    def array(self) -> np.ndarray:
        """The whole image, H×W×3, C-contiguous, ``np.uint8`` or ``np.uint16``; made (and kept) on first use.
        The pipeline never asks for it: it cuts tile windows with :meth:`crop`."""
        return self.crop(0, self.height, 0, self.width)


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
        im: Image.Image | None = None
        pixels: Image.Image | np.ndarray | None = None
        try:
            # Not ``with``: closing a Pillow image frees its pixels, and the loaded image is what is kept.
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_bomb(im, caught, name, limit, max_pixels)
            pixels, bit_depth, mode, orientation = _decode_opened(im, data, name, notes)
            if pixels is im:
                # A new image on the same loaded pixels, without the file object: an opened PNG/TIFF/GIF
                # keeps a reference to ``data`` (the encoded file), which must not live as long as the pixels.
                pixels = im._new(im.im)
        except DecodeError:
            raise
        except UnidentifiedImageError as e:
            raise DecodeError(
                f"{name}: cannot decode image: not a recognised image format (tried {', '.join(FORMATS)})"
            ) from e
        except Image.DecompressionBombError as e:
            raise DecodeError(f"{name}: cannot decode image: decompression bomb ({e})") from e
        except _DECODE_ERRORS as e:
            raise DecodeError(f"{name}: cannot decode image: {e or type(e).__name__}") from e
        finally:
            if im is not None and pixels is not im:
                im.close()
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):
            notes.append(f"Pillow warning: {w.message}")
    if isinstance(pixels, np.ndarray):
        height, width = pixels.shape[:2]
    else:
        width, height = pixels.size
    if orientation >= 5:
        height, width = width, height
    return DecodedImage(
        pixels=pixels,
        mode=mode,
        bit_depth=bit_depth,
        width=width,
        height=height,
        notes=tuple(notes),
        orientation=orientation,
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


def _decode_opened(
    im: ImageFile.ImageFile, data: bytes, name: str, notes: list[str]
) -> tuple[Image.Image | np.ndarray, int, str, int]:
    """Load an opened image and check it against the policy; returns ``(stored pixels, bit_depth, source mode,
    EXIF orientation)``. Conversions happen per crop (:func:`_rgb`)."""
    mode = im.mode
    if getattr(im, "is_animated", False):
        notes.append(f"multi-frame image ({getattr(im, 'n_frames', '?')} frames): first frame only")
        im.seek(0)
    rgb16 = _rgb16_rawmodes(im)
    if rgb16 is not None:
        array = _load_rgb16(data, im.tile[0], rgb16)
        if mode == "RGBA":
            notes.append("alpha dropped")
        return array, 16, mode, _noted_orientation(im, notes)
    im.load()
    orientation = _noted_orientation(im, notes)
    loaded = im.mode
    if loaded == "RGB":
        return im, 8, mode, orientation
    if loaded in ("RGBA", "RGBX"):
        notes.append("alpha dropped" if loaded == "RGBA" else "padding channel dropped")
        return im, 8, mode, orientation
    if loaded in ("L", "LA", "1"):
        if loaded == "LA":
            notes.append("alpha dropped")
        if loaded == "1":
            notes.append("bilevel converted to L (0/255)")
        return im, 8, mode, orientation
    if loaded in ("P", "PA"):
        has_alpha = loaded == "PA" or "transparency" in im.info
        notes.append("palette converted to RGB" + ("; transparency dropped" if has_alpha else ""))
        return im, 8, mode, orientation
    if loaded in ("CMYK", "YCbCr"):
        notes.append(f"{loaded} converted to RGB by Pillow")
        return im, 8, mode, orientation
    if loaded in _GREY16_MODES:
        return im, 16, mode, orientation
    if loaded == "I":
        lo, hi = im.getextrema()
        if lo < 0 or hi > 65535:  # type: ignore[operator]
            raise DecodeError(f"{name}: cannot decode image: mode I values {lo}..{hi} are outside 0..65535")
        notes.append("32-bit integer image stored as 16-bit")
        return im, 16, mode, orientation
    raise DecodeError(f"{name}: cannot decode image: unsupported mode {loaded!r}")


def _rgb(part: Image.Image) -> np.ndarray:
    """A loaded Pillow image (a crop) → h×w×3 ``np.uint8`` / ``np.uint16`` following the policy table."""
    m = part.mode
    if m == "RGB":
        return np.asarray(part, dtype=np.uint8)
    if m in ("RGBA", "RGBX", "CMYK", "YCbCr"):
        return np.asarray(part.convert("RGB"), dtype=np.uint8)
    if m == "L":
        return _replicate(np.asarray(part, dtype=np.uint8))
    if m in ("LA", "1"):
        return _replicate(np.asarray(part.convert("L"), dtype=np.uint8))
    if m in ("P", "PA"):
        # Via RGBA, not RGB: Pillow warns when a palette image with byte transparency goes straight to RGB.
        return np.asarray(part.convert("RGBA"), dtype=np.uint8)[..., :3]
    if m in _GREY16_MODES or m == "I":
        return _replicate(np.asarray(part).astype(np.uint16))
    raise ValueError(f"mode {m!r} is not in the decode policy")


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
    out: np.ndarray | None = None
    for rawmode in rawmodes:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as again:
            again.tile = [tile._replace(args=rawmode)]
            again.load()
            byte = np.asarray(again, dtype=np.uint8)[..., :3]
        if out is None:
            out = byte.astype(np.uint16)
            out <<= 8
        else:
            out |= byte
    assert out is not None
    return out


def _orientation(im: Image.Image, notes: list[str]) -> int:
    """EXIF orientation tag (1..8), 1 if absent or unreadable."""
    try:
        value = im.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        notes.append("EXIF unreadable; orientation not applied")
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _noted_orientation(im: Image.Image, notes: list[str]) -> int:
    """:func:`_orientation`, with a note when it is not 1."""
    orientation = _orientation(im, notes)
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied")
    return orientation


def _stored_box(
    orientation: int, size: tuple[int, int], y0: int, y1: int, x0: int, x1: int
) -> tuple[int, int, int, int]:
    """The box ``(y0, y1, x0, x1)`` of the stored pixels (``size`` = their height, width) that becomes rows
    ``y0 .. y1-1`` × columns ``x0 .. x1-1`` of the image once :func:`_orient` is applied to it."""
    h, w = size
    return {
        1: (y0, y1, x0, x1),
        2: (y0, y1, w - x1, w - x0),
        3: (h - y1, h - y0, w - x1, w - x0),
        4: (h - y1, h - y0, x0, x1),
        5: (x0, x1, y0, y1),
        6: (h - x1, h - x0, y0, y1),
        7: (h - x1, h - x0, w - y1, w - y0),
        8: (x0, x1, w - y1, w - y0),
    }[orientation]


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """The numpy equivalent of ``ImageOps.exif_transpose`` for H×W×C arrays (views where it can)."""
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

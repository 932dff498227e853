"""Fetch and decode one input, choosing between Pillow (small images) and a streaming path (big ones).

Pillow decodes an image whole into its buffer (1–4 bytes per pixel), so a prepare task's memory grows with the
image: fine up to tens of megapixels, and the fastest path there. Past ``decode.stream_pixels`` the pixels are
read by region with libvips (``pyvips``), so memory no longer depends on the image size (README "Decoding
policy", measured by ``benchmarks/bench_bigimage.py``):

==========================================  ====================================================================
source                                      how the streaming path reads it
==========================================  ====================================================================
tiled TIFF (file, or plain member of a      by byte ranges, tile by tile, straight from storage (never copied):
``.tar``)                                   the maximum is one pass over the tiles, each window reads its tiles
JPEG, PNG, striped TIFF                     not randomly addressable: the compressed bytes are read once (to a
                                            local temporary file unless already local), decoded once,
                                            sequentially, into a local uncompressed tiled TIFF (``TMPDIR``;
                                            1 byte per pixel for grey, 3 for RGB, ×2 at 16 bits) that the
                                            maximum and the windows then read by region
inputs handed over as bytes (``.tar.gz``,   decoded from those bytes the same way (the compressed bytes are
``.zip`` members)                           in memory; the decoded image never is)
==========================================  ====================================================================

The decoding policy is :mod:`pipeline.decode`'s, unchanged: the header is read by Pillow (mode, size, EXIF
orientation, frames), only the modes whose libvips decode equals Pillow's are streamed (:func:`_plan`; the
tests compare every one, for every orientation), and the orientation and grey replication are applied per
crop by :class:`~pipeline.decode.DecodedImage` exactly as for Pillow's buffer. Everything else — CMYK and
YCbCr, bilevel, 32-bit ``I``, animated PNG, GIF, WebP, BMP, 16-bit RGB TIFF — is decoded by Pillow at any
size, its memory growing with the image.

libvips's operation cache is switched off in this process (``pyvips.cache_set_max(0)``): it would keep
decoded regions of every window alive. Its worker threads are set to ``VIPS_THREADS`` (1): each thread keeps
its own strip buffers, as wide as the image, while the local tiled copy is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import decode
from pipeline.config import DecodeSpec
from pipeline.errors import ArchiveError, DecodeError, InputError
from pipeline.sources import ImageRef, read_member, size_reason
from pipeline.storage import open_fs

__all__ = ["EncodedImage", "VipsRegions", "fetch_encoded", "decode_encoded", "pillow_limit"]

log = logging.getLogger(__name__)

WHOLE_READ_BYTES = 32 * 1024 * 1024
"""Encoded files up to this size are read in one request into memory (whatever their pixel count: the
decoded image may still stream); only larger ones have their header read first."""
READ_BLOCK = 8 * 1024 * 1024
"""Bytes per read when hashing or copying an encoded file (the only encoded bytes held at once)."""
RANGE_BLOCK = 256 * 1024
"""Read-ahead of ranged reads of a tiled TIFF: about one or two compressed tiles per request."""
_LOSSLESS_TIFF = frozenset({1, 5, 8, 32773, 32946})  # none, LZW, deflate, PackBits, old deflate
SPILL_TILE = 64
"""Tile side of the local decoded copy. libvips keeps about two rows of tiles per open image, so its memory
grows with tile side × image width: 64 kept a 1 GP prepare task's growth over its windows to ~7 MB, 256 to
~190 MB (benchmarks/bench_bigimage.py)."""
VIPS_THREADS = 1
"""libvips worker threads in a prepare task (``pyvips.concurrency_set``; 0: libvips's default, one per CPU).
Every thread holds strip buffers as wide as the image while the local tiled copy is written: on 2 CPUs a
32 000 px wide gigapixel JPEG's prepare peak is 427 MB with one thread, 446 MB with libvips's default, and
its decode no slower (median of 3: 24.2 vs 25.4 s; the JPEG/PNG decode is sequential anyway). A prepare
task reserves one CPU (``ray.decode_num_cpus``); more threads would run on CPUs reserved for other tasks.
Measured by ``benchmarks/bench_bigimage.py`` (README "Big images")."""


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How libvips must present an image for the streaming path to equal Pillow's decode.

    ``bands``: 1 (grey, replicated per crop) or 3 (colour) bands kept of libvips's output; ``vips_format``:
    ``"uchar"`` or ``"ushort"``; ``notes``: the policy's notes in Pillow's order; ``tiled``: a tiled TIFF,
    read by ranges in place.
    """

    bands: int
    vips_format: str
    bit_depth: int
    mode: str
    width: int
    height: int
    orientation: int
    notes: tuple[str, ...]
    tiled: bool


@dataclasses.dataclass(eq=False)
class EncodedImage:
    """The encoded bytes of one input, hashed, held where its decode path wants them.

    Exactly one of ``data`` (in memory: small images and inputs handed over as bytes), ``local_path`` (a local
    file: big images that are not tiled TIFFs) and ``remote`` (``(url, tar offset or None, size)``: a big tiled
    TIFF, read by ranges) is set. ``plan`` is set for big images that take the streaming path.
    """

    name: str
    sha256: str
    nbytes: int
    data: bytes | None = None
    local_path: str | None = None
    remote: tuple[str, int | None, int] | None = None
    storage_options: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False)
    plan: _Plan | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = dataclasses.field(default=None, repr=False)

    def close(self) -> None:
        """Delete the local copy of the encoded bytes, if one was made."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@contextlib.contextmanager
def pillow_limit(max_pixels: int | None) -> Iterator[None]:
    """Set Pillow's process-wide bomb guard (``Image.MAX_IMAGE_PIXELS``) for the block: ``Image.open`` refuses
    images past twice that value before :func:`pipeline.decode.decode_image` sees the job's own limit.
    ``None`` turns Pillow's check off (headers are checked against the limit here instead). Not thread-safe
    (decode runs in processes, see :mod:`pipeline.decode`)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def fetch_encoded(
    ref: ImageRef, storage_options: Mapping[str, Any] | None, data: bytes | None, spec: DecodeSpec
) -> EncodedImage:
    """Read and hash the encoded bytes of ``ref`` (or take ``data``), keeping them where their decode needs.

    Small images (and anything the streaming path does not handle) are read whole into memory, as before; a
    big image's header is read first (a few KB), then its bytes are hashed in ``READ_BLOCK`` pieces — copied to
    a local temporary file on the way for sequential formats, left in place for tiled TIFFs.

    Raises:
        DecodeError: the header declares more than ``spec.max_pixels`` pixels (nothing more is read).
        ArchiveError: the file or member is larger than ``spec.max_member_bytes`` (nothing read).
        InputError: the input cannot be read.
    """
    if data is not None or ref.kind not in ("file", "tar"):
        return _in_memory(ref, storage_options, data, spec)
    fs, path = open_fs(ref.source, storage_options)
    start = ref.offset or 0
    try:
        size = ref.size if ref.kind == "tar" and ref.size is not None else int(fs.size(path))
    except FileNotFoundError as e:
        raise InputError(f"{ref.name}: does not exist") from e
    # One bound for every path (streamed ones too): their bytes are hashed and copied to local disk.
    if (too_big := size_reason(size, spec.max_member_bytes)) is not None:
        raise ArchiveError(f"{ref.name}: {too_big}")
    if size <= WHOLE_READ_BYTES:
        return _in_memory(ref, storage_options, None, spec)
    with fs.open(path, "rb", block_size=RANGE_BLOCK, cache_type="readahead") as f:
        plan = _plan_from(_Window(f, start, size), ref.name, spec)
        if plan is None:
            return _in_memory(ref, storage_options, None, spec)
        local = ref.kind == "file" and "file" in _protocols(fs)
        tmp = None if local or plan.tiled else tempfile.TemporaryDirectory(prefix="drcr-encoded-")
        copy_to = None if tmp is None else os.path.join(tmp.name, "encoded")
        digest = _hash_range(f, start, size, copy_to)
    encoded = EncodedImage(name=ref.name, sha256=digest, nbytes=size, plan=plan, _tmp=tmp)
    if plan.tiled:
        encoded.remote, encoded.storage_options = (ref.source, ref.offset, size), storage_options
    else:
        encoded.local_path = path if copy_to is None else copy_to
    return encoded


def _in_memory(
    ref: ImageRef, storage_options: Mapping[str, Any] | None, data: bytes | None, spec: DecodeSpec
) -> EncodedImage:
    if data is None:
        data = read_member(ref, storage_options, max_bytes=spec.max_member_bytes)
    return EncodedImage(name=ref.name, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data), data=data)


def decode_encoded(encoded: EncodedImage, spec: DecodeSpec) -> decode.DecodedImage:
    """Decode an :class:`EncodedImage`: the streaming path for big images, Pillow (whole) otherwise.

    Raises:
        DecodeError: as :func:`pipeline.decode.decode_image`, naming the input.
    """
    plan = encoded.plan
    if plan is None and encoded.data is not None:
        plan = _plan_from(io.BytesIO(encoded.data), encoded.name, spec)
    if plan is None:
        assert encoded.data is not None
        with pillow_limit(max(spec.max_pixels, decode.DEFAULT_MAX_PIXELS)):
            return decode.decode_image(encoded.data, name=encoded.name, max_pixels=spec.max_pixels)
    import pyvips

    try:
        regions = VipsRegions.open(encoded, plan)
    except pyvips.Error as e:
        raise DecodeError(f"{encoded.name}: cannot decode image: {_vips_reason(e)}") from e
    return decode.DecodedImage(
        pixels=regions,
        mode=plan.mode,
        bit_depth=plan.bit_depth,
        width=plan.height if plan.orientation >= 5 else plan.width,
        height=plan.width if plan.orientation >= 5 else plan.height,
        notes=plan.notes,
        orientation=plan.orientation,
    )


class VipsRegions:
    """Stored pixels of a big image, read a region at a time through libvips (:class:`decode.StoredRegions`).

    Args:
        image: a random-access libvips image with the kept bands only (1 grey or 3 colour), ``uchar``/``ushort``.
        name: the input's name, for error messages.
        keep: objects that must live as long as ``image`` (the ranged file and its libvips source).
        cleanup: temporary directories deleted when this object goes.
    """

    def __init__(self, image: Any, *, name: str, keep: tuple[Any, ...] = (), cleanup: tuple[Any, ...] = ()) -> None:
        self._image, self._name = image, name
        self._keep = keep
        self._dtype = np.uint16 if image.format == "ushort" else np.uint8
        for tmp in cleanup:
            weakref.finalize(self, tmp.cleanup)

    @classmethod
    def open(cls, encoded: EncodedImage, plan: _Plan) -> VipsRegions:
        """Open ``encoded`` for region reads: tiled TIFF in place, anything else decoded once to a local
        tiled copy."""
        import pyvips

        pyvips.cache_set_max(0)
        pyvips.concurrency_set(VIPS_THREADS)  # process-wide; the task owns its process (see VIPS_THREADS)
        if plan.tiled and encoded.remote is not None:
            url, offset, size = encoded.remote
            fs, path = open_fs(url, encoded.storage_options)
            f = _Window(
                fs.open(path, "rb", block_size=RANGE_BLOCK, cache_type="readahead"), offset or 0, size, owns=True
            )
            source = pyvips.SourceCustom()
            source.on_read(f.read)
            source.on_seek(f.seek)
            image = pyvips.Image.new_from_source(source, "", access="random", fail_on="error")
            return cls(_checked(image, plan, encoded.name), name=encoded.name, keep=(f, source))
        if encoded.local_path is not None:
            # Through Python reads, not from the file name: libvips would map the whole encoded file into
            # memory (a 1 GP JPEG: +240 MB of resident pages).
            local: IO[bytes] | None = open(encoded.local_path, "rb")  # noqa: SIM115 - closed after the pass
            assert local is not None
            source = pyvips.SourceCustom()
            source.on_read(local.read)
            source.on_seek(local.seek)
            image = pyvips.Image.new_from_source(source, "", access="sequential", fail_on="error")
        else:
            local = None
            assert encoded.data is not None
            image = pyvips.Image.new_from_buffer(encoded.data, "", access="sequential", fail_on="error")
        spill = tempfile.TemporaryDirectory(prefix="drcr-decoded-")
        target = os.path.join(spill.name, "decoded.tif")
        try:
            _checked(image, plan, encoded.name).tiffsave(
                target, tile=True, tile_width=SPILL_TILE, tile_height=SPILL_TILE, bigtiff=True, compression="none"
            )
        except BaseException:
            spill.cleanup()
            raise
        finally:
            if local is not None:
                local.close()
        encoded.close()  # the compressed copy is no longer needed
        return cls(pyvips.Image.new_from_file(target, access="random"), name=encoded.name, cleanup=(spill,))

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the stored pixels."""
        return int(self._image.height), int(self._image.width)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Stored rows ``y0 .. y1-1`` × columns ``x0 .. x1-1``, h×w×3 ``np.uint8`` / ``np.uint16``."""
        import pyvips

        h, w = y1 - y0, x1 - x0
        try:
            raw = self._image.crop(x0, y0, w, h).write_to_memory()
        except pyvips.Error as e:
            raise DecodeError(f"{self._name}: cannot decode image: {_vips_reason(e)}") from e
        region = np.frombuffer(raw, dtype=self._dtype).reshape(h, w, self._image.bands)
        return decode._replicate(region[:, :, 0]) if region.shape[2] == 1 else region.copy()

    def max(self) -> int:
        """The largest sample (one streaming pass over the image's regions)."""
        import pyvips

        try:
            return int(self._image.max())
        except pyvips.Error as e:
            raise DecodeError(f"{self._name}: cannot decode image: {_vips_reason(e)}") from e


def _checked(image: Any, plan: _Plan, name: str) -> Any:
    """The plan's bands of ``image``, or DecodeError if libvips sees another layout than Pillow did."""
    if (
        image.format != plan.vips_format
        or image.bands < plan.bands
        or (image.height, image.width)
        != (
            plan.height,
            plan.width,
        )
    ):
        raise DecodeError(
            f"{name}: cannot decode image: libvips reads {image.width}×{image.height}×{image.bands} {image.format}, "
            f"the header says {plan.width}×{plan.height} {plan.mode}"
        )
    return image.extract_band(0, n=plan.bands) if image.bands != plan.bands else image


def _plan_from(f: IO[bytes] | io.RawIOBase, name: str, spec: DecodeSpec) -> _Plan | None:
    """Read the header (Pillow, lazily: a few KB); the streaming plan for a big image, else ``None``.

    Raises:
        DecodeError: the header declares more than ``spec.max_pixels`` pixels.
    """
    try:
        with pillow_limit(None), Image.open(f, formats=decode.FORMATS) as im:  # type: ignore[arg-type]  # a RawIOBase reads fine
            width, height = im.size
            if width * height > spec.max_pixels:
                decode._check_bomb(im, [], name, spec.max_pixels, spec.max_pixels)
            if width * height <= spec.stream_pixels:
                return None
            return _plan(im)
    except (UnidentifiedImageError, *decode._DECODE_ERRORS):
        return None  # the Pillow path reports it, with its own message


def _plan(im: Any) -> _Plan | None:
    """The streaming plan for an opened (not loaded) Pillow image, or ``None`` where its decode is Pillow's
    only: libvips must produce the same samples as the Pillow path's policy."""
    fmt, mode = im.format, im.mode
    rgb16 = decode._rgb16_rawmodes(im) is not None
    frames = int(getattr(im, "n_frames", 1))
    if fmt == "JPEG":
        layouts = {"RGB": (3, "uchar"), "L": (1, "uchar")}
    elif fmt == "PNG" and frames == 1:
        layouts = {"RGB": (3, "uchar"), "RGBA": (3, "uchar"), "L": (1, "uchar"), "LA": (1, "uchar")}
        layouts |= {"P": (3, "uchar"), "I;16": (1, "ushort")}
        if rgb16:
            layouts = {"RGB": (3, "ushort"), "RGBA": (3, "ushort")}
    elif fmt == "TIFF" and im.tag_v2.get(259, 1) in _LOSSLESS_TIFF:
        bits = im.tag_v2.get(258, (8,))[0]
        layouts = {"RGB": (3, "uchar"), "RGBA": (3, "uchar"), "L": (1, "uchar")} if bits == 8 else {}
        layouts |= {"I;16": (1, "ushort"), "I;16B": (1, "ushort")} if bits == 16 else {}
    else:
        return None
    if mode not in layouts:
        return None
    notes: list[str] = []
    if frames > 1:
        notes.append(f"multi-frame image ({frames} frames): first frame only")
    # Pillow's PNG getexif() would decode the whole image to look for an eXIf chunk after the pixels.
    late_exif_only = fmt == "PNG" and "exif" not in im.info
    orientation = 1 if late_exif_only else decode._noted_orientation(im, notes)
    mode_notes = {"RGBA": "alpha dropped", "LA": "alpha dropped"}
    if mode == "P":
        has_alpha = "transparency" in im.info
        mode_notes["P"] = "palette converted to RGB" + ("; transparency dropped" if has_alpha else "")
    if mode in mode_notes:
        at = len(notes) - (1 if rgb16 and orientation != 1 else 0)  # 16-bit RGBA: Pillow notes alpha first
        notes.insert(at, mode_notes[mode])
    bands, vips_format = layouts[mode]
    width, height = im.size
    if fmt == "TIFF":  # Pillow reports a libtiff-decoded TIFF's size already oriented: take the stored size
        width, height = int(im.tag_v2[256]), int(im.tag_v2[257])
    return _Plan(
        bands=bands,
        vips_format=vips_format,
        bit_depth=16 if vips_format == "ushort" else 8,
        mode=mode,
        width=width,
        height=height,
        orientation=orientation,
        notes=tuple(notes),
        tiled=fmt == "TIFF" and 322 in im.tag_v2,  # TileWidth
    )


class _Window(io.RawIOBase):
    """Bytes ``start .. start+size-1`` of a seekable file, as a file of its own (a ``.tar`` member in place);
    closing it closes ``f`` only if ``owns``."""

    def __init__(self, f: IO[bytes], start: int, size: int, *, owns: bool = False) -> None:
        self._f, self._start, self._size, self._pos, self._owns = f, start, size, 0, owns

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = self._size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        self._f.seek(self._start + self._pos)
        out = self._f.read(n)
        self._pos += len(out)
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._owns:
            self._f.close()
        super().close()


def _hash_range(f: IO[bytes], start: int, size: int, copy_to: str | None) -> str:
    """sha256 of bytes ``start .. start+size-1`` of ``f``, read ``READ_BLOCK`` at a time; copied to
    ``copy_to`` on the way when given."""
    digest = hashlib.sha256()
    f.seek(start)
    with open(copy_to, "wb") if copy_to else contextlib.nullcontext() as out:
        left = size
        while left > 0:
            block = f.read(min(READ_BLOCK, left))
            if not block:
                break
            digest.update(block)
            if out is not None:
                out.write(block)
            left -= len(block)
    return digest.hexdigest()


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _vips_reason(e: Exception) -> str:
    """libvips's message, first line, without the operation prefix noise."""
    detail = str(getattr(e, "detail", "") or e).strip().splitlines()
    return detail[0] if detail else type(e).__name__

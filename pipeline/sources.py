"""Enumerate input images: single files, ``.tar``, ``.tar.gz``/``.tgz`` and ``.zip`` archives, prefixes and globs.

Everything goes through fsspec (local paths, ``memory://``, ``s3://`` ...), with filesystems built only by
:func:`pipeline.storage.open_fs`. Reading is ranged where the format allows it:

* ``tar``: :func:`list_members` reads only the 512-byte headers (``tarfile`` in seekable ``r:`` mode skips member
  data with ``seek``), and :func:`read_member` fetches ``offset .. offset + size`` of one member.
* ``zip``: the central directory at the end of the file is read; a member is read through ``zipfile``.
* ``targz``: gzip is not seekable, so listing decompresses the whole stream; use :func:`iter_targz` to process a
  ``.tar.gz`` in a single pass instead of listing and then reading members one by one.

Member policy (the ``reason`` of a :class:`Rejected` entry):

=====================================================  =====================================================
member                                                 outcome
=====================================================  =====================================================
regular file with an image extension                   image (:class:`ImageRef`)
name with a ``..`` component or an absolute path       rejected: ``unsafe member name`` (names become output
                                                       keys, so they must not escape the output prefix)
symbolic link / hard link                              rejected: ``symbolic link`` / ``hard link`` (never
                                                       followed, so an archive cannot point outside itself)
device, FIFO, sparse or other special member           rejected: ``not a regular file`` / ``sparse member``
directory named like an image (``photo.jpg/``)         rejected: ``directory named like an image``
other directories                                      ignored (structure, not input)
regular file with an archive extension                 rejected: ``nested archive (not recursed)``
encrypted zip member                                   rejected: ``encrypted zip member``
``.avif``, ``.heic`` ... (not converted)               rejected: ``unsupported image format``
declared size over ``max_bytes`` (the job's            rejected: ``... over the ... byte limit`` (from the header,
``decode.max_member_bytes``, default 256 MiB)          nothing read; reads also stop at the declared size)
tar member whose data runs past the end of the file    rejected: ``runs past the end of the archive``
a tar broken part-way (truncated, corrupt header)      the entries before it kept; one rejection naming the
                                                       archive (``corrupt or truncated tar after entry N``)
zip entries sharing bytes (overlapping-entry bomb)     the archive fails: ``overlapping zip entries``
any other regular file (``.txt``, ``.json`` ...)       rejected: ``not an image extension``
=====================================================  =====================================================

Duplicate member names are all kept; :attr:`ImageRef.occurrence` (how many earlier entries had the same name)
tells them apart and is part of :attr:`ImageRef.key`, which never depends on a member's position (issue 12: a
member added first must not change the identity of the others). :attr:`ImageRef.version` is the listing's change
token (tar header size + mtime, zip CRC-32 + size, file size + ETag/mtime) that lets a rerun skip an unchanged
input without reading it. Image extensions: ``.jpg .jpeg .png .tif .tiff .bmp .webp .gif``,
case-insensitive. A corrupt or truncated archive raises :class:`~pipeline.errors.ArchiveError`.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import os
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import ArchiveError, InputError
from pipeline.storage import open_fs

__all__ = [
    "ARCHIVE_SUFFIXES",
    "IMAGE_EXTENSIONS",
    "ImageRef",
    "Kind",
    "Rejected",
    "MAX_MEMBER_BYTES",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "expand",
    "expand_inputs",
    "iter_targz",
    "kind_of",
    "list_members",
    "read_member",
    "normalize_url",
    "size_reason",
    "version_of",
]

logger = logging.getLogger(__name__)

Kind = Literal["file", "tar", "zip", "targz"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"})
#: Image formats recognised but not converted (``failed``: the user likely meant them as input).
UNSUPPORTED_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".psd", ".svg", ".ico", ".ppm", ".pgm", ".pbm", ".tga"}
    | {".exr", ".hdr", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".eps", ".pdf"}
)
#: Default largest image file or member, in bytes (declared size, then a bounded read): the ``max_bytes`` of
#: the functions below, a job's ``decode.max_member_bytes``. Decoding a file held in memory needs a few times
#: this; a 1 MB zip declaring a 1 GiB member took a task to 2.2 GB before (issue 15).
MAX_MEMBER_BYTES = 256 * 1024 * 1024
# Longest suffix first, so ".tar.gz" wins over ".gz".
ARCHIVE_SUFFIXES: tuple[tuple[str, Kind], ...] = (
    (".tar.gz", "targz"),
    (".tgz", "targz"),
    (".tar", "tar"),
    (".zip", "zip"),
)
# Suffixes of archives we recognise inside archives but do not recurse into.
_NESTED_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst")

# Listing reads 512-byte tar headers spread through the file; a small block keeps each seek to one small ranged
# GET on object storage instead of fsspec's default 5 MiB read-ahead.
_LIST_BLOCK_SIZE = 64 * 1024
_GLOB_CHARS = re.compile(r"[*?\[]")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ImageRef:
    """One input image: a plain file, or a member of an archive. Small and picklable (it travels through Ray).

    Args:
        source: URL of the file or archive, protocol kept (``s3://bucket/a.tar``), without credentials.
        member: archive member name, ``None`` for a plain file.
        kind: ``"file"``, ``"tar"``, ``"zip"`` or ``"targz"``.
        offset: byte offset of a tar member's data in the archive (for a ranged read), else ``None``.
        size: size in bytes (uncompressed), if known.
        index: position among all entries of the archive (0 for a plain file); how a member is found again
            when read, never part of its identity.
        occurrence: how many earlier entries of the archive have the same member name (0 for the first).
        version: change token from the listing (see :func:`version_of`), ``None`` if unknown.
    """

    source: str
    member: str | None
    kind: Kind
    offset: int | None = None
    size: int | None = None
    index: int = 0
    occurrence: int = 0
    version: str | None = None

    @property
    def key(self) -> str:
        """Stable unique id: the normalised source URL, then ``!member`` for an archive member and ``#n`` for
        the n-th repeat of a member name. The same file spelt ``/x/a.png``, ``file:///x/a.png`` or
        ``/x/../x/a.png`` has one key; a member keeps its key when other members are added before it."""
        url = normalize_url(self.source)
        if self.member is None:
            return url
        return f"{url}!{self.member}" + (f"#{self.occurrence}" if self.occurrence else "")

    @property
    def name(self) -> str:
        """Human-readable name for messages: ``source`` or ``source!member``."""
        return self.source if self.member is None else f"{self.source}!{self.member}"


@dataclass(frozen=True)
class Rejected:
    """An archive entry that is not converted, and why (recorded as a ``skipped`` manifest row)."""

    ref: ImageRef
    reason: str


def kind_of(name: str) -> Kind | None:
    """Return the input kind a file name implies (case-insensitive), or ``None`` if it is neither image nor archive."""
    lower = name.lower()
    for suffix, kind in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return kind
    if posixpath.splitext(lower)[1] in IMAGE_EXTENSIONS:
        return "file"
    return None


def normalize_url(url: str) -> str:
    """One spelling per object: local paths (with or without ``file://``) become absolute ``file://`` URLs with
    ``.``/``..`` resolved (symlinks are not followed); other URLs get a lower-case protocol and a normalised
    key (no ``//``, ``.`` or ``..`` segments, no trailing ``/``)."""
    protocol, sep, rest = url.partition("://")
    if not sep:
        protocol, rest = "file", url
    protocol = protocol.lower()
    if protocol in ("file", "local"):
        return "file://" + posixpath.normpath(os.path.abspath(rest))
    parts: list[str] = []
    for seg in rest.split("/"):
        if seg in ("", "."):
            continue
        if seg == ".." and parts:
            parts.pop()
        elif seg != "..":
            parts.append(seg)
    return f"{protocol}://" + "/".join(parts)


def version_of(info: Mapping[str, Any]) -> str | None:
    """The change token of an fsspec ``info``/``ls(detail=True)`` entry: size and ETag (object stores) or
    size and mtime (local and others); ``None`` when the listing gives neither."""
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"{size}:etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if mtime is not None:
        return f"{size}:mtime:{mtime.isoformat() if hasattr(mtime, 'isoformat') else mtime}"
    return None


def expand_inputs(urls: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, Kind]]:
    """The images and archives of :func:`expand` (without the files it accounts for but does not convert)."""
    return expand(urls, storage_options)[0]


def expand(
    urls: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[list[tuple[str, Kind]], list[Rejected]]:
    """Expand input URLs into sorted, de-duplicated ``(url, kind)`` pairs, and the files found but not converted.

    Each URL may be an image file, an archive, a prefix/directory (listed recursively) or a glob
    (``s3://bucket/batch-*/*.tar``). The protocol is kept in the returned URLs; local inputs given without a
    protocol come back as plain paths. Every file under a prefix is accounted for: one that is neither image
    nor archive is a :class:`Rejected` (``not an image extension``, or ``unsupported image format`` for
    ``.avif``, ``.heic`` ...). In a local folder, symbolic links are never followed out of it (rejected:
    ``symbolic link out of the input folder``) and linked folders are not descended.

    Raises:
        InputError: a URL matches nothing, or names a file that is neither an image nor an archive.
    """
    if isinstance(urls, str):
        raise TypeError("urls must be a sequence of URLs, not a single string; wrap it in a list")
    found: dict[str, Kind] = {}
    rejected: dict[str, Rejected] = {}
    for url in urls:
        fs, path = open_fs(url, storage_options)
        with_protocol = "://" in url
        if _GLOB_CHARS.search(path):
            files: list[tuple[str, str | None]] = []
            for match in fs.glob(path):
                files.extend(_walk(fs, match))
            what = "the glob matches"
        elif fs.isdir(path):
            files, what = _walk(fs, path), "the prefix holds"
        elif fs.isfile(path):
            kind = kind_of(path)
            if kind is None:
                raise InputError(
                    f"input {url!r} is neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) nor an archive "
                    f"({', '.join(s for s, _ in ARCHIVE_SUFFIXES)}); rename it or pass its folder"
                )
            files, what = [(path, None)], ""
        else:
            raise InputError(f"input {url!r} matches nothing (no such file, prefix or glob match)")
        matched = 0
        for p, problem in files:
            file_url = _to_url(fs, p, with_protocol)
            kind = kind_of(p) if problem is None else None
            if kind is not None:
                found[file_url] = kind
                matched += 1
            else:
                ref = ImageRef(source=file_url, member=None, kind="file")
                rejected[file_url] = Rejected(ref, problem or _file_reason(p))
        if not matched:
            raise InputError(f"input {url!r}: {what} no images or archives")
    return sorted(found.items()), [rejected[k] for k in sorted(rejected) if k not in found]


def _file_reason(path: str) -> str:
    ext = posixpath.splitext(path.lower())[1]
    if ext in UNSUPPORTED_IMAGE_EXTENSIONS:
        return f"unsupported image format ({ext}); supported: {' '.join(sorted(IMAGE_EXTENSIONS))}"
    return "not an image extension"


def _to_url(fs: AbstractFileSystem, path: str, with_protocol: bool) -> str:
    """The URL of ``path``: with the protocol if the input had one, a plain local path otherwise."""
    return fs.unstrip_protocol(path) if with_protocol else path


def _walk(fs: AbstractFileSystem, path: str) -> list[tuple[str, str | None]]:
    """``(file, None)`` for each file under ``path`` (recursively) if it is a directory, else ``[(path, None)]``;
    ``(link, reason)`` for symbolic links of a local folder that are not followed."""
    if isinstance(fs, LocalFileSystem) and os.path.isdir(path):
        return _walk_local(path)
    if fs.isdir(path):
        return [(p, None) for p in fs.find(path)]
    return [(path, None)]


def _walk_local(root: str) -> list[tuple[str, str | None]]:
    """A local folder's files without following links out of it: ``os.walk`` does not descend linked
    folders, and a linked file is kept only when its target is inside ``root``."""
    top = os.path.realpath(root)
    out: list[tuple[str, str | None]] = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in sorted(names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]):
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                out.append((p, None))
                continue
            target = os.path.realpath(p)
            if os.path.commonpath([top, target]) != top:
                out.append((p, "symbolic link out of the input folder (not followed)"))
            elif os.path.isdir(target):
                out.append((p, "symbolic link to a folder (not followed)"))
            elif os.path.isfile(target):
                out.append((p, None))
            else:
                out.append((p, "broken symbolic link"))
    return out


def list_members(
    url: str, kind: Kind, storage_options: Mapping[str, Any] | None = None, *, max_bytes: int = MAX_MEMBER_BYTES
) -> tuple[list[ImageRef], list[Rejected]]:
    """List the images of one input and the entries that are not converted.

    Members declaring more than ``max_bytes`` are rejected (:func:`size_reason`).

    Returns:
        ``(images, rejected)`` in archive order. For ``kind="file"``: ``([ref], [])`` (its size is checked
        when it is read).

    Raises:
        ArchiveError: the archive is corrupt, truncated or not of the given kind.
        InputError: ``url`` does not exist.
    """
    fs, path = open_fs(url, storage_options)
    if kind == "file":
        try:
            info = fs.info(path)
        except FileNotFoundError as e:
            raise InputError(f"input {url!r} does not exist") from e
        return [ImageRef(url, None, "file", size=info.get("size"), version=version_of(info))], []
    if kind == "tar":
        return _list_tar(fs, path, url, max_bytes)
    if kind == "zip":
        return _list_zip(fs, path, url, max_bytes)
    if kind == "targz":
        images: list[ImageRef] = []
        rejected: list[Rejected] = []
        for ref, reason, _ in _scan_targz(fs, path, url, want=None, max_bytes=max_bytes):
            if reason is None:
                images.append(ref)
            else:
                rejected.append(Rejected(ref, reason))
        return images, rejected
    raise ValueError(f"kind must be one of 'file', 'tar', 'zip', 'targz', got {kind!r}")


def read_member(
    ref: ImageRef, storage_options: Mapping[str, Any] | None = None, *, max_bytes: int = MAX_MEMBER_BYTES
) -> bytes:
    """Read the bytes of one image (whole file, tar byte range, zip member, or streamed tar.gz member).

    Raises:
        ArchiveError: the member cannot be read (truncated archive, changed archive, bad CRC ...), or it
            declares more than ``max_bytes`` (:func:`size_reason`; nothing read).
        InputError: the file or archive does not exist.
    """
    fs, path = open_fs(ref.source, storage_options)
    try:
        size = fs.size(path) if ref.kind == "file" else ref.size
        if (too_big := size_reason(size, max_bytes)) is not None:
            raise ArchiveError(f"{ref.name}: {too_big}")
        if ref.kind == "file":
            return bytes(fs.cat_file(path))
        if ref.kind == "tar":
            if ref.offset is None or ref.size is None:
                raise ValueError(f"tar ref {ref.key!r} needs offset and size; build refs with list_members")
            data = bytes(fs.cat_file(path, start=ref.offset, end=ref.offset + ref.size))
            if len(data) != ref.size:
                raise ArchiveError(
                    f"{ref.name}: tar member truncated (read {len(data)} of {ref.size} bytes at offset {ref.offset})"
                )
            return data
        if ref.kind == "zip":
            return _read_zip_member(fs, path, ref, max_bytes)
        if ref.kind == "targz":
            for found, _, member_data in _scan_targz(fs, path, ref.source, want=ref.index, max_bytes=max_bytes):
                if found.index == ref.index and member_data is not None:
                    if found.member != ref.member:
                        raise ArchiveError(
                            f"{ref.name}: archive changed since listing (entry {ref.index} is {found.member!r})"
                        )
                    return member_data
            raise ArchiveError(f"{ref.name}: member not found in archive (entry {ref.index})")
    except FileNotFoundError as e:
        raise InputError(f"{ref.name}: does not exist") from e
    raise ValueError(f"ref.kind must be one of 'file', 'tar', 'zip', 'targz', got {ref.kind!r}")


def iter_targz(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    on_rejected: Callable[[Rejected], None] | None = None,
    max_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[tuple[ImageRef, bytes]]:
    """Stream every image member of a ``.tar.gz`` once, in archive order: one decompression pass.

    Members declaring more than ``max_bytes`` are rejected (:func:`size_reason`). Rejected entries are passed to ``on_rejected`` (if given) as they are met. Images already yielded stay
    valid if the stream turns out truncated later; the :class:`ArchiveError` is raised at that point.
    """
    fs, path = open_fs(url, storage_options)
    for ref, reason, data in _scan_targz(fs, path, url, want="images", max_bytes=max_bytes):
        if reason is not None:
            if on_rejected is not None:
                on_rejected(Rejected(ref, reason))
        elif data is not None:
            yield ref, data


# --- member policy --------------------------------------------------------------------------------------------


def _unsafe(name: str) -> bool:
    """A name that could escape an output prefix: absolute, drive-qualified, or with a ``..`` component."""
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return True
    return ".." in re.split(r"[/\\]", name)


def _reason(name: str, *, is_dir: bool, is_file: bool, special: str | None) -> str | None:
    """Why an entry is not an image, ``None`` if it is one; ``None`` with ``is_dir`` for plain directories too."""
    lower = name.lower().rstrip("/")
    if _unsafe(name):
        return "unsafe member name (absolute path or '..' component)"
    if special is not None:
        return special
    if is_dir:
        return "directory named like an image" if posixpath.splitext(lower)[1] in IMAGE_EXTENSIONS else None
    if not is_file:
        return "not a regular file"
    if lower.endswith(_NESTED_ARCHIVE_SUFFIXES):
        return "nested archive (not recursed)"
    if posixpath.splitext(lower)[1] in UNSUPPORTED_IMAGE_EXTENSIONS:
        return _file_reason(lower)
    if posixpath.splitext(lower)[1] not in IMAGE_EXTENSIONS:
        return "not an image extension"
    return None


def _tar_reason(info: tarfile.TarInfo) -> tuple[bool, str | None]:
    """``(keep, reason)``: ``keep`` is False for plain directories, which are ignored entirely."""
    special = None
    if info.issym():
        special = "symbolic link"
    elif info.islnk():
        special = "hard link"
    elif info.issparse():
        special = "sparse member"
    reason = _reason(info.name, is_dir=info.isdir(), is_file=info.isreg(), special=special)
    return not (info.isdir() and reason is None), reason


# --- tar ------------------------------------------------------------------------------------------------------


def _list_tar(fs: AbstractFileSystem, path: str, url: str, max_bytes: int) -> tuple[list[ImageRef], list[Rejected]]:
    """The tar's entries up to its end, or up to a break (truncation, a corrupt header): the entries before a
    break are kept and the break is one more :class:`Rejected` naming the archive itself."""
    entries: list[tuple[ImageRef, tuple[bool, str | None]]] = []
    broken: str | None = None
    try:
        # Seekable "r:" mode: tarfile seeks over member data, so only headers are fetched.
        with (
            fs.open(path, "rb", block_size=_LIST_BLOCK_SIZE, cache_type="readahead") as f,
            tarfile.open(fileobj=f, mode="r:") as tf,
        ):
            total = getattr(f, "size", None)
            try:
                for index, info in enumerate(tf):
                    ref = ImageRef(
                        url,
                        info.name,
                        "tar",
                        offset=info.offset_data,
                        size=info.size,
                        index=index,
                        version=_tar_version(info),
                    )
                    keep, reason = _tar_reason(info)
                    if reason is None and isinstance(total, int) and info.offset_data + info.size > total:
                        reason = f"member data ({info.size} bytes) runs past the end of the archive (truncated)"
                    entries.append((ref, (keep, reason)))
            except (tarfile.TarError, EOFError) as e:
                if not entries:
                    raise
                broken = (
                    f"archive {url!r}: corrupt or truncated tar after entry {len(entries) - 1} ({e}); "
                    "the entries before it are kept"
                )
    except FileNotFoundError as e:
        raise InputError(f"archive {url!r} does not exist") from e
    except (tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"archive {url!r}: corrupt or truncated tar ({e})") from e
    images, rejected = _partition(entries, max_bytes)
    if broken is not None:
        rejected.append(Rejected(ImageRef(url, None, "tar"), broken))
    return images, rejected


def size_reason(size: int | None, max_bytes: int = MAX_MEMBER_BYTES) -> str | None:
    """Why an image file or member of ``size`` bytes is not read (more than ``max_bytes``), or None: one line
    with the size, the limit and the spec field that raises it."""
    if size is not None and size > max_bytes:
        return (
            f"{size} bytes ({size / 2**20:.1f} MiB), over the {max_bytes} byte limit for one image file or member "
            "(raise decode.max_member_bytes if it is genuine)"
        )
    return None


def _partition(
    entries: Iterable[tuple[ImageRef, tuple[bool, str | None]]], max_bytes: int
) -> tuple[list[ImageRef], list[Rejected]]:
    """Archive entries with their ``(keep, reason)`` verdict → (images, rejected); entries not kept are dropped."""
    images: list[ImageRef] = []
    rejected: list[Rejected] = []
    seen: Counter[str] = Counter()
    for ref, (keep, reason) in entries:
        if not keep:
            continue
        reason = reason or size_reason(ref.size, max_bytes)
        ref = _counted(ref, seen)
        if reason is None:
            images.append(ref)
        else:
            rejected.append(Rejected(ref, reason))
    return images, rejected


def _counted(ref: ImageRef, seen: Counter[str]) -> ImageRef:
    """``ref`` with its occurrence: how many earlier kept entries had the same member name."""
    n = seen[ref.member or ""]
    seen[ref.member or ""] += 1
    return dataclasses.replace(ref, occurrence=n) if n else ref


def _tar_version(info: tarfile.TarInfo) -> str | None:
    """A tar member's change token from its header alone: size and mtime (what ``tar`` and ``rsync`` compare).
    ``None`` for mtime 0 (reproducible-build archives): size alone cannot tell an edit, so such a member of a
    changed archive is read and hashed."""
    return f"{info.size}:tar-mtime:{info.mtime}" if info.mtime else None


def _scan_targz(
    fs: AbstractFileSystem, path: str, url: str, want: int | Literal["images"] | None, max_bytes: int
) -> Iterator[tuple[ImageRef, str | None, bytes | None]]:
    """Stream a tar.gz: yield ``(ref, reason, data)`` per kept entry; ``data`` is read for ``want`` entries only.

    ``want``: ``None`` reads no data (listing), ``"images"`` reads every image, an int reads that entry and stops.
    """
    try:
        seen: Counter[str] = Counter()
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|gz") as tf:
            for index, info in enumerate(tf):
                keep, reason = _tar_reason(info)
                if not keep:
                    continue
                ref = _counted(
                    ImageRef(url, info.name, "targz", size=info.size, index=index, version=_tar_version(info)), seen
                )
                reason = reason or size_reason(info.size, max_bytes)
                data = None
                if reason is None and (want == "images" or want == index):
                    member = tf.extractfile(info)
                    data = member.read() if member is not None else b""
                    if len(data) != info.size:
                        raise ArchiveError(f"{ref.name}: member truncated ({len(data)} of {info.size} bytes)")
                yield ref, reason, data
                if want == index:
                    return
    except FileNotFoundError as e:
        raise InputError(f"archive {url!r} does not exist") from e
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ArchiveError(f"archive {url!r}: corrupt or truncated tar.gz ({e or type(e).__name__})") from e


# --- zip ------------------------------------------------------------------------------------------------------


def _zip_reason(info: zipfile.ZipInfo) -> tuple[bool, str | None]:
    mode = info.external_attr >> 16  # Unix mode bits, set by Unix zip tools; 0 otherwise.
    special = None
    if mode and stat.S_ISLNK(mode):
        special = "symbolic link"
    elif info.flag_bits & 0x1:
        special = "encrypted zip member"
    is_dir = info.is_dir()
    is_file = not is_dir and (not mode or stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0)
    reason = _reason(info.filename, is_dir=is_dir, is_file=is_file, special=special)
    return not (is_dir and reason is None), reason


def _open_zip(f: IO[bytes], url: str) -> zipfile.ZipFile:
    size = getattr(f, "size", None)
    if isinstance(size, int) and size <= _LIST_BLOCK_SIZE:
        # One small read instead of several; it also sidesteps fsspec's buffered files raising ValueError (not
        # OSError, which zipfile expects) when zipfile probes for a zip64 locator before the start of a file
        # shorter than 42 bytes, such as an empty zip.
        f = io.BytesIO(f.read())
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise ArchiveError(f"archive {url!r}: corrupt or truncated zip ({e})") from e


def _list_zip(fs: AbstractFileSystem, path: str, url: str, max_bytes: int) -> tuple[list[ImageRef], list[Rejected]]:
    try:
        with fs.open(path, "rb", block_size=_LIST_BLOCK_SIZE, cache_type="readahead") as f, _open_zip(f, url) as zf:
            _refuse_overlaps(zf, url)
            entries = (
                (
                    ImageRef(
                        url,
                        info.filename,
                        "zip",
                        size=info.file_size,
                        index=index,
                        version=f"{info.file_size}:crc32:{info.CRC:08x}",
                    ),
                    _zip_reason(info),
                )
                for index, info in enumerate(zf.infolist())
            )
            return _partition(entries, max_bytes)
    except FileNotFoundError as e:
        raise InputError(f"archive {url!r} does not exist") from e


def _refuse_overlaps(zf: zipfile.ZipFile, url: str) -> None:
    """Refuse a zip whose entries share bytes (the overlapping-entries zip bomb: 20 entries of 1 GiB over one
    deflate block). Each entry needs at least its 30-byte local header and its compressed data before the
    next entry, and the last one before the central directory."""
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    ends = [(i.header_offset + 30 + i.compress_size, i) for i in infos]
    limits = [(j.header_offset, j.filename) for j in infos[1:]] + [(zf.start_dir, "the central directory")]
    for (end, info), (start, other) in zip(ends, limits):  # no entries: nothing to check
        if end > start:
            raise ArchiveError(
                f"archive {url!r}: overlapping zip entries ({info.filename!r} runs into {other}); a zip whose "
                f"entries share data is refused (zip bomb)"
            )


def _read_zip_member(fs: AbstractFileSystem, path: str, ref: ImageRef, max_bytes: int) -> bytes:
    try:
        with fs.open(path, "rb") as f, _open_zip(f, ref.source) as zf:
            infos = zf.infolist()
            if ref.index >= len(infos) or infos[ref.index].filename != ref.member:
                raise ArchiveError(f"{ref.name}: archive changed since listing (no such member at entry {ref.index})")
            if (too_big := size_reason(infos[ref.index].file_size, max_bytes)) is not None:
                raise ArchiveError(f"{ref.name}: {too_big}")
            return zf.read(infos[ref.index])  # zipfile stops at the declared size and checks the CRC
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as e:
        # RuntimeError: encrypted member; NotImplementedError: unsupported compression method.
        raise ArchiveError(f"{ref.name}: cannot read zip member ({e})") from e

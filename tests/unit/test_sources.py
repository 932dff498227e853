"""Input enumeration: expand_inputs, list_members, read_member and iter_targz on local paths and memory://."""

from __future__ import annotations

import io
import pickle
import stat
import tarfile
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractBufferedFile

from pipeline.errors import ArchiveError, InputError
from pipeline.sources import (
    ImageRef,
    Rejected,
    expand_inputs,
    iter_targz,
    kind_of,
    list_members,
    normalize_url,
    read_member,
    version_of,
)


def _tar_bytes(entries: list[tuple[str, bytes]], *, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class CountingMemoryFileSystem(MemoryFileSystem):
    """memory:// with S3-like reads: buffered files that fetch byte ranges, and ranged ``cat_file``.

    Counts the bytes fetched, like the bytes an object store would send.
    """

    protocol = ("countmem",)
    bytes_read: ClassVar[int] = 0

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.removeprefix("countmem://"))

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        if "r" not in mode:
            return super()._open(path, mode, block_size=block_size, **kwargs)
        path = self._strip_protocol(path)
        kwargs.pop("autocommit", None)
        return _RangedFile(self, path, mode, block_size=block_size or "default", size=self.size(path), **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        data = super().cat_file(path, start=start, end=end, **kwargs)
        CountingMemoryFileSystem.bytes_read += len(data)
        return data


class _RangedFile(AbstractBufferedFile):
    def _fetch_range(self, start: int, end: int) -> bytes:
        data = self.fs.store[self.path].getvalue()[start:end]
        CountingMemoryFileSystem.bytes_read += len(data)
        return data


@pytest.fixture
def counting_fs() -> Iterator[str]:
    fsspec.register_implementation("countmem", CountingMemoryFileSystem, clobber=True)
    root = f"/count-{uuid.uuid4().hex}"
    CountingMemoryFileSystem.bytes_read = 0
    yield root
    CountingMemoryFileSystem().rm(root, recursive=True)


@pytest.fixture
def memroot() -> Iterator[str]:
    root = f"/sources-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --- kind_of / expand_inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("a.jpg", "file"),
        ("a.JPEG", "file"),
        ("x/y.Tiff", "file"),
        ("a.webp", "file"),
        ("a.tar", "tar"),
        ("A.TAR.GZ", "targz"),
        ("a.tgz", "targz"),
        ("a.Zip", "zip"),
        ("a.txt", None),
        ("a.gz", None),
        ("jpg", None),
    ],
)
def test_kind_of(name: str, kind: str | None) -> None:
    assert kind_of(name) == kind


def _touch_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "photo.jpg").mkdir()  # a directory named like an image: its files count, it does not
    for rel in ["a.png", "sub/b.JPG", "sub/deeper/c.tar", "sub/d.tar.gz", "e.zip", "photo.jpg/inside.png"]:
        (root / rel).write_bytes(b"x")
    (root / "notes.txt").write_text("ignored")


def test_expand_prefix_recurses_and_ignores_other_files(tmp_path: Path) -> None:
    _touch_tree(tmp_path)
    got = expand_inputs([str(tmp_path)])
    assert got == sorted(
        [
            (str(tmp_path / "a.png"), "file"),
            (str(tmp_path / "sub/b.JPG"), "file"),
            (str(tmp_path / "sub/deeper/c.tar"), "tar"),
            (str(tmp_path / "sub/d.tar.gz"), "targz"),
            (str(tmp_path / "e.zip"), "zip"),
            (str(tmp_path / "photo.jpg/inside.png"), "file"),
        ]
    )


def test_expand_glob_and_dedupe(tmp_path: Path) -> None:
    _touch_tree(tmp_path)
    got = expand_inputs([f"{tmp_path}/sub/*", str(tmp_path / "sub" / "b.JPG")])
    assert got == [
        (str(tmp_path / "sub/b.JPG"), "file"),
        (str(tmp_path / "sub/d.tar.gz"), "targz"),
        (str(tmp_path / "sub/deeper/c.tar"), "tar"),
    ]


def test_expand_memory_keeps_protocol(memroot: str) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe({f"{memroot}/b.tar": b"x", f"{memroot}/a/x.png": b"x", f"{memroot}/readme.md": b"x"})
    assert expand_inputs([f"memory://{memroot}"]) == [
        (f"memory://{memroot}/a/x.png", "file"),
        (f"memory://{memroot}/b.tar", "tar"),
    ]
    assert expand_inputs([f"memory://{memroot}/*.tar"]) == [(f"memory://{memroot}/b.tar", "tar")]


@pytest.mark.parametrize("suffix", ["missing.png", "nothing-*.tar", "missing-dir/"])
def test_expand_missing_names_the_url(tmp_path: Path, suffix: str) -> None:
    url = f"{tmp_path}/{suffix}"
    with pytest.raises(InputError, match="matches nothing|matches no images"):
        expand_inputs([url])
    with pytest.raises(InputError) as info:
        expand_inputs([url])
    assert url in str(info.value)


def test_expand_rejects_non_image_file_and_empty_prefix(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="neither an image"):
        expand_inputs([str(tmp_path / "notes.txt")])
    with pytest.raises(InputError, match="holds no images"):
        expand_inputs([str(tmp_path)])


def test_expand_rejects_a_bare_string(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="sequence"):
        expand_inputs(str(tmp_path))  # type: ignore[arg-type]


# --- ImageRef -------------------------------------------------------------------------------------------------


def test_image_ref_is_small_picklable_and_keys_are_unique() -> None:
    a = ImageRef("s3://b/a.tar", "img.png", "tar", offset=512, size=10, index=0)
    b = ImageRef("s3://b/a.tar", "img.png", "tar", offset=1536, size=10, index=2, occurrence=1)
    assert pickle.loads(pickle.dumps(a)) == a
    assert a.key != b.key
    assert a.key == "s3://b/a.tar!img.png" and b.key == "s3://b/a.tar!img.png#1"
    assert ImageRef("/x/y.png", None, "file").key == "file:///x/y.png"
    assert len(pickle.dumps(a)) < 300


def test_identity_is_the_normalised_url_and_member_never_the_position() -> None:
    spellings = ["/x/a.png", "file:///x/a.png", "/x/../x/a.png", "/x/./a.png", "FILE:///x//a.png"]
    assert {ImageRef(u, None, "file").key for u in spellings} == {"file:///x/a.png"}
    assert normalize_url("s3://b//p/./q/../a.tar/") == "s3://b/p/a.tar"
    # The same member at another position in a rebuilt archive keeps its key (and so its cube).
    first = ImageRef("s3://b/a.tar", "img.png", "tar", index=0)
    moved = ImageRef("s3://b/a.tar", "img.png", "tar", index=7)
    assert first.key == moved.key


def test_repeated_member_names_are_counted_and_listings_carry_versions(tmp_path: Path) -> None:
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tf:
        for i, name in enumerate(["a.png", "b.png", "a.png"]):
            info = tarfile.TarInfo(name)
            data = bytes([i]) * (10 + i)
            info.size, info.mtime = len(data), 1_000_000 + i
            tf.addfile(info, io.BytesIO(data))
    images, _ = list_members(str(path), "tar")
    assert [(r.member, r.occurrence) for r in images] == [("a.png", 0), ("b.png", 0), ("a.png", 1)]
    assert len({r.key for r in images}) == 3
    assert images[2].version == "12:tar-mtime:1000002"
    (tmp_path / "x.png").write_bytes(b"12345")
    [ref], _ = list_members(str(tmp_path / "x.png"), "file")
    assert ref.version is not None and ref.version.startswith("5:mtime:")
    assert version_of({"size": 3, "ETag": '"abc"'}) == "3:etag:abc"


# --- tar ------------------------------------------------------------------------------------------------------


def test_tar_listing_reads_headers_only_and_members_by_range(counting_fs: str) -> None:
    rng = np.random.default_rng(0)
    big = [rng.bytes(1 << 20) for _ in range(3)]
    small = b"small image bytes"
    archive = _tar_bytes([("big0.png", big[0]), ("big1.png", big[1]), ("small.png", small), ("big2.png", big[2])])
    url = f"countmem://{counting_fs}/a.tar"
    CountingMemoryFileSystem().pipe_file(f"{counting_fs}/a.tar", archive)

    CountingMemoryFileSystem.bytes_read = 0
    images, rejected = list_members(url, "tar")
    assert rejected == []
    assert [r.member for r in images] == ["big0.png", "big1.png", "small.png", "big2.png"]
    # Each header costs at most one 64 KiB read-ahead block; the 3 MiB of member data are never fetched.
    assert CountingMemoryFileSystem.bytes_read <= 5 * 64 * 1024 < len(archive) // 8

    ref = images[2]
    assert ref.offset is not None and archive[ref.offset : ref.offset + len(small)] == small
    CountingMemoryFileSystem.bytes_read = 0
    assert read_member(ref) == small
    assert CountingMemoryFileSystem.bytes_read == len(small)


def test_tar_member_truncated_after_listing(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    path.write_bytes(_tar_bytes([("a.png", b"a" * 2000)]))
    (ref,), _ = list_members(str(path), "tar")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArchiveError, match=r"a\.tar!a\.png: tar member truncated"):
        read_member(ref)


def test_missing_archive_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        list_members(str(tmp_path / "gone.tar"), "tar")
    with pytest.raises(InputError, match="does not exist"):
        read_member(ImageRef(str(tmp_path / "gone.png"), None, "file"))


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        list_members("memory:///x", "rar")  # type: ignore[arg-type]


# --- zip ------------------------------------------------------------------------------------------------------


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("d/", b"")
        zf.writestr("d/one.png", b"one")
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "d/one.png")
        zf.writestr("two.TIF", b"two" * 100)
        zf.writestr("inner.tar.gz", b"x")
        with warnings.catch_warnings():
            # zipfile warns on duplicate names; the duplicate is the point of this fixture.
            warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
            zf.writestr("d/one.png", b"one again")
    return buf.getvalue()


def test_zip_listing_and_reading(memroot: str) -> None:
    url = f"memory://{memroot}/a.zip"
    fsspec.filesystem("memory").pipe_file(f"{memroot}/a.zip", _zip_bytes())
    images, rejected = list_members(url, "zip")
    assert [(r.member, r.index, r.size) for r in images] == [
        ("d/one.png", 1, 3),
        ("two.TIF", 3, 300),
        ("d/one.png", 5, 9),
    ]
    assert [(r.ref.member, r.reason) for r in rejected] == [
        ("link.png", "symbolic link"),
        ("inner.tar.gz", "nested archive (not recursed)"),
    ]
    assert all(r.offset is None and r.kind == "zip" for r in images)
    assert [read_member(r) for r in images] == [b"one", b"two" * 100, b"one again"]


def test_zip_listing_on_buffered_object_store_files(counting_fs: str) -> None:
    """Empty (22-byte) and small zips through an fsspec buffered file, as on S3."""
    fs = CountingMemoryFileSystem()
    empty = io.BytesIO()
    zipfile.ZipFile(empty, "w").close()
    fs.pipe_file(f"{counting_fs}/empty.zip", empty.getvalue())
    fs.pipe_file(f"{counting_fs}/a.zip", _zip_bytes())
    assert list_members(f"countmem://{counting_fs}/empty.zip", "zip") == ([], [])
    images, _ = list_members(f"countmem://{counting_fs}/a.zip", "zip")
    assert len(images) == 3


def test_zip_member_changed_after_listing(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(_zip_bytes())
    images, _ = list_members(str(path), "zip")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("other.png", b"x")
    with pytest.raises(ArchiveError, match="archive changed"):
        read_member(images[0])


# --- tar.gz ---------------------------------------------------------------------------------------------------


def test_targz_listing_reading_and_streaming(memroot: str) -> None:
    entries = [("a.png", b"aaa"), ("skip.txt", b"t"), ("b.jpg", b"bbbb"), ("a.png", b"second a")]
    url = f"memory://{memroot}/x.tgz"
    fsspec.filesystem("memory").pipe_file(f"{memroot}/x.tgz", _tar_bytes(entries, gz=True))

    images, rejected = list_members(url, "targz")
    assert [(r.member, r.index, r.offset, r.size) for r in images] == [
        ("a.png", 0, None, 3),
        ("b.jpg", 2, None, 4),
        ("a.png", 3, None, 8),
    ]
    assert [(r.ref.member, r.reason) for r in rejected] == [("skip.txt", "not an image extension")]
    assert read_member(images[2]) == b"second a"

    seen: list[Rejected] = []
    streamed = list(iter_targz(url, on_rejected=seen.append))
    assert [(ref, data) for ref, data in streamed] == list(zip(images, [b"aaa", b"bbbb", b"second a"], strict=True))
    assert seen == rejected


def test_targz_truncated_raises_after_good_members(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = _tar_bytes([("a.png", b"a" * 100), ("b.png", rng.bytes(200_000))], gz=True)
    path = tmp_path / "t.tar.gz"
    path.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(ArchiveError, match=r"t\.tar\.gz.*corrupt or truncated tar\.gz"):
        for ref, _ in iter_targz(str(path)):
            got.append(ref.member)
    assert got == ["a.png"]
    with pytest.raises(ArchiveError):
        list_members(str(path), "targz")


def test_targz_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "t.tgz"
    path.write_bytes(b"not gzip at all" * 10)
    with pytest.raises(ArchiveError, match="corrupt or truncated tar.gz"):
        list_members(str(path), "targz")


# --- plain files ----------------------------------------------------------------------------------------------


def test_plain_file(memroot: str) -> None:
    fsspec.filesystem("memory").pipe_file(f"{memroot}/x y.PNG", b"12345")
    url = f"memory://{memroot}/x y.PNG"
    (ref,), rejected = list_members(url, "file")
    assert rejected == []
    assert ref == ImageRef(url, None, "file", size=5, index=0, version=ref.version)
    assert ref.version is not None and ref.version.startswith("5:")
    assert read_member(ref) == b"12345"

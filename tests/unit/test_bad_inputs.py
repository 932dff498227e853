"""Every case of the bad-input corpus gets exactly its documented outcome, from a local folder and memory://."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
from fixtures.make_bad_inputs import CASE_NAMES, Case, Expect, make_corpus, outcome_table

from pipeline.decode import decode_image
from pipeline.errors import ArchiveError, InputError
from pipeline.sources import Rejected, expand, expand_inputs, iter_targz, list_members, read_member
from pipeline.storage import readable


@dataclass(frozen=True)
class Row:
    """One manifest-like row: what the pipeline would record."""

    member: str | None
    status: str
    reason: str = ""
    shape: tuple[int, int] | None = None
    bit_depth: int | None = None


def _decoded(member: str | None, data: bytes, name: str) -> Row:
    try:
        image = decode_image(data, name=name)
    except InputError as e:
        return Row(member, "failed", str(e))
    assert image.array.shape == (image.height, image.width, 3)
    return Row(member, "ok", shape=(image.height, image.width), bit_depth=image.bit_depth)


def run_input(url: str) -> list[Row]:
    """Expand, list, read and decode one input the way the pipeline does; one row per recorded outcome."""
    rows: list[Row] = []
    try:
        found = expand_inputs([url])
    except InputError as e:  # a single file that is neither image nor archive
        return [Row(None, "failed", str(e))]
    for source, kind in found:
        rejected: list[Rejected] = []
        n_images = 0
        try:
            if kind == "targz":
                for ref, data in iter_targz(source, on_rejected=rejected.append):
                    n_images += 1
                    rows.append(_decoded(ref.member, data, ref.name))
            else:
                images, rejected = list_members(source, kind)
                for ref in images:
                    n_images += 1
                    try:
                        data = read_member(ref)
                    except InputError as e:
                        rows.append(Row(ref.member, "failed", str(e)))
                        continue
                    rows.append(_decoded(ref.member, data, ref.name))
        except ArchiveError as e:
            rows.append(Row(None, "failed", str(e)))
        else:
            # A break in an archive (a Rejected naming the archive itself) is the archive's one row.
            broken = any(r.ref.member is None for r in rejected)
            if kind != "file" and n_images == 0 and not broken:
                rows.append(Row(None, "skipped", f"archive {source!r} contains no images"))
        rows.extend(Row(r.ref.member, "skipped" if r.ref.member else "failed", r.reason) for r in rejected)
    return rows


def _sort_key(item: Row | Expect) -> tuple[str, str]:
    return (item.member or "", item.status)


def _check(case: Case, rows: list[Row]) -> None:
    got = sorted(rows, key=_sort_key)  # stable: duplicates keep archive order
    want = sorted(case.expected, key=_sort_key)
    got_keys = [(readable(r.member) if r.member else r.member, r.status) for r in got]
    assert got_keys == [(e.member, e.status) for e in want], case.description
    for row, expect in zip(got, want, strict=True):
        assert expect.reason.lower() in row.reason.lower(), (case.name, row)
        if expect.shape is not None:
            assert row.shape == expect.shape, (case.name, row)
        if expect.bit_depth is not None:
            assert row.bit_depth == expect.bit_depth, (case.name, row)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    cases = make_corpus(tmp_path_factory.mktemp("corpus"), seed=0)
    return {case.name: case for case in cases}


@pytest.fixture(scope="module")
def memory_corpus(corpus: dict[str, Case]) -> Iterator[dict[str, str]]:
    """The same files copied to memory://, as URLs by case name."""
    fs = fsspec.filesystem("memory")
    root = f"/bad-inputs-{uuid.uuid4().hex}"
    urls = {}
    for name, case in corpus.items():
        path = f"{root}/{case.path.name}"
        fs.pipe_file(path, case.path.read_bytes())
        urls[name] = f"memory://{path}"
    yield urls
    fs.rm(root, recursive=True)


def test_case_names_are_in_sync(corpus: dict[str, Case]) -> None:
    assert tuple(corpus) == CASE_NAMES
    assert len(CASE_NAMES) >= 25


def test_corpus_is_deterministic(tmp_path: Path) -> None:
    first = make_corpus(tmp_path / "a", seed=3)
    second = make_corpus(tmp_path / "b", seed=3)
    assert [c.path.read_bytes() for c in first] == [c.path.read_bytes() for c in second]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_local_outcome(name: str, corpus: dict[str, Case]) -> None:
    case = corpus[name]
    _check(case, run_input(str(case.path)))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_memory_outcome(name: str, corpus: dict[str, Case], memory_corpus: dict[str, str]) -> None:
    _check(corpus[name], run_input(memory_corpus[name]))


def test_failure_messages_name_the_input(corpus: dict[str, Case]) -> None:
    for case in corpus.values():
        for row in run_input(str(case.path)):
            if row.status == "failed":
                assert case.path.name in row.reason, row


def test_whole_folder_as_one_prefix(corpus: dict[str, Case]) -> None:
    folder = next(iter(corpus.values())).path.parent
    found, unconverted = expand([str(folder)])
    # Every file is accounted for: converted, or a row saying why not.
    listed = sorted([url for url, _ in found] + [r.ref.source for r in unconverted])
    assert listed == sorted(str(case.path) for case in corpus.values())
    assert [r.ref.source for r in unconverted] == [str(corpus["avif_file"].path)]
    assert "unsupported image format (.avif)" in unconverted[0].reason


def test_outcome_table_lists_every_case(corpus: dict[str, Case]) -> None:
    table = outcome_table(list(corpus.values()))
    assert all(f"| {name} |" in table for name in CASE_NAMES)

"""Scheduled reruns at archive scale: decide from listings and the catalog what is new or changed.

A rerun must not read an archive it has converted before. The plan, in order of cost:

1. :func:`stat_sources`: the change token (size + ETag/mtime) of every input file and archive, from one
   listing per folder (not one request per file);
2. :func:`plan_archive`: an archive whose token, job fingerprint and image count match its catalog rows is
   skipped whole, without listing it;
3. :func:`plan_refs`: members of the other archives (tar/zip headers: size + mtime / CRC-32) and loose files
   are matched by identity (:attr:`pipeline.sources.ImageRef.key`) against the catalog; only those new or
   changed are read and hashed;
4. :class:`ChunkCounts`: every skip is checked cheaply: the chunk objects (shards in the sharded layout)
   listed under the cube (one recursive listing of the store) must number what the completion marker recorded; a cube with fewer is
   marked incomplete (:func:`invalidate`) and redone.

Then :func:`catalog_updates` turns the run's outcomes into catalog rows (:mod:`pipeline.catalog`).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import zarr

from pipeline import cubes, qa, storage
from pipeline.catalog import CatalogRow, qa_json
from pipeline.config import OutputSpec, TilingSpec
from pipeline.manifest import ManifestRow
from pipeline.sources import ImageRef, normalize_url, version_of

__all__ = [
    "UNCHANGED",
    "ChunkCounts",
    "Plan",
    "catalog_updates",
    "expected_chunks",
    "invalidate",
    "plan_archive",
    "plan_refs",
    "stat_sources",
    "unchanged_row",
    "Planner",
    "RunFacts",
]

log = logging.getLogger(__name__)

UNCHANGED = "Unchanged"
"""``error_type`` of the manifest row of an input skipped without reading."""


def expected_chunks(height: int, width: int, spec: OutputSpec, tiling: TilingSpec | None = None) -> int:
    """Stored objects of a complete cube: one per ``chunk × chunk`` cell (a chunk holds every band), or in
    the sharded layout one per shard (:func:`pipeline.cubes.stored_objects`; ``tiling``: the job's)."""
    return cubes.stored_objects(height, width, spec, tiling or TilingSpec())


def stat_sources(urls: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """``url → change token`` (:func:`pipeline.sources.version_of`) from one fresh listing per parent folder."""
    by_parent: dict[tuple[int, str], list[tuple[str, Any, str]]] = collections.defaultdict(list)
    for url in urls:
        fs, path = storage.open_fs(url, storage_options)
        by_parent[(id(fs), fs._parent(path))].append((url, fs, path))
    out: dict[str, str | None] = {}
    for (_, parent), entries in by_parent.items():
        fs = entries[0][1]
        try:
            listing = {fs._strip_protocol(i["name"]): i for i in fs.ls(parent, detail=True, refresh=True)}
        except (FileNotFoundError, TypeError):
            listing = {}
        for url, _, path in entries:
            info = listing.get(fs._strip_protocol(path))
            if info is None:
                try:
                    info = fs.info(path)
                except FileNotFoundError:
                    out[url] = None
                    continue
            out[url] = version_of(info)
    return out


def by_source(catalog: Mapping[str, CatalogRow]) -> dict[str, list[CatalogRow]]:
    out: dict[str, list[CatalogRow]] = collections.defaultdict(list)
    for row in catalog.values():
        out[row.source].append(row)
    return out


def plan_archive(
    url: str, version: str | None, rows_of_source: Sequence[CatalogRow], fingerprint: str
) -> list[CatalogRow] | None:
    """The catalog rows that stand for the whole archive when it is unchanged (same token, same fingerprint,
    as many cubes as it had images), else ``None`` (list it and plan its members)."""
    if version is None or not rows_of_source:
        return None
    for r in rows_of_source:
        if r.archive_version != version or r.fingerprint != fingerprint or r.archive_images != len(rows_of_source):
            return None
    return list(rows_of_source)


@dataclasses.dataclass
class Plan:
    """``todo``: refs to read and convert; ``unchanged``: catalog rows skipped without reading."""

    todo: list[ImageRef] = dataclasses.field(default_factory=list)
    unchanged: list[CatalogRow] = dataclasses.field(default_factory=list)


def plan_refs(refs: Iterable[ImageRef], catalog: Mapping[str, CatalogRow], fingerprint: str) -> Plan:
    """Split listed refs into unchanged (identity, change token and fingerprint match the catalog) and to do.
    Refs with the same identity (one file spelt two ways) are kept once."""
    plan, seen = Plan(), set()
    for ref in refs:
        if ref.key in seen:
            continue
        seen.add(ref.key)
        row = catalog.get(ref.key)
        if (
            row is not None
            and ref.version is not None
            and row.source_version == ref.version
            and row.fingerprint == fingerprint
        ):
            plan.unchanged.append(row)
            continue
        plan.todo.append(ref)
    return plan


class ChunkCounts:
    """Chunk objects (chunks, or shards in the sharded layout: both are keys under ``cube/c/``) per group under
    ``<output>/cubes.zarr``, from one recursive listing made on first use."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.root = storage.join(output, cubes.CUBES_DIR)
        self.storage_options = storage_options
        self._counts: dict[str, int] | None = None

    def counts(self) -> dict[str, int]:
        if self._counts is None:
            fs, root = storage.open_fs(self.root, self.storage_options)
            root = fs._strip_protocol(root).rstrip("/")
            counts: dict[str, int] = collections.Counter()
            try:
                paths = fs.find(root, refresh=True) if hasattr(fs, "invalidate_cache") else fs.find(root)
            except FileNotFoundError:
                paths = []
            for p in paths:
                rel = fs._strip_protocol(p)[len(root) + 1 :]
                group, sep, _ = rel.partition("/cube/c/")
                if sep:
                    counts[group] += 1
            self._counts = dict(counts)
        return self._counts

    def intact(self, row: CatalogRow) -> bool:
        """The cube has at least the chunk objects its marker recorded (unknown count: trusted)."""
        return row.chunks is None or self.counts().get(row.group, 0) >= row.chunks


def invalidate(output: str, groups: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> None:
    """Mark groups incomplete, so the prepare step recreates them instead of trusting their marker."""
    store = cubes.open_cubes(output, storage_options)
    for group in groups:
        try:
            zarr.open_group(store, path=group, mode="r+").attrs.update({"complete": 0})
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
            continue  # gone entirely: the prepare step creates it


def unchanged_row(row: CatalogRow, run_id: str) -> ManifestRow:
    """The manifest row of an input skipped without reading."""
    return ManifestRow(
        input=storage.redact(row.input),
        source=storage.redact(row.source),
        member=row.member,
        status="skipped",
        error_type=UNCHANGED,
        error=f"unchanged since run {row.run_id} ({row.source_version}); cube verified by its chunk count",
        group=row.group,
        source_sha256=row.source_sha256,
        source_bytes=row.source_bytes,
        width=row.shape[2] if len(row.shape) == 3 else None,
        height=row.shape[1] if len(row.shape) == 3 else None,
        run_id=run_id,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunFacts:
    """What every catalog row of one run shares."""

    output: str
    run_id: str
    fingerprint: str
    weights_sha256: str
    package_version: str
    bands: int
    output_spec: OutputSpec
    when: _dt.datetime
    tiling: TilingSpec = dataclasses.field(default_factory=TilingSpec)


def catalog_updates(
    facts: RunFacts,
    previous: Mapping[str, CatalogRow],
    rows: Iterable[ManifestRow],
    refs: Mapping[str, ImageRef],
    unchanged: Iterable[CatalogRow],
    archive_versions: Mapping[str, str | None],
) -> list[CatalogRow]:
    """Catalog rows for this run: a new row per converted cube, a refreshed one per cube found unchanged
    (skipped without reading, or read and found to have the same sha256). Archive rows carry the archive's
    token and image count, so the next run can skip the whole archive without listing it."""
    rows, unchanged = list(rows), list(unchanged)
    images: collections.Counter[str] = collections.Counter(
        normalize_url(refs[r.input].source)
        for r in rows
        if r.input in refs and r.member is not None and r.error_type not in ("RejectedMember", UNCHANGED)
    )
    images.update(u.source for u in unchanged if u.member is not None)
    versions = {normalize_url(u): v for u, v in archive_versions.items()}
    out = [
        u.seen(facts.run_id, facts.when, archive_version=versions.get(u.source), archive_images=images[u.source])
        if u.member is not None
        else u.seen(facts.run_id, facts.when)
        for u in unchanged
    ]
    for row in rows:
        ref = refs.get(row.input)
        done = row.status == "ok" or (row.status == "skipped" and row.error_type is None)
        if ref is None or not done or row.group is None or row.width is None or row.height is None:
            continue
        source = normalize_url(ref.source)
        member: dict[str, Any] = {
            "source_version": ref.version,
            "source_bytes": row.source_bytes if row.source_bytes is not None else ref.size,
            "archive_version": versions.get(source) if ref.member is not None else None,
            "archive_images": images[source] if ref.member is not None else None,
            "tar_offset": ref.offset,
        }
        prior = previous.get(ref.key)
        if row.status == "skipped" and prior is not None and prior.source_sha256 == row.source_sha256:
            out.append(prior.seen(facts.run_id, facts.when, **member))
        else:
            out.append(_new_row(facts, row, ref, prior if row.status == "skipped" else None, member))
    return out


def _new_row(
    facts: RunFacts, row: ManifestRow, ref: ImageRef, prior: CatalogRow | None, member: Mapping[str, Any]
) -> CatalogRow:
    """The catalog row of a cube completed by this run (or, ``prior`` given, by the run it names)."""
    assert row.group is not None and row.height is not None and row.width is not None
    return CatalogRow(
        input=ref.key,
        cube_url=_absolute(storage.join(facts.output, cubes.CUBES_DIR, row.group)),
        group=row.group,
        source=normalize_url(ref.source),
        member=ref.member,
        occurrence=ref.occurrence,
        source_sha256=row.source_sha256,
        weights_sha256=facts.weights_sha256,
        fingerprint=facts.fingerprint,
        package_version=facts.package_version,
        shape=(facts.bands, row.height, row.width),
        dtype=facts.output_spec.dtype,
        chunks=expected_chunks(row.height, row.width, facts.output_spec, facts.tiling),
        run_id=prior.run_id if prior else facts.run_id,
        completed=prior.completed if prior else facts.when,
        qa=_qa_of(row, prior),
        last_seen_run=facts.run_id,
        last_seen=facts.when,
        **member,
    )


def _qa_of(row: ManifestRow, prior: CatalogRow | None) -> str | None:
    """The catalog's ``qa`` of a cube: this run's ``qa_*`` columns, or the earlier run's for a cube found
    complete (its manifest row has none)."""
    if row.status == "ok":
        return qa_json({col: getattr(row, col) for col in qa.MANIFEST_FIELDS})
    return prior.qa if prior is not None else None


def _absolute(url: str) -> str:
    """Cube URLs in the catalog are absolute: ``file:///…`` for local outputs, the URL otherwise."""
    return normalize_url(url)


class Planner:
    """One run's plan against the catalog (see the module doc); ``unchanged`` collects the skipped rows.

    Args:
        output: the job's output URL.
        catalog: the catalog as read at the start of the run (:func:`pipeline.catalog.read_catalog`).
        fingerprint: the job's fingerprint; rows made with another one are redone.
    """

    def __init__(
        self,
        output: str,
        catalog: Mapping[str, CatalogRow],
        fingerprint: str,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.output, self.catalog, self.fingerprint = output, catalog, fingerprint
        self.storage_options = storage_options
        self.chunks = ChunkCounts(output, storage_options)
        self.versions: dict[str, str | None] = {}
        self.unchanged: list[CatalogRow] = []
        self.broken: list[CatalogRow] = []
        self._sources = by_source(catalog)

    def inputs(self, inputs: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """The expanded inputs still to look into: archives unchanged and intact since the catalog was
        written are dropped (their rows go to ``unchanged``); everything else is returned."""
        self.versions.update(stat_sources([u for u, _ in inputs], self.storage_options))
        out = []
        for url, kind in inputs:
            rows = None
            if kind != "file" and self.catalog:
                rows = plan_archive(
                    url, self.versions.get(url), self._sources.get(normalize_url(url), []), self.fingerprint
                )
            if rows is not None and all(self.chunks.intact(r) for r in rows):
                self.unchanged.extend(rows)
                continue
            out.append((url, kind))
        return out

    def file_ref(self, url: str) -> ImageRef:
        """A loose file's ref, with the change token from :meth:`inputs`' listing."""
        return ImageRef(source=url, member=None, kind="file", version=self.versions.get(url))

    def refs(self, refs: Iterable[ImageRef]) -> list[ImageRef]:
        """The refs to read and convert; unchanged ones with intact cubes go to ``unchanged``, unchanged ones
        whose cubes lost chunks are marked incomplete (so the prepare step recreates them) and returned."""
        refs = list(refs)
        plan = plan_refs(refs, self.catalog, self.fingerprint) if self.catalog else Plan(todo=list(refs))
        broken = [r for r in plan.unchanged if not self.chunks.intact(r)]
        if broken:
            log.warning("%d complete cube(s) have missing chunks and are redone", len(broken))
            invalidate(self.output, [r.group for r in broken], self.storage_options)
            self.broken.extend(broken)
            by_key = {ref.key: ref for ref in refs}
            plan.todo.extend(by_key[r.input] for r in broken)
        self.unchanged.extend(r for r in plan.unchanged if self.chunks.intact(r))
        return plan.todo

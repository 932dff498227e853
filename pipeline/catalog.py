"""The catalog: every cube ever completed under an output, one row each, accumulating across runs.

``<output>/catalog/catalog.parquet`` is plain Parquet (``pandas.read_parquet``, ``pyarrow.parquet.read_table``,
DuckDB ``SELECT * FROM '<output>/catalog/catalog.parquet'``). Rows are keyed by ``input`` (the normalised
identity of :attr:`pipeline.sources.ImageRef.key`); a run replaces the rows of the inputs it redid and keeps
all others, so cubes made by earlier runs never drop out (the per-run manifest stays under ``manifest/``).

The catalog is what a scheduled rerun plans against (:mod:`pipeline.incremental`): an input whose listing
``source_version`` (size + ETag/mtime, or the tar/zip header) and job ``fingerprint`` match its row is
skipped without being read. It is rewritten whole through :func:`pipeline.storage.write_bytes` (temp file +
rename locally, one PUT on object stores), so a writer killed mid-write leaves the previous file readable.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

__all__ = [
    "CATALOG_PATH",
    "CatalogRow",
    "SCHEMA",
    "catalog_url",
    "read_catalog",
    "write_catalog",
    "merge",
    "qa_json",
    "cube_records",
]

CATALOG_PATH = "catalog/catalog.parquet"

_TS = pa.timestamp("ms", tz="UTC")

SCHEMA = pa.schema(
    [
        ("input", pa.string()),
        ("cube_url", pa.string()),
        ("group", pa.string()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("occurrence", pa.int64()),
        ("source_bytes", pa.int64()),
        ("source_version", pa.string()),
        ("archive_version", pa.string()),
        ("archive_images", pa.int64()),
        ("tar_offset", pa.int64()),
        ("source_sha256", pa.string()),
        ("weights_sha256", pa.string()),
        ("fingerprint", pa.string()),
        ("package_version", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("dtype", pa.string()),
        ("chunks", pa.int64()),
        ("run_id", pa.string()),
        ("completed", _TS),
        ("last_seen_run", pa.string()),
        ("last_seen", _TS),
        ("qa", pa.string()),
    ]
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CatalogRow:
    """One completed cube.

    ``input``: identity (normalised source URL, ``!member``, ``#n`` for repeats); ``source``: the normalised
    URL of the file or archive; ``source_bytes``/``source_version``: the image's size and change token from
    the listing; ``archive_version``/``archive_images``: the whole archive's token and image count when the
    row was made (a rerun skips an unchanged archive without listing it); ``tar_offset``: where the member's
    data starts; ``shape`` = (bands, height, width); ``chunks``: chunk objects counted at completion (a
    rerun redoes the cube when fewer are listed); ``run_id``/``completed``: the run that made the cube;
    ``last_seen_run``/``last_seen``: the latest run that found it unchanged; ``qa``: JSON of the QA figures
    of the outputs, when present.
    """

    input: str
    cube_url: str
    group: str
    source: str
    member: str | None = None
    occurrence: int = 0
    source_bytes: int | None = None
    source_version: str | None = None
    archive_version: str | None = None
    archive_images: int | None = None
    tar_offset: int | None = None
    source_sha256: str | None = None
    weights_sha256: str | None = None
    fingerprint: str | None = None
    package_version: str | None = None
    shape: tuple[int, ...] = ()
    dtype: str | None = None
    chunks: int | None = None
    run_id: str = ""
    completed: _dt.datetime | None = None
    last_seen_run: str = ""
    last_seen: _dt.datetime | None = None
    qa: str | None = None

    def seen(self, run_id: str, when: _dt.datetime, **changes: Any) -> CatalogRow:
        """This row as confirmed (unchanged, or changes applied) by ``run_id`` at ``when``."""
        return dataclasses.replace(self, last_seen_run=run_id, last_seen=when, **changes)


def catalog_url(output: str) -> str:
    return storage.join(output, CATALOG_PATH)


def merge(previous: Mapping[str, CatalogRow], updates: Iterable[CatalogRow]) -> dict[str, CatalogRow]:
    """``previous`` with each update replacing the row of the same ``input``; rows not updated are kept."""
    out = dict(previous)
    for row in updates:
        out[row.input] = row
    return out


def _table(rows: Iterable[CatalogRow]) -> pa.Table:
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for row in sorted(rows, key=lambda r: r.input):
        for name in cols:
            value = getattr(row, name)
            cols[name].append(list(value) if name == "shape" else value)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def write_catalog(
    output: str, rows: Mapping[str, CatalogRow] | Iterable[CatalogRow], storage_options: Mapping[str, Any] | None = None
) -> str:
    """Write the whole catalog (sorted by input) in one atomic replace; returns its URL."""
    values = rows.values() if isinstance(rows, Mapping) else rows
    buf = io.BytesIO()
    pq.write_table(_table(values), buf)
    url = catalog_url(output)
    fs, path = storage.open_fs(url, storage_options)
    storage.write_bytes(fs, path, buf.getvalue())
    return url


def read_catalog(output: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, CatalogRow]:
    """The catalog's rows by ``input``; empty when the output has none yet."""
    fs, path = storage.open_fs(catalog_url(output), storage_options)
    try:
        data = storage.read_bytes(fs, path)
    except FileNotFoundError:
        return {}
    table = pq.read_table(io.BytesIO(data))
    names = {f.name for f in dataclasses.fields(CatalogRow)}
    rows: dict[str, CatalogRow] = {}
    for rec in table.to_pylist():
        kw = {k: v for k, v in rec.items() if k in names}
        kw["shape"] = tuple(kw.get("shape") or ())
        row = CatalogRow(**kw)
        rows[row.input] = row
    return rows


def qa_json(figures: Mapping[str, Any] | None) -> str | None:
    """QA figures (the manifest's ``qa_*`` columns, when a cube has them) as the catalog's ``qa`` JSON text."""
    return json.dumps(dict(figures), sort_keys=True, default=str) if figures else None


def cube_records(output: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every cube of the output, whichever run made it, as records with the manifest's columns (what
    STAC, export and the report describe): ``input``, ``source``, ``member``, ``group``, ``source_sha256``,
    ``source_bytes``, ``width``, ``height``, ``run_id`` (the run that made the cube), ``status = "ok"``, the
    ``qa_*`` columns, plus ``cube_url`` and ``completed``. Sorted by input.

    QA comes from the row's ``qa``; rows written before the catalog recorded it take it from the cube's
    provenance (one metadata read each)."""
    from pipeline import cubes, qa  # cubes → preview → …: only needed here

    rows = sorted(read_catalog(output, storage_options).values(), key=lambda r: r.input)
    store = None
    out = []
    for row in rows:
        figures: dict[str, Any] | None = json.loads(row.qa) if row.qa else None
        if figures is None:
            store = store or cubes.open_cubes(output, storage_options, read_only=True)
            record = (cubes.read_status(store, row.group) or {}).get(cubes.ATTR) or {}
            figures = qa.manifest_columns(record.get("qa") or {})
        out.append(
            {
                "input": storage.redact(row.input),
                "source": storage.redact(row.source),
                "member": row.member,
                "status": "ok",
                "group": row.group,
                "source_sha256": row.source_sha256,
                "source_bytes": row.source_bytes,
                "height": row.shape[1] if len(row.shape) == 3 else None,
                "width": row.shape[2] if len(row.shape) == 3 else None,
                "run_id": row.run_id,
                "cube_url": storage.redact(row.cube_url),
                "completed": row.completed,
            }
            | {col: figures.get(col) for col in qa.MANIFEST_FIELDS}
        )
    return out

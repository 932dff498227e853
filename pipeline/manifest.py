"""The Parquet manifest: one row per input with its outcome, under ``<output>/manifest/``.

``manifest/manifest.parquet`` is the latest run's full account (every input of the run exactly once:
``ok``, ``failed`` or ``skipped``); ``manifest/runs/<run_id>.parquet`` keeps each run's copy. Every cube
ever completed, whichever run made it, is in the catalog (:mod:`pipeline.catalog`).
Readable with ``pyarrow.parquet.read_table`` or ``pandas.read_parquet``.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import open_fs, readable, write_bytes

__all__ = ["ManifestRow", "SCHEMA", "write_manifest", "read_manifest", "STATUSES"]

STATUSES = ("ok", "failed", "skipped")

SCHEMA = pa.schema(
    [
        ("input", pa.string()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("status", pa.string()),
        ("error_type", pa.string()),
        ("error", pa.string()),
        ("group", pa.string()),
        ("source_sha256", pa.string()),
        ("source_bytes", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("tiles", pa.int64()),
        ("decode_s", pa.float64()),
        ("infer_s", pa.float64()),
        ("total_s", pa.float64()),
        ("run_id", pa.string()),
        # QA of the cube (pipeline.qa; README "Outputs"): null where no cube was made.
        ("qa_backprojection_mrae", pa.float64()),
        ("qa_backprojection_rmse", pa.float64()),
        ("qa_nonfinite_fraction", pa.float64()),
        ("qa_negative_fraction", pa.float64()),
        ("qa_above_one_fraction", pa.float64()),
        ("qa_flags", pa.string()),
    ]
)


@dataclasses.dataclass(kw_only=True)
class ManifestRow:
    """One input's outcome. ``input`` is the unique id (``source!member#index`` for archive members)."""

    input: str
    source: str
    member: str | None = None
    status: str = "failed"
    error_type: str | None = None
    error: str | None = None
    group: str | None = None
    source_sha256: str | None = None
    source_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    tiles: int | None = None
    decode_s: float | None = None
    infer_s: float | None = None
    total_s: float | None = None
    run_id: str = ""
    qa_backprojection_mrae: float | None = None
    qa_backprojection_rmse: float | None = None
    qa_nonfinite_fraction: float | None = None
    qa_negative_fraction: float | None = None
    qa_above_one_fraction: float | None = None
    qa_flags: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"manifest status must be one of {STATUSES}, got {self.status!r}")


def _table(rows: Sequence[ManifestRow]) -> pa.Table:
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for row in sorted(rows, key=lambda r: r.input):
        for name in cols:
            value = getattr(row, name)
            # Names that were not UTF-8 (surrogate escapes) cannot go into Parquet strings: record them readable.
            cols[name].append(readable(value) if isinstance(value, str) else value)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def write_manifest(
    output: str, rows: Sequence[ManifestRow], run_id: str, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Write the run's manifest (sorted by input) and its history copy; returns the manifest URL."""
    fs, path = open_fs(output, storage_options)
    buf = io.BytesIO()
    pq.write_table(_table(rows), buf)
    data = buf.getvalue()
    base = path.rstrip("/") + "/manifest"
    fs.makedirs(base + "/runs", exist_ok=True)
    # Whole-object replaces (temp + rename locally, one PUT on S3): a writer killed mid-write leaves the
    # previous manifest readable.
    write_bytes(fs, f"{base}/runs/{run_id}.parquet", data)
    write_bytes(fs, f"{base}/manifest.parquet", data)
    return f"{output.rstrip('/')}/manifest/manifest.parquet"


def read_manifest(output: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """The latest run's manifest as a pyarrow Table."""
    fs, path = open_fs(output, storage_options)
    with fs.open(path.rstrip("/") + "/manifest/manifest.parquet", "rb") as f:
        return pq.read_table(f)

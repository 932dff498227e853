"""What a run leaves for people and downstream tools once its cubes are written: consolidated metadata
per archive group, the STAC catalog (:mod:`pipeline.stac`) and the HTML report (:mod:`pipeline.report`).

:func:`publish_run` is called once at the end of every run, and by ``drcr-pipeline report OUTPUT``; it
reads only the manifest, the catalog and the cubes' metadata and previews, never a whole cube. STAC and the
report describe every cube of the catalog (all runs'), the report also the latest run's failures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pipeline import cubes, report, stac
from pipeline.manifest import read_manifest

__all__ = ["publish_run"]

log = logging.getLogger(__name__)


def publish_run(output: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Consolidate the archive groups of the latest run's ``ok`` cubes (those it changed), write STAC and the
    report; returns what was written (``consolidated``: archive groups, ``stac``: the Collection's URL, ``report``: the report's URL)."""
    rows = read_manifest(output, storage_options).to_pylist()
    ok = [r["group"] for r in rows if r["status"] == "ok" and r["group"]]
    store = cubes.open_cubes(output, storage_options)
    archives = cubes.consolidate_archives(store, ok)
    log.info("consolidated %d archive groups under %s", len(archives), output)
    collection = stac.write_catalog(output, storage_options)
    url = report.write_report(output, storage_options)
    return {"consolidated": archives, "stac": collection, "report": url}

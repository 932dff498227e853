"""A STAC catalog of an output: one Collection, one Item per cube, written with pystac.

The cubes are the output's catalog (:func:`pipeline.catalog.cube_records`): every cube completed by any run,
so a rerun that found everything unchanged still describes them all; a cube whose group is no longer
complete (being redone) is left out.

``<output>/stac/collection.json`` links ``<output>/stac/<id>/<id>.json`` (pystac's layout; relative links: the catalog can be
copied or served as is). Each Item carries the datacube extension (dimensions ``wavelength`` — type
``spectral``, the band centres in nm as its values — ``y`` and ``x`` in pixels, variable ``cube``), the
cube's QA (``drcr:qa_*``), its source and size, and assets: the zarr group (``data``), the preview
thumbnail (``thumbnail``) and the input thumbnail (``overview``). Photos are not georeferenced: Items have
no geometry; the Collection's spatial extent is the whole globe, as STAC requires one.

Validation (:func:`validate`): the core Item and Collection JSON schemas ship with pystac and are checked
offline; the datacube fields are read back through pystac's extension API (its JSON schema ships in no
package, and jobs run without network).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pystac
from pystac.extensions.datacube import AdditionalDimension, DatacubeExtension, Variable

from pipeline import cubes, preview, qa, storage
from pipeline.catalog import cube_records

__all__ = ["STAC_DIR", "item_id", "make_item", "make_collection", "write_catalog", "validate"]

STAC_DIR = "stac"
ZARR_MEDIA_TYPE = "application/vnd.zarr; version=3"


def item_id(group: str) -> str:
    """A file-name-safe Item id from a group path (``/`` → ``__``; groups are already ``[A-Za-z0-9._-]``),
    cut like a group component (:func:`pipeline.cubes.sanitize_component`: at most ``MAX_COMPONENT`` bytes,
    ended with a digest of the whole path) so the Item's file name fits every file system."""
    return cubes.sanitize_component(re.sub(r"[^A-Za-z0-9._-]", "_", group.replace("/", "__")))


def _when(record: Mapping[str, Any]) -> _dt.datetime:
    text = record.get("finished") or record.get("started") or "1970-01-01T00:00:00+00:00"
    return _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))


def make_item(output: str, row: Mapping[str, Any], record: Mapping[str, Any]) -> pystac.Item:
    """The Item of one cube (a :func:`pipeline.catalog.cube_records` record) and its provenance record."""
    group = row["group"]
    bands = [float(b) for b in record.get("output", {}).get("bands_nm", [])]
    props: dict[str, Any] = {
        "title": row["input"],
        "drcr:source": row["input"],
        "drcr:source_sha256": row["source_sha256"],
        "drcr:width": row["width"],
        "drcr:height": row["height"],
        "drcr:weights": record.get("model", {}).get("weights", {}).get("name"),
        "drcr:run_id": row["run_id"],
    }
    for col in qa.MANIFEST_FIELDS:
        props[f"drcr:{col}"] = row.get(col)
    item = pystac.Item(id=item_id(group), geometry=None, bbox=None, datetime=_when(record), properties=props)
    item.add_asset(
        "cube",
        pystac.Asset(
            href=storage.join(output, cubes.CUBES_DIR, group),
            media_type=ZARR_MEDIA_TYPE,
            roles=["data"],
            title="31-band cube (zarr v3 group; xarray.open_zarr(store, group=...))",
        ),
    )
    rendering, source = preview.thumbnail_paths(output, group)
    item.add_asset("thumbnail", pystac.Asset(href=rendering, media_type=pystac.MediaType.PNG, roles=["thumbnail"]))
    item.add_asset("input", pystac.Asset(href=source, media_type=pystac.MediaType.PNG, roles=["overview"]))
    dc = DatacubeExtension.ext(item, add_if_missing=True)
    dc.apply(
        dimensions={
            "wavelength": AdditionalDimension(
                {"type": "spectral", "values": bands, "unit": "nm", "description": "band centre wavelength"}
            ),
            "y": AdditionalDimension({"type": "pixel", "extent": [0, row["height"] - 1], "step": 1}),
            "x": AdditionalDimension({"type": "pixel", "extent": [0, row["width"] - 1], "step": 1}),
        },
        variables={
            "cube": Variable(
                {
                    "dimensions": ["wavelength", "y", "x"],
                    "type": "data",
                    "unit": "1",
                    "description": cubes.CUBE_ATTRS["long_name"],
                }
            )
        },
    )
    return item


def make_collection(output: str, items: Sequence[pystac.Item]) -> pystac.Collection:
    """The Collection of an output's Items (temporal extent: their datetimes)."""
    times = sorted(i.datetime for i in items if i.datetime is not None) or [_dt.datetime.now(_dt.UTC)]
    collection = pystac.Collection(
        id=item_id(output.rstrip("/").rsplit("/", 1)[-1] or "drcr-output"),
        title=f"drcr-pipeline cubes: {storage.redact(output)}",
        description="31-band (400-700 nm) hyperspectral cubes reconstructed from RGB photographs with DRCR Net. "
        "Not georeferenced: items have no geometry.",
        extent=pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]), pystac.TemporalExtent([[times[0], times[-1]]])
        ),
        license="other",
    )
    collection.add_items(items)
    return collection


def write_catalog(output: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write the Collection and Items of every complete cube of the output; returns the Collection's URL."""
    store = cubes.open_cubes(output, storage_options, read_only=True)
    base = output if "://" in output else os.path.abspath(output)  # hrefs made relative need a common root
    items = []
    for r in cube_records(output, storage_options):
        status = cubes.read_status(store, r["group"]) or {}
        if status.get("complete"):
            items.append(make_item(base, r, status.get(cubes.ATTR, {})))
    collection = make_collection(output, items)
    root = storage.join(base, STAC_DIR)
    collection.normalize_hrefs(root)
    collection.make_all_asset_hrefs_relative()
    fs, _ = storage.open_fs(root, storage_options)
    for obj in [collection, *items]:
        href = obj.get_self_href()
        assert href is not None  # set by normalize_hrefs
        d = obj.to_dict(include_self_link=False, transform_hrefs=True)
        _, path = storage.open_fs(href, storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, json.dumps(d, indent=1).encode("utf-8"))
    return storage.join(output, STAC_DIR, "collection.json")


def validate(obj: pystac.STACObject | Mapping[str, Any]) -> None:
    """Validate against the core STAC JSON schema that ships with pystac (offline); raises
    ``pystac.errors.STACValidationError``."""
    from pystac.validation import JsonSchemaSTACValidator

    d = obj.to_dict(include_self_link=False) if isinstance(obj, pystac.STACObject) else dict(obj)
    kind = pystac.STACObjectType.ITEM if d.get("type") == "Feature" else pystac.STACObjectType.COLLECTION
    JsonSchemaSTACValidator().validate_core(d, kind, d["stac_version"])

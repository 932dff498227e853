"""A small finished output made without Ray, for the report, STAC and export tests: the same work functions
the Ray job runs (prepare_image → Predictor.run per batch → finish_image), a manifest and the root group's run
summary and the catalog, with the seeded untrained demo weights. Three images (one tiled), one undecodable
file."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from drcr_model.weights import untrained_demo_weights
from pipeline import cubes
from pipeline.catalog import write_catalog
from pipeline.config import JobSpec
from pipeline.incremental import RunFacts, catalog_updates
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.sources import ImageRef
from pipeline.work import ImageMeta, JobContext, Predictor, finish_image, prepare_image

SIZES = {"a.png": (48, 64), "b.png": (40, 40), "c.png": (72, 80)}  # c is tiled (above max_tile_pixels)


def make_output(tmp: Path) -> str:
    """Write the inputs and run them; returns the output folder."""
    rng = np.random.default_rng(0)
    inputs = tmp / "in"
    inputs.mkdir()
    for name, (h, w) in SIZES.items():
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([yy * 255 // h, xx * 255 // w, np.full_like(yy, 90)], axis=-1) + rng.integers(0, 20, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(inputs / name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    output = str(tmp / "out")
    spec = JobSpec.from_dict(
        {
            "inputs": [str(inputs)],
            "output": output,
            "tiling": {"max_tile_pixels": 4096, "tile_core": 32, "halo": 8},
            "output_options": {"chunk": 16},
        }
    )
    w = untrained_demo_weights(tmp / "weights")
    ctx = JobContext(spec=spec, weights=w.to_record(), fingerprint="fp", run_id="run-test")
    predictor = Predictor(ctx, device="cpu")
    rows, refs = [], {}
    for name in [*SIZES, "broken.png"]:
        ref = ImageRef(source=str(inputs / name), member=None, kind="file")
        refs[ref.key] = ref
        items = list(prepare_image(ctx, ref))
        meta = items[0]
        assert isinstance(meta, ImageMeta)
        row = ManifestRow(
            input=ref.key,
            source=ref.source,
            group=meta.group,
            run_id=ctx.run_id,
            width=meta.width,
            height=meta.height,
            source_sha256=meta.sha256,
        )
        if meta.status == "failed":
            row.status, row.error_type, row.error, row.group = "failed", meta.error_type, meta.error, None
        else:
            windows = [np.asarray(x) for x in items[1:]]
            results = [
                predictor.run(meta.group, meta.scale, meta.tiles[i : i + 4], windows[i : i + 4])
                for i in range(0, len(windows), 4)
            ]
            for k, v in finish_image(ctx, meta, results).items():
                setattr(row, k, v)
            row.status, row.tiles = "ok", len(meta.tiles)
        rows.append(row)
    write_manifest(output, rows, ctx.run_id)
    facts = RunFacts(
        output=output,
        run_id=ctx.run_id,
        fingerprint=ctx.fingerprint,
        weights_sha256=str(ctx.weights["sha256"]),
        package_version="test",
        bands=len(ctx.bands_nm),
        output_spec=spec.output_options,
        tiling=spec.tiling,
        when=datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC),
    )
    write_catalog(output, catalog_updates(facts, {}, rows, refs, [], {}))
    root = zarr.open_group(cubes.open_cubes(output), mode="a")
    root.attrs.update(
        {
            "drcr_pipeline_run": {
                "run_id": ctx.run_id,
                "finished": "2026-12-01T00:00:00Z",
                "status": "finished",
                "summary": {"elapsed_s": 3.0, "megapixels": 0.011, "megapixels_per_s": 0.0037, "nodes": ["n1"]},
            }
        }
    )
    return output

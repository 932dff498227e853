"""QA, previews, STAC and the report through the real pipeline (local Ray, the CLI in-process): every run
ends with report.html and a STAC Collection; a checkpoint with NaN weights fails every image (exit 2) and
marks no cube complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import cli, cubes

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _inputs(tmp: Path) -> Path:
    d = tmp / "in"
    d.mkdir()
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(40, 48), (72, 64)]):  # the second is tiled
        Image.fromarray(rng.integers(20, 230, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


def _run(tmp: Path, inputs: Path, *extra: str) -> tuple[int, str, Path]:
    out = tmp / "out"
    args = ["run", "--input", str(inputs), "--output", str(out), "--no-progress"]
    args += ["--set", "tiling.max_tile_pixels=4096", "--set", "tiling.tile_core=32", "--set", "output_options.chunk=16"]
    return cli.main([*args, *extra]), "", out


def test_run_writes_qa_previews_stac_and_report(ray_local, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, _, out = _run(tmp_path, _inputs(tmp_path))
    printed = capsys.readouterr().out
    assert rc == cli.EXIT_OK, printed
    assert f"report: {out}/report.html" in printed
    rows = pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    store = cubes.open_cubes(str(out))
    for r in rows:
        assert r["qa_backprojection_mrae"] is not None and r["qa_nonfinite_fraction"] == 0
        record = cubes.read_status(store, r["group"])[cubes.ATTR]  # type: ignore[index]
        assert record["qa"]["backprojection_mrae"] == r["qa_backprojection_mrae"]
        assert record["timings"]["qa_s"] > 0
        assert (out / "previews" / f"{r['group']}.png").read_bytes()[:4] == b"\x89PNG"
        level0 = cubes.zarr.open_array(store, path=f"{r['group']}/preview/0", mode="r")
        assert level0.shape == (3, r["height"], r["width"]) and np.asarray(level0[:]).any()
    assert (out / "report.html").stat().st_size > 1000
    collection = json.loads((out / "stac" / "collection.json").read_text())
    assert sum(link["rel"] == "item" for link in collection["links"]) == 2


def test_nan_weights_fail_every_image(ray_local, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from drcr_model.net import DRCRNet

    model = DRCRNet(in_channels=3, out_channels=31, channels=8, n_blocks=1)
    ckpt = tmp_path / "nan.pt"
    torch.save({k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}, ckpt)
    # float16 storage, so the NaN cubes reach QA (the error-bounded default refuses them at the write
    # already: tests/unit/test_qa.py::test_predictor_with_nan_weights_never_completes).
    rc, _, out = _run(tmp_path, _inputs(tmp_path), "--weights", str(ckpt), "--set", "output_options.max_error=0")
    printed = capsys.readouterr().out
    assert rc == cli.EXIT_INPUTS_FAILED, printed
    rows = pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["failed", "failed"]
    store = cubes.open_cubes(str(out))
    for r in rows:
        assert r["error_type"] == "QAError" and "not finite" in r["error"], r
        assert r["qa_nonfinite_fraction"] == 1.0
        status = cubes.read_status(store, r["group"]) if r["group"] else None
        assert status is None or status["complete"] is False
    assert "0 ok, 2 failed" in printed and (out / "report.html").exists()


def test_sharded_rerun_unchanged_still_publishes_every_cube_and_a_lost_shard_is_redone(  # type: ignore[no-untyped-def]
    ray_local, tmp_path: Path, capsys
) -> None:
    """``output_options.layout = "sharded"`` through the real pipeline: a shard per tile core; a second run
    finds everything unchanged (no ok row in its manifest), yet STAC, export and the report still describe both
    cubes (they read the catalog); a deleted shard is found by the shard count and that cube redone."""
    from pipeline import export, stac
    from pipeline.catalog import read_catalog

    inputs = _inputs(tmp_path)
    sharded = ("--set", "output_options.layout=sharded")
    assert _run(tmp_path, inputs, *sharded)[0] == cli.EXIT_OK
    out = tmp_path / "out"
    catalog = read_catalog(str(out))
    store = cubes.open_cubes(str(out))
    for row in catalog.values():
        objects = sorted(p for p in (out / "cubes.zarr" / row.group / "cube" / "c").rglob("*") if p.is_file())
        record = cubes.read_status(store, row.group)
        assert record["complete"] and record[cubes.ATTR]["output"]["layout"] == "sharded"  # type: ignore[index]
        assert len(objects) == row.chunks == record[cubes.ATTR]["chunks"]  # type: ignore[index]
    # the 40×48 image runs whole: one shard (3 × 3 chunks of 16²); the 72×64 one: 3 × 2 cores of 32²
    assert sorted(r.chunks for r in catalog.values()) == [1, 6]  # type: ignore[type-var]

    capsys.readouterr()
    assert _run(tmp_path, inputs, *sharded)[0] == cli.EXIT_OK
    rows = pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["skipped", "skipped"] and {r["error_type"] for r in rows} == {"Unchanged"}
    collection = json.loads((out / "stac" / "collection.json").read_text())
    assert sum(link["rel"] == "item" for link in collection["links"]) == 2
    assert stac.item_id(catalog[next(iter(catalog))].group) in json.dumps(collection["links"])
    assert len(export.select_rows(str(out), "qa_backprojection_mrae >= 0 and height > 10")) == 2
    files = export.export_cubes(str(out), "tiff", dest=str(tmp_path / "tiff"), where="width == 64")
    assert [Path(f).suffix for f in files] == [".tif"]
    html = (out / "report.html").read_text()
    assert '<b id="count-cubes">2</b>' in html and '<b id="count-ok">0</b>' in html and "(2 of 2)" in html

    tiled = next(r for r in catalog.values() if r.chunks == 6)
    (out / "cubes.zarr" / tiled.group / "cube" / "c" / "0" / "1" / "1").unlink()
    assert _run(tmp_path, inputs, *sharded)[0] == cli.EXIT_OK
    rows = pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok", "skipped"]
    assert next(r for r in rows if r["status"] == "ok")["group"] == tiled.group
    cube = cubes.zarr.open_array(store, path=f"{tiled.group}/cube", mode="r")[:]
    assert np.isfinite(cube).all()  # the lost shard is back

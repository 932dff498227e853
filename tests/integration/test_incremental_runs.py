"""Scheduled reruns against the real S3 server and a real local Ray (issue 12).

One archive of 220 images (a tar of 120 members and 100 loose files) is converted, then rerun:
unchanged → nothing read (counted at the s3fs layer of this process, the only one that could read: no
prepare task and no actor starts) and STAC, export and the report still describe every cube, a tar rebuilt with a new member first → only that member, a deleted
chunk → that cube redone; the catalog holds every cube after each run. Two runs on one output → the
second is refused and no cube is left incomplete or non-finite.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import s3fs.core
import zarr
from PIL import Image

from pipeline import cubes, export
from pipeline.catalog import read_catalog
from pipeline.config import JobSpec
from pipeline.incremental import UNCHANGED
from pipeline.lease import LeaseHeldError, read_lease
from pipeline.manifest import read_manifest
from pipeline.sample import sample_image
from pipeline.storage import open_fs

pytestmark = pytest.mark.integration

TAR_MEMBERS, LOOSE = 120, 100


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_767_225_600  # as tar records a file's mtime
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _spec(bucket: Any, out: str = "out", inputs: str = "in/") -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": "incremental",
            "inputs": [f"{bucket.url}/{inputs}"],
            "output": f"{bucket.url}/{out}",
            "storage": {
                "endpoint_url": bucket.server.endpoint_url,
                "key_env": "AWS_ACCESS_KEY_ID",
                "secret_env": "AWS_SECRET_ACCESS_KEY",
                "region": "us-east-1",
            },
            "output_options": {"chunk": 8},
            "ray": {"actors": 1, "batch_size": 4, "max_images_in_flight": 4},
        }
    )


@pytest.fixture
def archive(s3_bucket: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in s3_bucket.env.items():
        monkeypatch.setenv(k, v)
    rng = np.random.default_rng(12)
    fs, _ = open_fs(s3_bucket.url, s3_bucket.storage_options)
    members = {f"t/{i:03d}.png": _png(sample_image(rng, 12, 12)) for i in range(TAR_MEMBERS)}
    fs.pipe_file(f"{s3_bucket.name}/in/a.tar", _tar(members))
    for i in range(LOOSE):
        fs.pipe_file(f"{s3_bucket.name}/in/loose/{i:03d}.png", _png(sample_image(rng, 12, 12)))
    return s3_bucket, fs, members


class ReadCounter:
    """Bytes of objects under ``prefix`` read through s3fs in this process (whole and ranged GETs)."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.bytes = prefix, 0

    def count(self, path: str, n: int) -> None:
        if path.startswith(self.prefix):
            self.bytes += n


@pytest.fixture
def read_counter(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReadCounter]:
    counter = ReadCounter("")
    real_fetch, real_cat = s3fs.core._fetch_range, s3fs.core.S3FileSystem._cat_file

    def fetch(fs: Any, bucket: str, key: str, *a: Any, **kw: Any) -> bytes:
        data = real_fetch(fs, bucket, key, *a, **kw)
        counter.count(f"{bucket}/{key}", len(data))
        return data

    async def cat(self: Any, path: str, *a: Any, **kw: Any) -> bytes:
        data = await real_cat(self, path, *a, **kw)
        counter.count(self._strip_protocol(path), len(data))
        return data

    monkeypatch.setattr(s3fs.core, "_fetch_range", fetch)
    monkeypatch.setattr(s3fs.core.S3FileSystem, "_cat_file", cat)
    yield counter


def _source_bytes(fs: Any, bucket: str) -> int:
    return sum(i["size"] for i in fs.find(f"{bucket}/in/", detail=True).values())


def _check_cubes_complete(spec: JobSpec, opts: dict[str, Any], groups: list[str]) -> None:
    store = cubes.open_cubes(spec.output, opts)
    for g in groups:
        grp = zarr.open_group(store, path=g, mode="r")
        assert grp.attrs["complete"] == 1, g  # 1 (netCDF-valid), True from older writers
        assert np.isfinite(np.asarray(grp["cube"][:])).all(), g


def test_reruns_skip_without_reading_redo_only_what_changed_and_the_catalog_accumulates(
    archive: Any, ray_local: Any, read_counter: ReadCounter
) -> None:
    from pipeline.execution import run_job

    bucket, fs, members = archive
    spec = _spec(bucket)
    opts = bucket.storage_options
    first = run_job(spec)
    assert (first.ok, first.failed) == (TAR_MEMBERS + LOOSE, 0) and first.actors == 1
    catalog = read_catalog(spec.output, opts)
    assert len(catalog) == TAR_MEMBERS + LOOSE
    assert all(r.cube_url.startswith(f"{bucket.url}/out/cubes.zarr/") and r.shape == (31, 12, 12) for r in catalog.values())

    # 1. Unchanged: decided from the listing alone.
    read_counter.prefix, read_counter.bytes = f"{bucket.name}/in/", 0
    again = run_job(spec)
    total = _source_bytes(fs, bucket.name)
    assert (again.ok, again.failed, again.skipped) == (0, 0, TAR_MEMBERS + LOOSE)
    assert again.actors == 0 and again.prepared == 0  # no actor, no prepare task: nothing read elsewhere
    assert read_counter.bytes <= 0.01 * total, (read_counter.bytes, total)
    assert {r["error_type"] for r in read_manifest(spec.output, opts).to_pylist()} == {UNCHANGED}
    # STAC, export and the report still describe every cube: they read the catalog, not this run's manifest.
    collection = json.loads(fs.cat_file(f"{bucket.name}/out/stac/collection.json"))
    assert sum(link["rel"] == "item" for link in collection["links"]) == TAR_MEMBERS + LOOSE
    assert len(export.select_rows(spec.output, "qa_backprojection_mrae >= 0", opts)) == TAR_MEMBERS + LOOSE
    report = fs.cat_file(f"{bucket.name}/out/report.html").decode()
    assert f'<b id="count-cubes">{TAR_MEMBERS + LOOSE}</b>' in report and '<b id="count-ok">0</b>' in report

    # 2. The tar rebuilt with a new member first: only that member is converted.
    rng = np.random.default_rng(99)
    fs.pipe_file(f"{bucket.name}/in/a.tar", _tar({"t/new.png": _png(sample_image(rng, 12, 12))} | members))
    third = run_job(spec)
    assert (third.ok, third.failed) == (1, 0) and third.prepared == 1
    ok = [r for r in read_manifest(spec.output, opts).to_pylist() if r["status"] == "ok"]
    assert [r["member"] for r in ok] == ["t/new.png"]

    # 3. A deleted chunk: that cube (only) is redone.
    victim = next(r for r in catalog.values() if r.member is None)
    chunk = f"{bucket.name}/out/cubes.zarr/{victim.group}/cube/c/0/0/0"
    assert fs.exists(chunk)
    fs.rm_file(chunk)
    fourth = run_job(spec)
    assert (fourth.ok, fourth.failed) == (1, 0)
    assert [r["input"] for r in read_manifest(spec.output, opts).to_pylist() if r["status"] == "ok"] == [victim.input]
    _check_cubes_complete(spec, opts, [victim.group])  # the lost chunk is back: no NaN left

    final = read_catalog(spec.output, opts)
    assert len(final) == TAR_MEMBERS + LOOSE + 1  # every cube of every run
    assert final[victim.input].run_id == fourth.run_id and final[victim.input].completed is not None
    unchanged = next(r for r in final.values() if r.member == "t/000.png")
    assert unchanged.run_id == first.run_id and unchanged.last_seen_run == fourth.run_id
    _check_cubes_complete(spec, opts, [r.group for r in final.values()])


def test_two_runs_on_one_output_the_second_is_refused_and_no_cube_is_corrupt(archive: Any, ray_local: Any) -> None:
    from pipeline.execution import run_job

    bucket, fs, _ = archive
    spec = _spec(bucket, out="shared", inputs="in/loose/01*.png")
    opts = bucket.storage_options
    result: dict[str, Any] = {}
    first = threading.Thread(target=lambda: result.update(summary=run_job(spec)))
    first.start()
    deadline = time.monotonic() + 60
    while read_lease(spec.output, opts) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    holder = read_lease(spec.output, opts)
    assert holder is not None
    with pytest.raises(LeaseHeldError, match=holder.run_id):
        run_job(spec)
    first.join(timeout=900)
    summary = result["summary"]
    assert (summary.ok, summary.failed) == (10, 0)
    assert read_lease(spec.output, opts) is None  # released at the end
    _check_cubes_complete(spec, opts, [r.group for r in read_catalog(spec.output, opts).values()])

"""The pipeline end to end against a real local Ray and the real local S3 server.

tar, tar.gz and zip archives and a plain prefix in a bucket → cubes in a bucket; single-tile cubes equal
``drcr_model.reconstruct`` to float16 rounding; the manifest accounts for every input; a corrupt member
is reported while the rest succeed; a second run skips everything.
"""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import JobSpec
from pipeline.sample import sample_image
from pipeline.storage import open_fs

pytestmark = pytest.mark.integration


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def archive_bucket(s3_bucket):  # type: ignore[no-untyped-def]
    """A bucket with one archive of each kind and a plain prefix; returns (bucket, {key: image array})."""
    rng = np.random.default_rng(7)
    imgs = {f"im{i}": sample_image(rng, 20 + 4 * i, 24 + 3 * i) for i in range(7)}
    fs, _ = open_fs(s3_bucket.url, s3_bucket.storage_options)
    b = s3_bucket.name
    fs.pipe_file(f"{b}/in/a.tar", _tar({"x/im0.png": _png(imgs["im0"]), "x/broken.png": b"\x89PNG\r\n\x1a\n garbage", "notes.txt": b"hello"}))
    fs.pipe_file(f"{b}/in/b.tar.gz", _tar({"im1.png": _png(imgs["im1"]), "im2.png": _png(imgs["im2"])}, gz=True))
    fs.pipe_file(f"{b}/in/c.zip", _zip({"im3.png": _png(imgs["im3"]), "d/im4.png": _png(imgs["im4"])}))
    fs.pipe_file(f"{b}/in/loose/im5.png", _png(imgs["im5"]))
    fs.pipe_file(f"{b}/in/loose/im6.png", _png(imgs["im6"]))
    return s3_bucket, imgs


def _spec(bucket, **over) -> JobSpec:  # type: ignore[no-untyped-def]
    base = {
        "name": "s3-test",
        "inputs": [f"{bucket.url}/in/"],
        "output": f"{bucket.url}/out",
        "storage": {"endpoint_url": bucket.server.endpoint_url, "key_env": "AWS_ACCESS_KEY_ID", "secret_env": "AWS_SECRET_ACCESS_KEY", "region": "us-east-1"},
        "tiling": {"max_tile_pixels": 1000, "tile_core": 16, "halo": 8},
        "output_options": {"chunk": 16},
        "ray": {"actors": 1, "batch_size": 2, "max_images_in_flight": 2},
    }
    return JobSpec.from_dict(base).with_overrides(over)


@pytest.fixture
def s3_env(archive_bucket, monkeypatch):  # type: ignore[no-untyped-def]
    """The credentials live in the environment only (the spec names the variables)."""
    bucket, _ = archive_bucket
    for k, v in bucket.env.items():
        monkeypatch.setenv(k, v)
    return bucket


def test_archives_in_bucket_to_cubes_in_bucket(archive_bucket, s3_env, ray_local) -> None:  # type: ignore[no-untyped-def]
    import xarray as xr

    from drcr_model import reconstruct
    from drcr_model.weights import Weights
    from pipeline import cubes
    from pipeline.execution import run_job
    from pipeline.storage import resolve_storage_options

    bucket, imgs = archive_bucket
    spec = _spec(bucket)
    summary = run_job(spec)
    opts = resolve_storage_options(spec.storage)
    fs, root = open_fs(spec.output, opts)
    with fs.open(f"{root}/manifest/manifest.parquet", "rb") as f:
        rows = pq.read_table(f).to_pylist()
    by_member = {(r["source"].rsplit("/", 1)[-1], r["member"]): r for r in rows}
    # Every input accounted for exactly once.
    assert len(rows) == len({r["input"] for r in rows}) == 9
    assert by_member[("a.tar", "x/broken.png")]["status"] == "failed"
    assert "broken.png" in by_member[("a.tar", "x/broken.png")]["error"]
    assert by_member[("a.tar", "notes.txt")]["status"] == "skipped"
    assert (summary.ok, summary.failed, summary.skipped) == (7, 1, 1)
    assert bucket.env["AWS_SECRET_ACCESS_KEY"] not in str(rows)

    store = cubes.open_cubes(spec.output, opts)
    model = Weights.from_record(__import__("pipeline.execution", fromlist=["x"]).resolve_weights(spec)).load(device="cpu")
    where = {("a.tar", "x/im0.png"): "im0", ("b.tar.gz", "im1.png"): "im1", ("b.tar.gz", "im2.png"): "im2", ("c.zip", "im3.png"): "im3", ("c.zip", "d/im4.png"): "im4", ("im5.png", None): "im5", ("im6.png", None): "im6"}
    tiled = 0
    for key, name in where.items():
        row = by_member[key]
        assert row["status"] == "ok", row
        ds = xr.open_zarr(store, group=row["group"], consolidated=False)
        assert ds.cube.dims == ("wavelength", "y", "x") and ds.cube.shape == (31, *imgs[name].shape[:2])
        attrs = cubes.read_status(store, row["group"])
        assert attrs is not None and attrs["complete"] is True
        prov = attrs[cubes.ATTR]
        assert prov["source"]["sha256"] == row["source_sha256"] and prov["model"]["weights"]["sha256"]
        if prov["tiling"]["whole_image"]:
            ref = reconstruct(imgs[name], model, mode="pad").transpose(2, 0, 1)
            # Within the cube's max_error of the fp32 reference, plus 1e-6 because the actor's torch thread
            # count differs from this process's, which moves fp32 results by an ulp or so.
            err = np.abs(ds.cube.values.astype(np.float32) - ref)
            assert prov["output"]["max_error"] == spec.output_options.max_error > 0
            assert err.max() <= spec.output_options.max_error + 1e-6, err.max()
        else:
            tiled += 1
    assert tiled >= 1  # the larger images went through the tiled path
    tree = xr.open_datatree(store, engine="zarr", consolidated=False)
    assert len([g for g in tree.subtree if "cube" in g.data_vars]) == 7

    again = run_job(spec)
    assert (again.ok, again.failed, again.skipped) == (0, 1, 8)

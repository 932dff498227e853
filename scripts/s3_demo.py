"""``make s3-demo``: the S3 example job end to end on this machine, no cloud account needed.

1. starts the local S3-compatible server (``rclone serve s3``, see tests/s3server.py) on 127.0.0.1,
   objects stored as plain files under ``--root`` (default ``out/s3-demo``);
2. creates bucket ``drcr-demo`` and uploads the seeded sample (``pipeline.sample.make_sample``) to
   ``s3://drcr-demo/archives/``;
3. exports the standard AWS_* variables (credentials never go in the spec) and runs
   ``drcr-pipeline run --spec jobs/s3_example.toml`` on a local Ray;
4. opens one cube with xarray from the bucket, prints how to do the same, and stops the server.

Usage: ``python scripts/s3_demo.py [--root DIR] [--count N] [--spec FILE] [-- extra drcr-pipeline args]``.
Exit status is the pipeline's (0: all inputs ok or skipped; 2: some failed; 1: the job could not run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from s3server import S3Server  # noqa: E402

BUCKET = "drcr-demo"

OPEN_HINT = """\
# Open the result with xarray while the server runs (`python scripts/s3_server.py --root {root} --port {port}`
# prints the AWS_* variables to export; with these throwaway credentials):
import xarray as xr, pyarrow.parquet as pq
from pipeline.cubes import open_cubes
from pipeline.storage import open_fs, resolve_storage_options
opts = resolve_storage_options(None)                  # AWS_* from the environment
fs, root = open_fs("{output}", opts)
rows = pq.read_table(fs.open(root + "/manifest/manifest.parquet", "rb")).to_pylist()
store = open_cubes("{output}", opts, read_only=True)
ds = xr.open_zarr(store, group=rows[0]["group"], consolidated=False)   # cube: (wavelength, y, x)
# Or, with the server stopped, the same objects as local files:
#   xr.open_zarr("{local}", group=rows[0]["group"], consolidated=False)
"""


def _upload_sample(server: S3Server, count: int) -> list[str]:
    from pipeline.sample import make_sample
    from pipeline.storage import open_fs

    fs, _ = open_fs(f"s3://{BUCKET}", server.storage_options())
    keys = []
    with tempfile.TemporaryDirectory(prefix="drcr-sample-") as tmp:
        for path in make_sample(tmp, count=count):
            key = f"{BUCKET}/archives/{path.relative_to(tmp).as_posix()}"
            fs.put_file(str(path), key)
            keys.append(f"s3://{key}")
    return keys


def _open_one(output: str) -> str:
    """Open the first ok cube from the bucket with xarray, the way a user would; returns a one-line summary."""
    import pyarrow.parquet as pq
    import xarray as xr

    from pipeline.cubes import open_cubes
    from pipeline.storage import open_fs, resolve_storage_options

    opts = resolve_storage_options(None)  # as OPEN_HINT does: from the AWS_* variables main() exported
    fs, root = open_fs(output, opts)
    with fs.open(f"{root}/manifest/manifest.parquet", "rb") as f:
        rows = [r for r in pq.read_table(f).to_pylist() if r["status"] == "ok"]
    if not rows:
        return "no ok cube to open"
    ds = xr.open_zarr(open_cubes(output, opts, read_only=True), group=rows[0]["group"], consolidated=False)
    wl = ds["wavelength"].values
    return f"{rows[0]['group']}: cube {dict(ds.cube.sizes)} {ds.cube.dtype}, wavelength {wl[0]:g}–{wl[-1]:g} nm"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--root",
        type=Path,
        default=REPO / "out" / "s3-demo",
        help="directory holding the server's buckets (emptied first)",
    )
    p.add_argument("--count", type=int, default=6, help="sample images to generate")
    p.add_argument("--spec", type=Path, default=REPO / "jobs" / "s3_example.toml")
    p.add_argument(
        "extra", nargs=argparse.REMAINDER, help="-- further drcr-pipeline run arguments, e.g. -- --set ray.actors=2"
    )
    args = p.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    shutil.rmtree(args.root, ignore_errors=True)  # a fresh bucket each time, so the run is not a resume
    with S3Server(args.root) as server:
        server.create_bucket(BUCKET)
        keys = _upload_sample(server, args.count)
        print(f"S3 server ({server.backend}) at {server.endpoint_url}, objects in {server.root}")
        print(
            f"uploaded {len(keys)} objects to s3://{BUCKET}/archives/: "
            + ", ".join(k.rsplit("/", 1)[-1] for k in keys),
            flush=True,
        )

        # What a user does by hand: export the standard AWS environment, then run the CLI.
        os.environ.update(server.env())
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # ray >= 2.5x: token auth off for this local Ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        cli = shutil.which("drcr-pipeline", path=str(Path(sys.executable).parent)) or "drcr-pipeline"
        cmd = [cli, "run", "--spec", str(args.spec), "--no-progress", *extra]
        print("$ " + " ".join(["drcr-pipeline", *cmd[1:]]), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO).returncode
        print(f"(pipeline exit status {rc}, {time.perf_counter() - t0:.1f} s)")
        if rc in (0, 2):
            from pipeline.config import load_spec

            output = load_spec(args.spec).output
            print("opened with xarray: " + _open_one(output))
            local = server.root / output.removeprefix("s3://") / "cubes.zarr"
            print(OPEN_HINT.format(root=args.root, port=server.port, output=output, local=local))
    print("S3 server stopped; the objects stay in", args.root)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

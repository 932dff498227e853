"""``make s3-demo`` (scripts/s3_demo.py) runs end to end: its own S3 server, the sample uploaded to
``s3://drcr-demo/archives/``, ``jobs/s3_example.toml`` on a local Ray, one cube opened with xarray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_s3_demo_script(tmp_path: Path) -> None:
    root = tmp_path / "s3"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "s3_demo.py"),
            "--root",
            str(root),
            "--count",
            "3",
            "--",
            "--num-cpus",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "s3-example: 3 ok, 0 failed, 0 skipped" in proc.stdout
    assert "opened with xarray: " in proc.stdout and "'wavelength': 31" in proc.stdout
    # The server is stopped; its objects stay as plain files under --root.
    rows = pq.read_table(root / "drcr-demo" / "cubes" / "manifest" / "manifest.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok"] * 3
    assert all(r["input"].startswith("s3://drcr-demo/archives/") for r in rows)

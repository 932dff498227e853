"""Make the README's images from the demo output (``make demo`` first): ``docs/report.png`` (a headless
chromium screenshot of ``out/demo/report.html``) and ``docs/preview.png`` (input | spectral rendering, level 0
of its preview pyramid, of the demo's loose image).

    .venv/bin/python scripts/make_docs_images.py [out/demo]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr
from PIL import Image

from pipeline import cubes, preview
from pipeline.publish import publish_run

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main(output: str = "out/demo") -> None:
    DOCS.mkdir(exist_ok=True)
    report = Path(publish_run(output)["report"])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--window-size=1100,1400", f"--screenshot={DOCS / 'report.png'}", report.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    rows = [r for r in pq.read_table(Path(output) / "manifest" / "manifest.parquet").to_pylist() if r["status"] == "ok"]
    row = next(r for r in sorted(rows, key=lambda r: r["input"]) if r["member"] is None)  # a loose file: readable as is
    store = cubes.open_cubes(output, read_only=True)
    level0 = np.asarray(zarr.open_array(store, path=f"{row['group']}/{preview.PREVIEW}/0", mode="r")[:])
    a = Image.open(row["source"]).convert("RGB")
    b = Image.fromarray(np.ascontiguousarray(level0.transpose(1, 2, 0)))
    side = Image.new("RGB", (a.width + b.width + 8, max(a.height, b.height)), "white")
    side.paste(a, (0, 0))
    side.paste(b, (a.width + 8, 0))
    side = side.resize((side.width * 2, side.height * 2), Image.Resampling.NEAREST)
    side.save(DOCS / "preview.png", optimize=True)
    print(DOCS / "report.png", DOCS / "preview.png", sep="\n")


if __name__ == "__main__":
    main(*sys.argv[1:])

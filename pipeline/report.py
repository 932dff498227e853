"""The run report: one self-contained HTML file, ``<output>/report.html``.

Counts, throughput, failures with their reasons, a histogram of the cubes' back-projection MRAE
(:mod:`pipeline.qa`), a grid of input thumbnail | spectral rendering per image (:mod:`pipeline.preview`)
and the images' mean spectra. Images are inline ``data:`` URIs and charts inline SVG; no script, no
network: the file opens anywhere, offline, and can be mailed or archived as is.

Built from what runs leave: the latest run's manifest (its counts and failures) and run summary, and the
catalog's cubes (:func:`pipeline.catalog.cube_records`: every cube of the output, whichever run made it;
the histogram, spectra and grid) with their provenance and thumbnails. So a rerun that found everything
unchanged still shows every cube, and ``drcr-pipeline report OUTPUT`` rebuilds it at any time; never reads a
cube.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import zarr

from pipeline import cubes, preview, storage
from pipeline.catalog import cube_records
from pipeline.manifest import read_manifest

__all__ = ["REPORT", "MAX_GRID", "ReportData", "gather", "render_html", "write_report"]

log = logging.getLogger(__name__)

REPORT = "report.html"
MAX_GRID = 60
"""Images shown in the grid (worst back-projection MRAE first); the counts and charts cover all of them."""
MAX_SPECTRA = 200
"""Mean spectra drawn (the grid's images first)."""


@dataclasses.dataclass(kw_only=True)
class ReportData:
    """Everything the report shows; plain data (no storage handles)."""

    output: str
    rows: list[dict[str, Any]]
    """The latest run's manifest rows."""
    cubes: list[dict[str, Any]]
    """Every cube of the output (catalog records, manifest columns)."""
    run: dict[str, Any]
    spectra: dict[str, list[float]]
    bands_nm: list[float]
    thumbs: dict[str, tuple[bytes | None, bytes | None]]
    """Per input: (rendering PNG, input PNG), as :func:`pipeline.preview.thumbnail_paths` orders them."""


def gather(output: str, storage_options: Mapping[str, Any] | None = None) -> ReportData:
    """Read the latest run's manifest and run summary, the output's cubes, and the grid's thumbnails and mean
    spectra."""
    rows = read_manifest(output, storage_options).to_pylist()
    made = cube_records(output, storage_options)
    store = cubes.open_cubes(output, storage_options, read_only=True)
    try:
        run = dict(zarr.open_group(store, mode="r").attrs.get("drcr_pipeline_run", {}))  # type: ignore[arg-type]
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        run = {}
    ok = sorted(made, key=_worst_first)
    spectra: dict[str, list[float]] = {}
    bands: list[float] = []
    for r in ok[:MAX_SPECTRA]:
        record = (cubes.read_status(store, r["group"]) or {}).get(cubes.ATTR, {})
        mean = record.get("qa", {}).get("mean_spectrum")
        if mean and all(v is not None for v in mean):
            spectra[r["input"]] = mean
            bands = record.get("output", {}).get("bands_nm", bands)
    thumbs: dict[str, tuple[bytes | None, bytes | None]] = {}
    for r in ok[:MAX_GRID]:
        thumbs[r["input"]] = tuple(_read(u, storage_options) for u in preview.thumbnail_paths(output, r["group"]))  # type: ignore[assignment]
    return ReportData(
        output=output, rows=rows, cubes=made, run=run, spectra=spectra, bands_nm=list(bands), thumbs=thumbs
    )


def _worst_first(row: Mapping[str, Any]) -> tuple[float, str]:
    m = row.get("qa_backprojection_mrae")
    return (-(m if m is not None else math.inf), row["input"])


def _read(url: str, storage_options: Mapping[str, Any] | None) -> bytes | None:
    fs, path = storage.open_fs(url, storage_options)
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        return None


def write_report(output: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``<output>/report.html`` (the latest run and every cube of the output); returns its URL."""
    url = storage.join(output, REPORT)
    text = render_html(gather(output, storage_options))
    fs, path = storage.open_fs(url, storage_options)
    fs.pipe_file(path, text.encode("utf-8"))
    return url


# --- rendering -------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;max-width:1200px}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
.counts span{display:inline-block;margin-right:1.2rem;font-size:1.05rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:.8rem}
.cell{border:1px solid #ddd;padding:.3rem;font-size:.75rem;overflow-wrap:anywhere}
.cell img{width:128px;height:auto;image-rendering:auto;vertical-align:top;background:#eee}
.flag{color:#a40}.muted{color:#777}
"""


def render_html(data: ReportData) -> str:
    """The report as one HTML string (UTF-8, no external resources)."""
    counts = {s: sum(1 for r in data.rows if r["status"] == s) for s in ("ok", "failed", "skipped")}
    summary = data.run.get("summary", {})
    title = f"drcr-pipeline report: {storage.redact(data.output)}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        # Nothing may load from elsewhere: images are data: URIs, styles inline.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">run {_e(data.run.get("run_id", "?"))}, finished {_e(data.run.get("finished", "?"))}</p>',
        '<div class="counts" id="counts">'
        + "".join(f'<span><b id="count-{k}">{v}</b> {k}</span>' for k, v in counts.items())
        + f'<span><b id="count-cubes">{len(data.cubes)}</b> cubes in the output (all runs)</span>'
        + "</div>",
        _throughput(summary),
        _failures(data.rows),
        "<h2>Back-projection consistency (MRAE)</h2>",
        '<p class="muted">Each cube projected through the camera response vs the model\'s input, one exposure '
        "scale fitted per image (README, “QA fields”). Lower is better; ≈ 0 for a cube that explains its "
        "photo exactly.</p>",
        _histogram([r["qa_backprojection_mrae"] for r in data.cubes if r["qa_backprojection_mrae"] is not None]),
        "<h2>Mean spectra</h2>",
        _spectra_svg(data.spectra, data.bands_nm),
        _grid(data),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _throughput(summary: Mapping[str, Any]) -> str:
    if not summary:
        return '<p class="muted">No run summary recorded.</p>'
    fields = [
        ("elapsed", f"{summary.get('elapsed_s', 0):.1f} s"),
        ("megapixels", f"{summary.get('megapixels', 0):.2f} MP"),
        ("throughput", f"{summary.get('megapixels_per_s', 0):.3f} MP/s"),
        ("nodes", str(len(summary.get("nodes", [])))),
    ]
    return (
        "<h2>Throughput</h2><table>" + "".join(f"<tr><th>{k}</th><td>{_e(v)}</td></tr>" for k, v in fields) + "</table>"
    )


def _failures(rows: Sequence[Mapping[str, Any]]) -> str:
    failed = [r for r in rows if r["status"] == "failed"]
    if not failed:
        return "<h2>Failures</h2><p>None.</p>"
    body = "".join(
        f"<tr><td>{_e(r['input'])}</td><td>{_e(r['error_type'] or '')}</td><td>{_e(r['error'] or '')}</td></tr>"
        for r in failed
    )
    return f'<h2>Failures ({len(failed)})</h2><table id="failures"><tr><th>input</th><th>type</th><th>reason</th></tr>{body}</table>'


def _histogram(values: Sequence[float], bins: int = 20, w: int = 520, h: int = 160) -> str:
    if not values:
        return '<p class="muted">No QA values.</p>'
    hi = max(max(values), 1e-6)
    counts = [0] * bins
    for v in values:
        counts[min(int(v / hi * bins), bins - 1)] += 1
    top = max(counts)
    bw = (w - 40) / bins
    bars = "".join(
        f'<rect x="{30 + i * bw:.1f}" y="{h - 20 - c / top * (h - 30):.1f}" width="{bw - 1:.1f}" '
        f'height="{c / top * (h - 30):.1f}" fill="#4a7"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    axis = (
        f'<text x="30" y="{h - 5}" font-size="10">0</text>'
        f'<text x="{w - 40}" y="{h - 5}" font-size="10">{hi:.3g}</text>'
        f'<text x="2" y="12" font-size="10">{top}</text>'
    )
    return f'<svg id="qa-histogram" width="{w}" height="{h}" role="img" aria-label="MRAE histogram">{bars}{axis}</svg>'


def _spectra_svg(spectra: Mapping[str, Sequence[float]], bands: Sequence[float], w: int = 520, h: int = 200) -> str:
    if not spectra or not bands:
        return '<p class="muted">No spectra.</p>'
    top = max(max(s) for s in spectra.values()) or 1.0
    x0, x1 = float(bands[0]), float(bands[-1])

    def pt(b: float, v: float) -> str:
        return f"{35 + (b - x0) / (x1 - x0 or 1) * (w - 45):.1f},{h - 20 - max(v, 0) / top * (h - 30):.1f}"

    lines = "".join(
        f'<polyline fill="none" stroke="hsl({(i * 47) % 360},60%,45%)" stroke-width="1" '
        f'points="{" ".join(pt(b, v) for b, v in zip(bands, s))}"><title>{_e(name)}</title></polyline>'
        for i, (name, s) in enumerate(spectra.items())
    )
    axis = (
        f'<text x="35" y="{h - 5}" font-size="10">{x0:g} nm</text>'
        f'<text x="{w - 50}" y="{h - 5}" font-size="10">{x1:g} nm</text>'
        f'<text x="2" y="12" font-size="10">{top:.2f}</text>'
    )
    return f'<svg id="spectra" width="{w}" height="{h}" role="img" aria-label="mean spectra">{lines}{axis}</svg>'


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<span class="muted">({_e(alt)} missing)</span>'
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _grid(data: ReportData) -> str:
    ok = sorted((r for r in data.cubes if r["input"] in data.thumbs), key=_worst_first)
    total = len(data.cubes)
    if not ok:
        return ""
    cells = []
    for r in ok:
        rendering, inp = data.thumbs[r["input"]]  # as preview.thumbnail_paths orders them
        mrae = r["qa_backprojection_mrae"]
        flags = f'<div class="flag">{_e(r["qa_flags"])}</div>' if r["qa_flags"] else ""
        cells.append(
            f'<div class="cell">{_img(inp, "input")} {_img(rendering, "spectral rendering")}'
            f"<div>{_e(r['input'])}</div><div>{r['width']}×{r['height']}, MRAE "
            f"{'n/a' if mrae is None else f'{mrae:.3f}'}</div>{flags}</div>"
        )
    return (
        f"<h2>Images: input | spectral rendering (D65, CIE 1931 2°), worst MRAE first"
        f' ({len(ok)} of {total})</h2><div class="grid" id="grid">{"".join(cells)}</div>'
    )

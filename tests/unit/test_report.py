"""The run report (pipeline.report), opened in a real headless Chromium: no console errors, every image
decodes, the counts and failures are those of the manifest. (The README's docs/ images are made by
``scripts/make_docs_images.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from browser import load_page, screenshot
from outputs_run import SIZES, make_output

from pipeline import report
from pipeline.publish import publish_run

pytestmark = pytest.mark.slow

CHECK = """(() => {
  const imgs = [...document.images];
  return {
    images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    external: [...document.querySelectorAll('[src],[href]')]
      .map(e => e.getAttribute('src') || e.getAttribute('href')).filter(u => !u.startsWith('data:')),
    ok: document.getElementById('count-ok').textContent,
    failed: document.getElementById('count-failed').textContent,
    failures: document.getElementById('failures').innerText,
    svgs: document.querySelectorAll('svg rect, svg polyline').length,
  };
})()"""


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_output(tmp_path_factory.mktemp("report"))


def test_report_loads_in_chromium_with_images(output: str, tmp_path: Path) -> None:
    published = publish_run(output)
    path = Path(published["report"])
    assert path == Path(output) / report.REPORT and path.stat().st_size > 1000
    page = load_page(path, CHECK)
    assert page.errors == [], page.errors
    v = page.value
    assert v["images"] == 2 * len(SIZES) and v["decoded"] == v["images"], v  # input | rendering per image
    assert v["external"] == [], v
    assert (v["ok"], v["failed"]) == (str(len(SIZES)), "1")
    assert "broken.png" in v["failures"] and "cannot decode" in v["failures"], v["failures"]
    assert v["svgs"] >= len(SIZES) + 1  # histogram bars and a spectrum per image
    shot = tmp_path / "shot.png"
    screenshot(path, shot, width=800, height=600)
    from PIL import Image

    im = Image.open(shot)
    assert im.size == (800, 600) and len(set(im.convert("L").getdata())) > 10  # not a blank page


def test_a_broken_page_is_caught(tmp_path: Path) -> None:
    """The browser check itself can fail: a missing image and a script error are reported."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="missing.png"><script>throw new Error("boom")</script></body></html>')
    page = load_page(bad, "[...document.images].filter(i => i.naturalWidth > 0).length")
    assert page.value == 0
    assert any("boom" in e for e in page.errors) or page.exceptions, page.errors
    assert len(page.errors) >= 2, page.errors  # the exception and the failed load


def test_report_html_escapes_names(output: str) -> None:
    data = report.gather(output)
    failed = next(r for r in data.rows if r["status"] == "failed")
    failed["input"] = '<script>alert("x")</script>'
    html = report.render_html(data)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert json.dumps(data.bands_nm) == json.dumps(list(range(400, 701, 10)))


def test_grid_pairs_input_with_its_rendering(output: str) -> None:
    import base64

    from pipeline import preview

    data = report.gather(output)
    html = report.render_html(data)
    row = next(r for r in data.rows if r["status"] == "ok")
    rendering, source = (Path(p).read_bytes() for p in preview.thumbnail_paths(output, row["group"]))
    enc = {k: base64.b64encode(v).decode() for k, v in (("input", source), ("spectral rendering", rendering))}
    for alt, b64 in enc.items():
        assert f'<img alt="{alt}" src="data:image/png;base64,{b64}">' in html, alt

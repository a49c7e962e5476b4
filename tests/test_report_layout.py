"""The demo report checked as a reader meets it: the headline table first, then the image grids; breakdowns
collapsed; every image and link resolving; and, in a headless browser where one is installed, no table wider than a
1300 px window."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evalkit.paths import PROJECT_ROOT

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
WINDOW_PX = 1300
pytestmark = pytest.mark.slow  # every test reads the report of a demo run in a subprocess


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> Path:
    """`experiment=demo` with all its scorers, two methods, one seed and two steps (the report's shape, in a
    minute): separate_and_enhance_tiny is left out, its checkpoint comes from `make demo`'s finetune."""
    root = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "evalkit", "run", "experiment=demo", "methods=[vanilla,composable_diffusion]",
               "seeds=[0]", "sampling.num_inference_steps=2", f"store_root={root / 'store'}",
               f"runs_root={root / 'runs'}", f"report_dir={root / 'report'}"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "report"


def test_the_headline_table_comes_first_then_the_grids_and_markdown_says_the_same(demo_report):
    page = (demo_report / "index.html").read_text()
    headings = [html.unescape(heading) for heading in re.findall(r"<h2>(.*?)</h2>", page)]
    assert headings[:3] == ["Results: demo", "Image grids", "Plots"]
    first_table = page[page.index("<table>"):page.index("</table>")]
    assert page.index("<table>") < page.index("<h2>Image grids</h2>")
    assert re.findall(r"<th>(.*?)</th>", first_table) == [
        "method", "clip_full ↑", "clip_min_object ↑", "detection_rate ↑", "text_similarity ↑", "tifa ↑",
        "lpips_vs_vanilla ↓", "fid ↓", "overhead % vs vanilla ↓"]
    readme = (demo_report / "README.md").read_text()
    assert re.findall(r"^## (.*)$", readme, flags=re.MULTILINE) == headings
    # per subject and per TIFA element type: collapsed
    assert re.search(r"<details><summary>demo: detection_rate in detail, \d+ more metrics", page)
    assert re.search(r"<details><summary>demo: tifa in detail, \d+ more metrics", page)
    assert "<th>detection/cat ↑</th>" not in page  # a subject is a row of its breakdown, never a column


def _links(document: Path) -> list[str]:
    text = document.read_text()
    if document.suffix == ".html":
        found = re.findall(r'(?:src|href)="([^"]+)"', text)
    else:
        found = re.findall(r"\]\(([^)\s]+)\)", text)
    return [html.unescape(link) for link in found]


def test_every_image_and_link_resolves(demo_report):
    documents = [demo_report / "index.html", demo_report / "README.md", *sorted((demo_report / "grids").glob("*.html")),
                 *sorted((demo_report / "grids").glob("*.md"))]
    assert len(documents) == 4  # the report, and one grid page for the one dataset, each as HTML and Markdown
    checked = 0
    for document in documents:
        for link in _links(document):
            assert (document.parent / link).is_file(), f"{document.name}: {link} does not resolve"
            checked += 1
    images = [link for link in _links(demo_report / "index.html") if link.endswith(".png")]
    assert any(link.startswith("grids/") for link in images) and any(link.startswith("plots/") for link in images)
    assert checked > 10


# Opens every <details>, then writes what is wider than the window into the page, which --dump-dom prints.
_MEASURE = """
<script>
document.querySelectorAll('details').forEach(details => details.open = true);
const width = document.documentElement.clientWidth;
const wide = [...document.querySelectorAll('table')]
  .map(table => ({first: table.querySelector('th').textContent, right: table.getBoundingClientRect().right}))
  .filter(table => table.right > width);
const out = document.createElement('pre');
out.id = 'measured';
out.textContent = JSON.stringify({width, scrollWidth: document.documentElement.scrollWidth, wide});
document.body.appendChild(out);
</script>
"""
# A table no browser can fit in 1300 px: the measurement must report it, or it measures nothing.
_TOO_WIDE = "<table id='control'><tr>" + "<th>control</th>" + "<td>unbreakable_cell_text_x</td>" * 60 + "</tr></table>"


def _measure(page: Path, extra: str = "") -> dict:
    measured = page.with_name("measure.html")
    measured.write_text(page.read_text().replace("</body>", extra + _MEASURE + "</body>"))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={WINDOW_PX},2000",
         "--dump-dom", measured.as_uri()],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="measured">(.*?)</pre>', result.stdout, flags=re.DOTALL)
    assert found, result.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed")
def test_no_table_is_wider_than_the_page_at_1300_px(demo_report):
    control = _measure(demo_report / "index.html", _TOO_WIDE)
    assert [table["first"] for table in control["wide"]] == ["control"]
    measured = _measure(demo_report / "index.html")
    assert measured["width"] <= WINDOW_PX and measured["wide"] == []
    assert measured["scrollWidth"] <= measured["width"]  # nothing else runs off the page either

"""The HTML report, rendered by headless Chromium: not blank, tables with rows, every image
loaded, no network reference, and module granularity said at the top for an untraceable model."""

import os
import re
import shutil
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import layerlie as ll
from layerlie.cli import main
from layerlie.views.report import ReportError, render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# outside CI a machine without a browser skips these; in CI (.ci/run installs it) a missing one fails
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="chromium is not installed; .ci/run installs it with apt-get")

# Written into a test copy of the page only: once every image has loaded, record each one's
# natural width in the DOM, which --dump-dom then reads back.
PROBE = """<script>window.addEventListener('load', () => {
  for (const img of document.images) img.setAttribute('data-natural-width', img.naturalWidth);
  document.body.setAttribute('data-probed', document.images.length);
});</script>"""


def chromium(*args: str) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class Refs(HTMLParser):
    """Every src and href, and the text in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.refs, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", "resnet18", "--n", "2", "--size", "32", "--groups", "translate_x,rotate", "--out", str(out),
                 "--store", str(out.parent / "store")]) == 0
    return out


@needs_chromium
def test_report_screenshot_is_not_blank(page, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1400, 1000) and pixels.std() > 20


@needs_chromium
def test_report_dom_has_tables_with_rows_and_every_image_loaded(page, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri())
    assert int(re.search(r'data-probed="(\d+)"', dom).group(1)) == dom.count("<img") >= 5
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == dom.count("<img") and min(widths) > 0
    tables = re.findall(r"<table.*?</table>", dom, flags=re.S)
    assert len(tables) >= 4 and all(t.count("<tr") >= 2 for t in tables)


def _settings(html: str) -> dict[str, str]:
    """The settings table's rows, setting -> value."""
    table = re.search(r"<h2>Settings, versions and timings</h2>\s*(<table.*?</table>)", html, flags=re.S).group(1)
    return dict(re.findall(r"<tr>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*</tr>", table, flags=re.S))


def test_settings_name_the_device_and_where_the_tasks_ran(page, tmp_path):
    settings = _settings(page.read_text())
    assert settings["device"] == "cpu" and settings["host"] == socket.gethostname()
    assert settings["Ray nodes"] == "none (run serially)"  # the report measures in this process
    store = tmp_path / "store"
    shutil.copytree(page.parent / "store", store)
    for part in (store / "parts").glob("*.parquet"):  # the rows as a cluster's GPU tasks write them
        table = pq.read_table(part)
        for name, value in (("ray_node", "node-a"), ("device", "cuda:0")):
            table = table.set_column(table.schema.get_field_index(name), name, pa.array([value] * len(table)))
        pq.write_table(table, part)
    out = tmp_path / "cluster.html"
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0
    settings = _settings(out.read_text())
    assert settings["Ray nodes"] == "node-a" and settings["device"] == "cuda:0"


def test_report_makes_no_network_reference_and_holds_every_section(page):
    parser = Refs()
    parser.feed(page.read_text())
    assert parser.refs and all(r.startswith("data:image/png;base64,") for r in parser.refs)
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", page.read_text(), flags=re.I)
    text = " ".join(parser.text)
    for section in ("Settings, versions and timings", "End-to-end LEE per group", "Layer table, translate_x",
                    "completeness residual", "Before/after ablation", "Unknown layouts", "torch"):
        assert section in text


def test_report_renders_from_an_existing_store_without_measuring(page, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["layerlie.views.report"], "sweep", lambda *a, **k: pytest.fail("rendering a stored sweep measured again"))
    out = tmp_path / "again.html"
    assert main(["report", "--store", str(page.parent / "store"), "--out", str(out)]) == 0
    assert _untimed(out.read_text()) == _untimed(page.read_text())


def _untimed(html: str) -> str:
    """The page without its timings row, which only a measuring run has."""
    return re.sub(r"<tr>\s*<td>(timings|sweep \(s\))</td>.*?</tr>", "", html, flags=re.S)


def test_untraceable_model_gets_a_module_granularity_report(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)  # test_attribution:BranchyNet imports from here
    out = tmp_path / "u.html"
    assert main(["report", "test_attribution:BranchyNet", "--n", "1", "--size", "32", "--out", str(out)]) == 0
    html = out.read_text()
    first_section = html.index("<h2>")
    assert html.index("the layer table is at module granularity") < first_section
    assert "Layer table" in html and "<img" in html
    if CHROMIUM:
        dom = chromium("--dump-dom", out.as_uri())
        assert "the layer table is at module granularity" in dom[:dom.index("<h2>")]


def test_report_of_a_store_without_a_sweep_names_the_fix(tmp_path):
    with pytest.raises(ReportError, match="has no sweep; run `layerlie report MODEL --store"):
        render(tmp_path, tmp_path / "r.html")
    assert issubclass(ReportError, ll.LayerlieError)


def test_report_into_a_store_of_another_sweep_names_the_fix(page, tmp_path):
    with pytest.raises(ReportError, match="holds another sweep; render it with `layerlie report --store"):
        ll.report("resnet10t", path=tmp_path / "r.html", n=1, size=32, store=page.parent / "store")

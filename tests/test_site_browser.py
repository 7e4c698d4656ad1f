"""The built site and JupyterLab in a real browser (headless Chromium), with the network cut off.

Skipped with a message when Chromium is missing (``apt-get install chromium``; .ci/run installs
it) and, for the site, when the book is not built (``make book``). See book/browser.py for how
pages are inspected. Screenshots go to book/_build/screenshots/.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))
import browser  # noqa: E402

pytestmark = pytest.mark.skipif(
    browser.find_chromium() is None,
    reason="Chromium is not installed: `apt-get install chromium` (or set CHROMIUM) to test the site in a browser",
)
needs_site = pytest.mark.skipif(
    not (browser.HTML / "notebooks" / "00_tour.html").is_file(),
    reason="the book is not built: run `make book` first",
)
PAGES = ["intro.html", *browser.chapter_pages(), "instructors.html", *browser.API_PAGES]


# --------------------------------------------------------------------------------------------------
# The checker itself sees what it must see (no book needed)
# --------------------------------------------------------------------------------------------------

BROKEN_PAGE = """<!doctype html><html><head><title>broken</title>
<script src="https://cdn.example.org/mathjax/tex-chtml.js"></script></head>
<body><div class="math notranslate nohighlight">\\[ \\ell_i = \\max(0, M - S_{ii}) \\]</div>
<img src="missing.png"></body></html>"""


def test_checker_reports_cdn_math_raw_tex_and_missing_images(tmp_path):
    (tmp_path / "broken.html").write_text(BROKEN_PAGE, encoding="utf-8")
    with browser.serve(tmp_path, {browser.HARNESS: browser.HARNESS_HTML}) as base:
        report = browser.inspect_page(base, "broken.html", budget_ms=5000)
    problems = "\n".join(browser.page_problems("broken.html", report))
    assert "request off the machine: https://cdn.example.org/mathjax/tex-chtml.js" in problems
    assert "MathJax did not load" in problems and "raw TeX left in the page" in problems
    assert "image did not load: missing.png" in problems
    assert browser.static_external_links(tmp_path) == [
        "broken.html: <script> https://cdn.example.org/mathjax/tex-chtml.js"]


# --------------------------------------------------------------------------------------------------
# The built site
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site():
    with browser.serve(browser.HTML, {browser.HARNESS: browser.HARNESS_HTML}) as base:
        reports = {page: browser.inspect_page(base, page) for page in PAGES}
        shot = browser.screenshot(base, "notebooks/02_loss_zoo.html", browser.SHOTS / "02_loss_zoo.png")
    return {"reports": reports, "shot": shot}


@needs_site
def test_pages_load_nothing_from_outside():
    assert browser.static_external_links() == []


@needs_site
@pytest.mark.parametrize("page", PAGES)
def test_page_works_offline(site, page):
    assert (browser.HTML / page).is_file(), f"{page} is not in the built site: run `make book` again"
    report = site["reports"][page]
    assert browser.page_problems(page, report) == []
    if page.startswith(("notebooks/", "api/")):
        assert report["typeset"] > 0, f"{page}: expected typeset formulas (mjx-container), got none"
        executed = 'class="cell_output' in (browser.HTML / page).read_text(encoding="utf-8")
        assert report["images"] or not executed, f"{page}: expected figures in an executed chapter, got none"


@needs_site
def test_chapter_0_explorer_renders_offline(site):
    """With the HTML manager in the site (fetched from npm by `make book`), the explorer's controls render
    offline; without npm the site says where the explorer runs instead of leaving a blank."""
    report = site["reports"]["notebooks/00_tour.html"]
    assert report["widget_views"] >= 1, f"expected the explorer's widget view in chapter 0, got {report['widget_views']}"
    if (browser.HTML / "_static" / "widgets" / "embed.js").is_file():
        assert report["widgets_rendered"] == report["widget_views"] and report["widget_controls"] >= 3, (
            f"expected all {report['widget_views']} widget views drawn and the explorer's toggle buttons and caption "
            f"field, got {report['widgets_rendered']} drawn and {report['widget_controls']} controls")
    else:
        assert report["widget_notes"] == report["widget_views"], (
            f"expected a note for each of the {report['widget_views']} widget views, got {report['widget_notes']}")


@needs_site
def test_screenshot_of_chapter_2(site):
    data = site["shot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000, f"expected a full-page PNG, got {len(data)} bytes"
    assert site["reports"]["notebooks/02_loss_zoo.html"]["typeset"] > 10


# --------------------------------------------------------------------------------------------------
# JupyterLab (as `make lab` starts it) opens the .py sources as notebooks
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_in_lab(with_course_config: bool, shot: Path | None = None) -> str:
    """The DOM of JupyterLab after opening notebooks/00_tour.py by its /lab/tree address."""
    port, token = _free_port(), "mmalign-test"
    with tempfile.TemporaryDirectory(prefix="mmalign-lab-") as home:
        env = dict(os.environ, JUPYTER_CONFIG_DIR=f"{home}/config", JUPYTERLAB_SETTINGS_DIR=f"{home}/settings",
                   JUPYTERLAB_WORKSPACES_DIR=f"{home}/workspaces", JUPYTER_RUNTIME_DIR=f"{home}/runtime")
        env.pop("JUPYTER_CONFIG_PATH", None)
        if with_course_config:  # what `make lab` sets
            env["JUPYTER_CONFIG_PATH"] = str(ROOT / "jupyter_config")
        command = [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", f"--port={port}",
                   "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
                   f"--ServerApp.root_dir={ROOT}", "--allow-root"]
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                    break
                except OSError:
                    assert time.time() < deadline and server.poll() is None, "jupyter lab did not start"
                    time.sleep(0.5)
            page = f"lab/tree/notebooks/00_tour.py?token={token}"
            dom, requested = browser.run_chromium(f"http://127.0.0.1:{port}/{page}", "--dump-dom", budget_ms=20000)
            if shot is not None:
                browser.screenshot(f"http://127.0.0.1:{port}", page, shot, size=(1280, 900), budget_ms=20000)
        finally:
            server.terminate()
            server.wait(30)
    assert browser.external(requested) == [], browser.external(requested)
    return dom


def test_lab_opens_py_sources_as_notebooks():
    dom = _open_in_lab(True, browser.SHOTS / "lab_00_tour.png")
    assert "jp-NotebookPanel-notebook" in dom, "expected 00_tour.py open as a notebook, got no notebook panel"
    assert "A tour of multimodal alignment" in dom and "jp-CodeCell" in dom


def test_lab_without_the_course_config_opens_the_text_editor():
    """The control: JupyterLab's own default for .py is the editor, so the test above can fail."""
    dom = _open_in_lab(False)
    assert "jp-NotebookPanel-notebook" not in dom, "expected the text editor without the course's config"

"""Look at the built site (and at JupyterLab) in a real browser, with the network cut off.

Headless Chromium (Debian's ``chromium`` package) loads each page from a web server on 127.0.0.1.
Every host name except 127.0.0.1 resolves to nothing and every proxied request goes to a closed
port, so a page that still needs the internet shows it. Chromium's network log records every
request it tried; :func:`check_site` reads it back.

A page cannot be inspected with ``--dump-dom`` alone (scripts run, but images' load state and
MathJax's progress are not in the DOM), so each chapter is opened inside a small harness page of
the same origin: the harness waits for MathJax, then writes what it found (typeset formulas, raw TeX
left, images that failed, resources fetched) into its own DOM, which ``--dump-dom`` prints.

Command line (after ``make book``)::

    python book/browser.py            # check every page, screenshot chapter 2, exit 1 on problems
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "book" / "_build" / "html"
SHOTS = ROOT / "book" / "_build" / "screenshots"
HARNESS = "__offline_check__.html"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# The harness: loads ?page=... in an iframe, waits for MathJax (or 20 s of virtual time), reports.
HARNESS_HTML = """<!doctype html><html><head><meta charset="utf-8"></head><body>
<pre id="report">pending</pre>
<iframe id="page" style="width:1200px;height:900px"></iframe>
<script>
const target = new URLSearchParams(location.search).get("page");
const frame = document.getElementById("page");
function report(win) {
  const doc = win.document;
  const skip = new Set(["SCRIPT", "STYLE", "PRE", "CODE", "TEXTAREA", "MJX-ASSISTIVE-MML"]);
  const texts = [];
  const walker = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    let p = n.parentElement, hidden = false;
    while (p) { if (skip.has(p.tagName.toUpperCase())) { hidden = true; break; } p = p.parentElement; }
    if (!hidden) texts.push(n.nodeValue);
  }
  const text = texts.join(" ");
  const raw = [];
  for (const pattern of ["\\\\[", "\\\\]", "$$", "\\\\begin{"]) {
    const at = text.indexOf(pattern);
    if (at >= 0) raw.push(text.slice(Math.max(0, at - 40), at + 60));
  }
  const images = Array.from(doc.images).map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0}));
  const resources = win.performance.getEntriesByType("resource").map(r => r.name);
  document.getElementById("report").textContent = JSON.stringify({
    title: doc.title,
    mathjax: !!(win.MathJax && win.MathJax.startup),
    typeset: doc.querySelectorAll("mjx-container").length,
    math_sources: doc.querySelectorAll(".math, span.math, div.math").length,
    raw_tex: raw,
    images: images,
    resources: resources,
    widget_notes: doc.querySelectorAll(".offline-widget-note").length,
    widgets_rendered: doc.querySelectorAll(".widget-subarea").length,  // one per view the manager drew
    widget_controls: doc.querySelectorAll(".jupyter-widgets button, .jupyter-widgets input").length,
    widget_views: doc.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
  });
}
frame.onload = () => {
  const win = frame.contentWindow;
  const done = () => setTimeout(() => report(win), 1500);  // also lets the widget manager draw the views
  if (win.MathJax && win.MathJax.startup && win.MathJax.startup.promise) {
    win.MathJax.startup.promise.then(() => (win.MathJax.typesetPromise ? win.MathJax.typesetPromise() : null)).then(done, done);
  } else { setTimeout(() => report(win), 3000); }
};
frame.src = target;
</script></body></html>
"""


def find_chromium() -> str | None:
    """The Chromium executable: $CHROMIUM, else the first of chromium / chromium-browser / google-chrome."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@contextlib.contextmanager
def serve(directory: Path, extra: dict[str, str] | None = None):
    """Serve ``directory`` on http://127.0.0.1:<free port>/ (plus ``extra`` name -> text pages)."""
    extra = dict(extra or {})

    class Handler(_QuietHandler):
        def do_GET(self):
            name = self.path.split("?", 1)[0].lstrip("/")
            if name in extra:
                body = extra[name].encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def offline_flags(profile_dir: str) -> list[str]:
    """Headless Chromium that can reach 127.0.0.1 only."""
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
        "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile_dir}",
        '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1',
        "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
    ]


def run_chromium(url: str, *args: str, budget_ms: int = 20000, timeout: int = 120,
                 chromium: str | None = None) -> tuple[str, list[str]]:
    """Open ``url`` headless and offline; return (stdout, every URL that the page requested)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found; install it (apt-get install chromium) or set CHROMIUM")
    with tempfile.TemporaryDirectory(prefix="mmalign-chromium-") as profile:
        netlog = Path(profile) / "netlog.json"
        command = [chromium, *offline_flags(profile), f"--log-net-log={netlog}",
                   f"--virtual-time-budget={budget_ms}", *args, url]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        origin = re.match(r"^[a-z]+://[^/]*", url).group(0)
        requested = sorted({u for u, initiator in _netlog_urls(netlog) if initiator == origin or u.startswith(origin)})
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout, requested


def _netlog_urls(path: Path) -> list[tuple[str, str]]:
    """(url, initiator) of every request in Chromium's network log.

    The initiator is the origin of the page that asked for it; Chromium's own background traffic
    (update checks, sign-in, time queries) has none and is not the site's doing.
    """
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace").rstrip()
    try:
        events = json.loads(text)["events"]
    except (ValueError, KeyError):  # a log cut short: close it
        try:
            events = json.loads(text.rstrip(",") + "]}")["events"]
        except (ValueError, KeyError):
            return []
    found = set()
    for event in events:
        params = event.get("params") or {}
        if "url" in params and "method" in params and "initiator" in params:
            found.add((params["url"], params["initiator"]))
    return sorted(found)


def external(urls) -> list[str]:
    """The URLs that would leave the machine (anything but 127.0.0.1 / localhost, data: and blob:)."""
    local = re.compile(r"^(data:|blob:|about:|chrome:|(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/)")
    return [u for u in urls if not local.match(u)]


def inspect_page(base: str, page: str, **kwargs) -> dict:
    """Open ``page`` (a path under the served root) in the harness; return its report plus the requests."""
    out, requested = run_chromium(f"{base}/{HARNESS}?page=/{page}", "--dump-dom", **kwargs)
    match = re.search(r'<pre id="report">(.*?)</pre>', out, re.S)
    import html as _html

    text = _html.unescape(match.group(1)) if match else "pending"
    report = json.loads(text) if text.startswith("{") else {"error": f"the page did not finish loading ({text})"}
    report["requested"] = requested
    return report


def screenshot(base: str, page: str, path: Path, size=(1280, 1600), **kwargs) -> Path:
    """A PNG of ``page`` as a reader sees it (offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_chromium(f"{base}/{page}", f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", **kwargs)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot {path}")
    return path


def static_external_links(html_dir: Path = HTML) -> list[str]:
    """Scripts, stylesheets, images and frames of the built pages that point off the site."""
    found = []
    pattern = re.compile(r'<(script|link|img|iframe|source)\b[^>]*?\b(src|href)="((?:https?:)?//[^"]+)"', re.I)
    for page in sorted(html_dir.rglob("*.html")):
        for tag, _, url in pattern.findall(page.read_text(encoding="utf-8", errors="replace")):
            if tag.lower() == "link" and not re.search(r'rel="(stylesheet|preload|icon|modulepreload)"',
                                                       _tag_text(page, url)):
                continue
            found.append(f"{page.relative_to(html_dir)}: <{tag}> {url}")
    return found


def _tag_text(page: Path, url: str) -> str:
    text = page.read_text(encoding="utf-8", errors="replace")
    at = text.find(url)
    return text[text.rfind("<", 0, at):text.find(">", at) + 1]


def chapter_pages(toc: Path = ROOT / "book" / "_toc.yml") -> list[str]:
    """The chapter pages the book's table of contents lists (``notebooks/NN_name.html``)."""
    return [f"{name}.html" for name in re.findall(r"file:\s*(notebooks/[0-9][0-9]_[A-Za-z0-9_]+)", toc.read_text())]


def page_problems(page: str, report: dict) -> list[str]:
    """What is wrong with one page's report (empty: fine)."""
    if "error" in report:
        return [f"{page}: {report['error']}"]
    problems = [f"{page}: request off the machine: {url}" for url in external(report["requested"])]
    problems += [f"{page}: fetched off the site: {url}" for url in external(report["resources"])]
    if report["math_sources"] and not report["mathjax"]:
        problems.append(f"{page}: has math but MathJax did not load")
    if report["math_sources"] and not report["typeset"]:
        problems.append(f"{page}: no typeset formula (mjx-container) although the page has math")
    problems += [f"{page}: raw TeX left in the page: ...{snippet}..." for snippet in report["raw_tex"]]
    problems += [f"{page}: image did not load: {img['src']}" for img in report["images"] if not img["ok"]]
    views = report["widget_views"]
    if views and report.get("widgets_rendered", 0) < views and report["widget_notes"] < views:
        problems.append(f"{page}: {views} widget views, {report.get('widgets_rendered', 0)} drawn and "
                        f"{report['widget_notes']} with an offline note: each view needs one or the other")
    return problems


# API reference pages whose docstring formulas must typeset offline (the ones with the most math)
API_PAGES = ["api/losses.html", "api/ot.html"]


def check_site(html_dir: Path = HTML, shots: Path = SHOTS, log=print) -> list[str]:
    """Every chapter page offline in Chromium; a screenshot of chapter 2. Returns the problems."""
    problems = static_external_links(html_dir)
    pages = chapter_pages()
    missing = [p for p in pages if not (html_dir / p).is_file()]
    if missing:
        return problems + [f"{p} is missing; run `make book` first" for p in missing]
    with serve(html_dir, {HARNESS: HARNESS_HTML}) as base:
        for page in ["intro.html", *pages, "instructors.html", *API_PAGES]:
            report = inspect_page(base, page)
            found = page_problems(page, report)
            log(f"{page}: {report.get('typeset', 0)} formulas typeset, {len(report.get('images', []))} images, "
                f"{len(external(report.get('requested', [])))} external requests" + (" -- PROBLEMS" if found else ""))
            problems += found
        shot = screenshot(base, "notebooks/02_loss_zoo.html", shots / "02_loss_zoo.png")
        log(f"screenshot: {shot}")
    return problems


if __name__ == "__main__":
    if find_chromium() is None:
        print("no Chromium found: install it (apt-get install chromium) to check the site in a browser")
        sys.exit(2)
    issues = check_site()
    print("\n".join(issues) if issues else "site OK offline: math typeset, images loaded, nothing fetched off the machine")
    sys.exit(1 if issues else 0)

"""After `jupyter-book build book`: every chapter page exists and shows executed code, figures and math,
and the site is self-contained (MathJax served from the site, no script, style or image from a CDN);
the API reference pages (book/api, Sphinx autodoc) hold their documented objects, with no raw reST.

Run by `make book`; exits 1 with the problems. (A page without figures usually means matplotlib ran
with a non-interactive backend such as Agg during the build.) The browser check, with the network
cut off, is `make check-book` (book/browser.py, tests/test_site_browser.py).
"""

import html
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import chapter_pages, static_external_links  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "book" / "_build" / "html"


def not_executed(config_path) -> list[str]:
    """Chapter stems that the config excludes from execution (CI builds some chapters unexecuted)."""
    import yaml
    from pathlib import PurePosixPath

    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    patterns = (config.get("execute") or {}).get("exclude_patterns") or []
    stems = [Path(page).stem for page in chapter_pages()]
    return [stem for stem in stems if any(PurePosixPath(f"notebooks/{stem}.ipynb").match(p) for p in patterns)]


RAW_RST = re.compile(r"\.\. (?:math|py:\w+|automodule)::|:(?:math|func|class|mod|meth|param|returns?):`?")


def api_problems(toc: Path = ROOT / "book" / "_toc.yml") -> list[str]:
    """The API reference (book/api/*.md): every page the toc lists was built, holds the objects autodoc
    documented (not an empty page from a failed import), and shows no raw reST (a directive that MyST
    printed as text instead of Sphinx running it: autodoc output must sit in an eval-rst block)."""
    found = []
    pages = re.findall(r"file:\s*(api/[A-Za-z0-9_]+)", toc.read_text(encoding="utf-8"))
    if not pages:
        return ["book/_toc.yml lists no API reference page (api/...)"]
    math_pages = 0
    for name in pages:
        page = HTML / f"{name}.html"
        if not page.exists():
            found.append(f"{page.relative_to(ROOT)} is missing")
            continue
        text = page.read_text(encoding="utf-8")
        body = html.unescape(re.sub(r"<[^>]+>", "", text))
        if name != "api/index" and 'class="sig sig-object py"' not in text:
            found.append(f"{name}.html: no documented object (did autodoc import the module?)")
        raw = sorted(set(RAW_RST.findall(body)))
        if raw:
            found.append(f"{name}.html: raw reST shown as text: {raw}")
        if "<blockquote" in text:  # an indented example with no `::` before it: a quote, its lines run together
            found.append(f"{name}.html: a docstring's indented block renders as a quote; end the line before it "
                         f"with `::` (e.g. a `Typical use::` paragraph) to make it a code block")
        math_pages += 'class="math' in text
    if math_pages < 3:
        found.append(f"only {math_pages} API pages show rendered math; the losses' docstrings hold formulas")
    # The chapters link to the reference with [name](#mmalign.module.object); the anchor must be on the page.
    for source in map(Path, chapter_pages(toc)):
        page = HTML / "notebooks" / f"{source.stem}.html"
        if not page.exists():
            continue
        for href, anchor in re.findall(r'href="(\.\./api/\w+\.html)#([^"]+)"', page.read_text(encoding="utf-8")):
            target = (page.parent / href).resolve()
            if not target.exists() or f'id="{anchor}"' not in target.read_text(encoding="utf-8"):
                found.append(f"{page.name}: link to {href}#{anchor}, which is not on that page")
    return found


def problems(config_path=ROOT / "book" / "_config.yml") -> list[str]:
    found = []
    skipped = set(not_executed(config_path))
    for source in map(Path, chapter_pages()):  # the chapters of book/_toc.yml
        page = HTML / "notebooks" / f"{source.stem}.html"
        if not page.exists():
            found.append(f"{page.relative_to(ROOT)} is missing")
            continue
        text = page.read_text(encoding="utf-8")
        if source.stem not in skipped:
            if 'class="cell_output' not in text:
                found.append(f"{page.name}: no executed cell output")
            if "<img" not in text:
                found.append(f"{page.name}: no figure")
        if "math notranslate" not in text and "\\(" not in text:
            found.append(f"{page.name}: no math")
    found += api_problems()
    if not (HTML / "_static" / "mathjax" / "tex-chtml.js").is_file():
        found.append("_static/mathjax/tex-chtml.js is missing: the sphinx-mathjax-offline extension did not run")
    found += [f"loads from outside the site: {link}" for link in static_external_links(HTML)]
    return found


if __name__ == "__main__":
    issues = problems(*sys.argv[1:2])
    print("\n".join(issues) if issues else f"site OK: every chapter page in {HTML} has output, figures and math; "
                                           f"the API reference pages hold their objects")
    sys.exit(1 if issues else 0)

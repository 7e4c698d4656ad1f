"""After `jupyter-book build book`: every chapter page exists and shows executed code, figures and math,
and the site is self-contained (MathJax served from the site, no script, style or image from a CDN).

Run by `make book`; exits 1 with the problems. (A page without figures usually means matplotlib ran
with a non-interactive backend such as Agg during the build.) The browser check, with the network
cut off, is `make check-book` (book/browser.py, tests/test_site_browser.py).
"""

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
    if not (HTML / "_static" / "mathjax" / "tex-chtml.js").is_file():
        found.append("_static/mathjax/tex-chtml.js is missing: the sphinx-mathjax-offline extension did not run")
    found += [f"loads from outside the site: {link}" for link in static_external_links(HTML)]
    return found


if __name__ == "__main__":
    issues = problems(*sys.argv[1:2])
    print("\n".join(issues) if issues else f"site OK: every chapter page in {HTML} has output, figures and math")
    sys.exit(1 if issues else 0)

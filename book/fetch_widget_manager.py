"""Put the ipywidgets HTML manager into the site, so widget views render offline.

The manager (``@jupyter-widgets/html-manager``, the code that draws a saved widget view in a static
page) is published on npm only. When ``npm`` is on the PATH, this fetches the pinned version from the
npm registry at build time (``npm pack``, no install, nothing global) and copies its standalone bundle
``embed.js`` and the fonts it loads into ``book/_static/widgets/`` (git-ignored). Jupyter Book loads
every script under ``_static``, so the pages then load it from the site itself; no page asks a CDN.

Without npm, nothing is fetched: the site shows a note where a widget would be (the widgets run in
JupyterLab), and the README says so.

    python book/fetch_widget_manager.py          # run by `make book`
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@jupyter-widgets/html-manager"
VERSION = "1.0.15"  # html-manager 1.x renders ipywidgets 8 (the course pins ipywidgets 8.1)
TARGET = Path(__file__).resolve().parent / "_static" / "widgets"
# The standalone bundle, its licence, and the fonts it loads (webpack names them by a 20-hex-digit hash).
KEEP = re.compile(r"^(embed\.js|embed\.js\.LICENSE\.txt|[0-9a-f]{20}\.(woff2|woff|ttf|eot|svg))$")


def installed() -> bool:
    stamp = TARGET / "VERSION"
    return (TARGET / "embed.js").is_file() and stamp.is_file() and stamp.read_text().strip() == VERSION


def fetch() -> str:
    """Fetch the manager if needed; return what happened, in one line."""
    if installed():
        return f"{PACKAGE}@{VERSION} already in {TARGET}"
    npm = shutil.which("npm")
    if npm is None:
        return (f"npm not found: the site will show a note instead of the widget views "
                f"(install Node.js/npm to get {PACKAGE} into the site)")
    with tempfile.TemporaryDirectory(prefix="mmalign-npm-") as tmp:
        proc = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", tmp, "--silent"],
                              capture_output=True, text=True, timeout=300)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            return (f"npm pack {PACKAGE}@{VERSION} failed ({proc.stderr.strip()[-300:]}); the site will show a note "
                    "instead of the widget views")
        staging = Path(tmp) / "widgets"
        staging.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if member.isfile() and name.parent == Path("package/dist") and KEEP.match(name.name):
                    with tar.extractfile(member) as src:
                        (staging / name.name).write_bytes(src.read())
        if not (staging / "embed.js").is_file():
            return f"{PACKAGE}@{VERSION} has no dist/embed.js; the site will show a note instead of the widget views"
        (staging / "VERSION").write_text(VERSION + "\n")
        if TARGET.exists():
            shutil.rmtree(TARGET)
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), TARGET)  # complete or absent: never a half-copied folder under TARGET
    return f"fetched {PACKAGE}@{VERSION} from the npm registry into {TARGET}"


if __name__ == "__main__":
    print(fetch())
    sys.exit(0)

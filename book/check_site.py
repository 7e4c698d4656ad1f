"""After `jupyter-book build book`: every chapter page exists and shows executed code, figures and math.

Run by `make book`; exits 1 with the problems. (A page without figures usually means matplotlib ran
with a non-interactive backend such as Agg during the build.)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "book" / "_build" / "html"


def problems() -> list[str]:
    found = []
    for source in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        page = HTML / "notebooks" / f"{source.stem}.html"
        if not page.exists():
            found.append(f"{page.relative_to(ROOT)} is missing")
            continue
        text = page.read_text(encoding="utf-8")
        if "cell_output" not in text:
            found.append(f"{page.name}: no executed cell output")
        if "<img" not in text:
            found.append(f"{page.name}: no figure")
        if "math notranslate" not in text and "\\(" not in text:
            found.append(f"{page.name}: no math")
    return found


if __name__ == "__main__":
    issues = problems()
    print("\n".join(issues) if issues else f"site OK: every chapter page in {HTML} has output, figures and math")
    sys.exit(1 if issues else 0)

"""Every Python source of the course compiles without a warning: an invalid escape such as ``\\m`` in a
docstring is a SyntaxWarning today (an error in a later Python), and a valid one such as ``\\b`` in
``:math:`\\bar d``` silently becomes a backspace in the API reference. Docstrings with backslashes are raw."""

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("utils/mmalign", "benchmarks", "examples", "solutions", "notebooks", "tests", "tools")
                 if (ROOT / folder).exists() for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_backspace_and_form_feed_never_sit_in_a_docstring():
    """The valid escapes that LaTeX hits (\\b of \\bar, \\f of \\frac, \\t of \\tau, \\r of \\rho, \\v of
    \\vec) give control characters in a non-raw docstring; none may appear in the library's docstrings."""
    import ast

    bad = []
    for path in SOURCES:
        if "utils/mmalign" not in str(path):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node, clean=False)
                if doc and any(c in doc for c in "\b\f\v\r\t"):
                    bad.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}")
    assert not bad, f"control characters in docstrings (make them raw: r\"\"\"...): {bad}"

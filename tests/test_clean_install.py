"""A real install: the library built from this tree (sdist, then wheel: what `pip install .` does) and
installed into clean virtual environments (no system site-packages, nothing from .venv), with its
dependencies resolved from the package registry. In a venv with the core alone, every module that
needs only the core imports, and every other module fails with an ImportError that names one of its
own declared dependencies; in a fresh venv per extra, the modules that extra should make importable
import, and so does every package the extra declares.

Which module needs what comes from tests/test_packaging.py (the import-time imports of each module,
followed through the library's own imports, mapped onto pyproject.toml's core and extras), so the two
tests cannot drift. Installs go through uv (fetched with pip into a temporary folder) because it
hardlinks torch's 5.5 GB out of its cache instead of copying them: the nine venvs install in about 15 s
in all, where one plain `pip install .` of the core takes about 60 s on 2 cores. uv is given pip's
configured indexes, find-links and constraints, and torch (and torchvision) are pinned to the versions
of the environment running the tests, so a clean install never fetches another multi-GB torch build
(the first run on a machine still fills uv's cache, about 6.5 GB, with those same versions).

Runs where MMALIGN_CLEAN_INSTALL=1 is set (`make check-install` sets it; CI runs that as its own step after
`make test`): the first run on a machine would download torch again into uv's cache (several GB), so
`make test` skips it with a message.
Needs the package registry: where it cannot be reached (offline) the test is skipped, except in CI,
where that is a failure. About 80-90 s on 2 busy cores, most of it importing torch,
transformers and the rest in each venv.
"""

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import test_packaging as packaging_info

ROOT = Path(__file__).resolve().parents[1]
UV = "uv==0.13.9"  # the installer, fetched into a temporary folder (this file uses uv venv / pip install / build)
SETS = packaging_info.requirement_sets()
NEEDS = packaging_info.module_needs()
CORE = {packaging_info.canonical(r.name) for r in SETS["core"]}

# Runs inside a clean venv: imports what it is told and reports each outcome as JSON.
CHECK = r'''
import importlib, importlib.metadata as md, json, re, sys
spec = json.loads(open(sys.argv[1]).read())
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
out = {"prefix": sys.prefix, "path": sys.path, "modules": {}, "names": {}, "missing": []}
import mmalign
out["mmalign_file"] = mmalign.__file__
providers = {}
for top, dists in md.packages_distributions().items():
    for d in dists:
        providers.setdefault(canon(d), set()).add(top)
names = []
for dist, known in spec["distributions"].items():
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        out["missing"].append(dist)
        continue
    tops = sorted(t for t in providers.get(dist, ()) if not t.startswith("_"))
    same = [t for t in tops if canon(t) == dist]
    names += known or same or tops
def attempt(name):
    try:
        if name.endswith(".__main__"):  # a command: `python -m package --help` must start and exit 0
            import contextlib, io, runpy
            sys.argv = [name, "--help"]
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    runpy.run_module(name[:-len(".__main__")], run_name="__main__", alter_sys=True)
            except SystemExit as e:
                if e.code not in (0, None):
                    raise
        else:
            importlib.import_module(name)
    except BaseException as e:
        return {"type": type(e).__name__, "import_error": isinstance(e, ImportError),
                "name": getattr(e, "name", None), "message": str(e)[:400]}
for name in spec["modules"]:
    out["modules"][name] = attempt(name)
for name in dict.fromkeys(names):
    out["names"][name] = attempt(name)
print(json.dumps(out))
'''


def _run(cmd, timeout=900, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _tail(proc, n=1500):
    return (proc.stdout + proc.stderr)[-n:]


def _python(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / "python"


def _fail_if(broken: dict, message: str) -> None:
    if broken:
        lines = "\n".join(f"  {name}: {err['type']}: {err['message'][:200]}" for name, err in sorted(broken.items()))
        pytest.fail(f"{message}:\n{lines}", pytrace=False)


def _pip_index_options() -> tuple[list[str], dict[str, str]]:
    """pip's configured indexes, find-links, constraints (and CA bundle) as uv options, so uv sees what
    `pip install .` would see on this machine."""
    proc = _run([sys.executable, "-m", "pip", "config", "list"], timeout=60)
    options, env = [], {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = value.strip("'\"")
        flag = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
                "constraint": "--constraint"}.get(key.rpartition(".")[2])
        if flag:
            for item in str(value).split():
                if [flag, item] not in [options[i:i + 2] for i in range(0, len(options), 2)]:
                    options += [flag, item]
        elif key.rpartition(".")[2] == "cert":
            env["SSL_CERT_FILE"] = str(value)
    return options, env


class Installer:
    def __init__(self, work: Path):
        self.work = work
        self.timings: dict[str, float] = {}
        tools = work / "tools"
        proc = _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                     "--timeout", "20", "--retries", "1", "--target", tools, UV], timeout=300)
        if proc.returncode != 0:
            reason = (f"the package registry cannot be reached (offline?): `pip install {UV}` failed: "
                      f"{_tail(proc, 300).strip()}")
            if os.environ.get("CI"):
                pytest.fail(f"CI must run the clean-install test, but {reason}")
            pytest.skip(reason)
        self.uv = shutil.which("uv", path=os.pathsep.join(str(tools / d) for d in ("bin", "Scripts")))
        assert self.uv, f"pip installed {UV} into {tools} but no uv program is there"
        options, cert_env = _pip_index_options()
        pins = work / "pins.txt"  # the torch of the environment running the tests: no other GB build
        lines = []
        for dist in ("torch", "torchvision"):
            try:
                lines.append(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        pins.write_text("\n".join(lines) + "\n")
        # pip takes the best version across all its indexes; uv's default would stop at the first one
        self.index_options = [o for i in range(0, len(options), 2) if options[i] != "--constraint"
                              for o in options[i:i + 2]] + ["--index-strategy", "unsafe-best-match"]
        self.options = options + ["--constraint", pins, "--index-strategy", "unsafe-best-match"]
        self.env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        self.env.update(cert_env, UV_PYTHON_DOWNLOADS="never", PYTHONNOUSERSITE="1", MPLBACKEND="Agg",
                        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        PYTHONDONTWRITEBYTECODE="1")
        # the tree as a fresh clone has it (no build/ or egg-info left by an editable install), built once
        source = work / "src"
        shutil.copytree(ROOT / "utils", source / "utils",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (ROOT / name).exists():
                shutil.copy2(ROOT / name, source / name)
        start = time.perf_counter()
        proc = _run([self.uv, "build", "--quiet", "--out-dir", work / "dist", *self.index_options, source],
                    cwd=work, env=self.env)
        assert proc.returncode == 0, f"building mmalign (sdist, then a wheel from it) failed:\n{_tail(proc)}"
        self.timings["build"] = time.perf_counter() - start
        (self.wheel,) = (work / "dist").glob("mmalign-*.whl")

    def venv(self, extra: str) -> Path:
        """A fresh venv with the wheel (and ``extra`` unless "core") installed from the registry."""
        start = time.perf_counter()
        venv = self.work / f"venv-{extra}"
        proc = _run([self.uv, "venv", "--quiet", "--python", sys.executable, venv], cwd=self.work, env=self.env)
        assert proc.returncode == 0, _tail(proc)
        target = "mmalign" if extra == "core" else f"mmalign[{extra}]"
        proc = _run([self.uv, "pip", "install", "--quiet", "--python", _python(venv), *self.options,
                     f"{target} @ {self.wheel.as_uri()}"], cwd=self.work, env=self.env)
        assert proc.returncode == 0, f"installing {target} into a clean venv failed:\n{_tail(proc)}"
        self.timings[f"install {extra}"] = time.perf_counter() - start
        return venv

    def check(self, venv: Path, modules: list[str], distributions: dict[str, list[str]]) -> dict:
        """Import ``modules`` and the packages of ``distributions`` (their names the library imports, or
        else the names they install) in ``venv``; the outcome of each, and where mmalign came from."""
        spec = self.work / f"spec-{venv.name}.json"
        spec.write_text(json.dumps({"modules": modules, "distributions": distributions}))
        script = self.work / "check.py"
        script.write_text(CHECK)
        start = time.perf_counter()
        proc = _run([_python(venv), script, spec], timeout=600, cwd=self.work, env=self.env)
        assert proc.returncode == 0, f"the import check crashed in {venv.name}:\n{_tail(proc)}"
        self.timings[f"imports {venv.name}"] = time.perf_counter() - start
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert Path(out["mmalign_file"]).is_relative_to(venv), \
            f"mmalign was imported from {out['mmalign_file']}, not from the clean venv {venv}"
        leaked = [p for p in out["path"] if p and (ROOT in Path(p).parents or Path(p) == ROOT)]
        assert not leaked, f"the clean venv's sys.path reaches into the repository: {leaked}"
        return out


@pytest.fixture(scope="module")
def installer():
    if os.environ.get("MMALIGN_CLEAN_INSTALL") != "1":
        pytest.skip("the clean-install test fills uv's cache with torch (several GB the first time); "
                    "run `make check-install` (MMALIGN_CLEAN_INSTALL=1; CI does, after make test)")
    work = Path(tempfile.mkdtemp(prefix="mmalign-clean-install-"))
    try:
        inst = Installer(work)
        yield inst
        print("clean-install timings (s):", {k: round(v, 1) for k, v in inst.timings.items()})
        _run([inst.uv, "cache", "clean", "mmalign"], timeout=120, env=inst.env)  # this run's wheel only
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _library_names_by_distribution() -> dict[str, list[str]]:
    """distribution -> the top-level names the library imports from it (lazily or not)."""
    found: dict[str, list[str]] = {}
    for name in sorted(packaging_info.third_party_imports()):
        found.setdefault(packaging_info.distribution_of(name), []).append(name)
    return found


def test_core_alone_imports_every_core_module_and_the_rest_fail_clearly(installer):
    venv = installer.venv("core")
    try:
        out = installer.check(venv, sorted(NEEDS), {d: [] for d in sorted(CORE)})
    finally:
        shutil.rmtree(venv, ignore_errors=True)
    core_modules = packaging_info.modules_importable_with("core")
    assert len(core_modules) >= 40, f"expected most of the library to need only the core, got {core_modules}"
    _fail_if({m: out["modules"][m] for m in core_modules if out["modules"][m]},
             f"modules that need only the core ({', '.join(sorted(CORE))}) fail to import from a clean install")
    unclear = {}
    for module in sorted(set(NEEDS) - set(core_modules)):
        err = out["modules"][module]
        if err is None:
            continue  # a core dependency happened to bring what it needs; nothing to report
        missing = packaging_info.distribution_of((err["name"] or "").split(".")[0])
        if (not err["import_error"] or missing not in NEEDS[module] - CORE
                or "pip install 'mmalign[" not in err["message"]):
            unclear[module] = err
    _fail_if(unclear, "without its extra, a module must fail with an ImportError for one of its own declared "
                      f"dependencies ({ {m: sorted(NEEDS[m] - CORE) for m in unclear} }) that names the extra to "
                      "install (mmalign._optional.missing_extra), not another error")
    assert not out["missing"], f"`pip install .` did not install the core dependencies {out['missing']}"
    _fail_if({n: e for n, e in out["names"].items() if e}, "the core dependencies fail to import in a clean venv")


@pytest.mark.parametrize("extra", [e for e in SETS if e != "core"])
def test_each_extra_in_a_fresh_venv_makes_its_modules_import(installer, extra):
    applies = [r for r in SETS[extra] if r.marker is None or r.marker.evaluate()]
    known = _library_names_by_distribution()
    distributions = {packaging_info.canonical(r.name): known.get(packaging_info.canonical(r.name), [])
                     for r in applies}
    modules = packaging_info.modules_importable_with(extra)
    venv = installer.venv(extra)
    try:
        out = installer.check(venv, modules, distributions)
    finally:
        shutil.rmtree(venv, ignore_errors=True)
    assert not out["missing"], f"`pip install .[{extra}]` did not install {out['missing']}"
    _fail_if({m: e for m, e in out["modules"].items() if e},
             f"with the core and the {extra!r} extra installed, these modules should import but fail")
    _fail_if({n: e for n, e in out["names"].items() if e},
             f"packages the {extra!r} extra installs fail to import in a clean venv")
    if extra == "course":
        assert set(modules) == set(NEEDS), "the course extra must make every module of the library import"

"""Checks of the course as a whole: notebook pairing, install files, labs generated from solutions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jupytext
import nbformat
import pytest

from mmalign import labs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
SOLUTIONS = labs.iter_solutions(ROOT / "solutions")


def test_there_is_content():
    assert NOTEBOOK_SOURCES, "no notebooks/NN_*.py found"
    assert SOLUTIONS, "no solutions/NN_*.py found"
    for src in NOTEBOOK_SOURCES:
        assert (ROOT / "solutions" / src.name).exists(), f"chapter {src.stem} has no solution/lab"


def _code_and_markdown(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("src", NOTEBOOK_SOURCES, ids=lambda p: p.stem)
def test_notebook_is_paired_and_stripped(src):
    ipynb = src.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `make sync`"
    paired = nbformat.read(ipynb, as_version=4)
    source = jupytext.read(src)
    assert _code_and_markdown(paired) == _code_and_markdown(source), (
        f"{ipynb.name} differs from {src.name}: run `make sync` (jupytext --sync)")
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{ipynb.name} has outputs: strip them"


@pytest.mark.parametrize("src", NOTEBOOK_SOURCES, ids=lambda p: p.stem)
def test_notebook_is_in_the_book(src):
    toc = (ROOT / "book" / "_toc.yml").read_text()
    assert f"notebooks/{src.stem}" in toc, f"{src.stem} is not in book/_toc.yml"


def test_environment_yml_matches_requirements():
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    env = (ROOT / "environment.yml").read_text().splitlines()
    start = env.index("  - pip:")
    pip_section = [line.strip()[2:] for line in env[start + 1:] if line.startswith("    - ")]
    assert pip_section == reqs, "environment.yml's pip section drifted from requirements.txt"
    for line in reqs:
        assert re.match(r"^[A-Za-z0-9_.\-]+==[^=\s;]+(; .+)?$", line), f"not pinned: {line!r}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


def test_labs_are_generated_from_solutions_and_leak_nothing():
    problems = labs.check_labs(ROOT / "solutions", ROOT / "labs")
    assert problems == [], "\n".join(problems) + "\nrun `make labs`"


def _run_until_first_error(nb, cwd: Path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except CellExecutionError as err:
        return err
    return None


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_untouched_lab_stops_only_at_not_implemented(solution, tmp_path):
    lab = nbformat.read(labs.lab_path_for(solution, ROOT / "labs"), as_version=4)
    err = _run_until_first_error(lab, tmp_path)
    assert err is not None, "the untouched lab ran to the end: a solution region is missing"
    assert err.ename == "NotImplementedError", f"the lab failed before the student's code: {err.ename}: {err.evalue}"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_grading_solution_full_marks_and_untouched_lab_zero(solution, tmp_path):
    solved = tmp_path / f"{solution.stem}.ipynb"
    nbformat.write(labs.solution_as_notebook(solution), solved)
    result = labs.grade_notebook(solved, solution)
    assert result["max_score"] > 0
    assert result["score"] == result["max_score"], json.dumps(result["cells"], indent=1)

    untouched = tmp_path / "student" / f"{solution.stem}.ipynb"
    untouched.parent.mkdir()
    untouched.write_bytes(labs.lab_path_for(solution, ROOT / "labs").read_bytes())
    result = labs.grade_notebook(untouched, solution)
    assert result["score"] == 0, json.dumps(result["cells"], indent=1)

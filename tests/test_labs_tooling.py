"""The lab machinery (mmalign.labs): generating labs from solutions, checking them, autograding.

Everything runs on a tiny fixture lab written to tmp_path. Grading starts a sandboxed process per
notebook (2-4 s each), so all submissions are graded once, by one module-scoped ``grade_dir`` run,
and the tests read its results. The routes a student could take to forge a grade are in
tests/test_grading_attacks.py.
"""

import csv
import json
import textwrap

import nbformat
import pytest

from mmalign import labs
from mmalign.labs import sandbox

HEADER = textwrap.dedent(
    """\
    # ---
    # jupyter:
    #   jupytext:
    #     text_representation:
    #       extension: .py
    #       format_name: percent
    #   kernelspec:
    #     display_name: Python 3
    #     language: python
    #     name: python3
    # ---
    """
)


def nbgrader(grade_id, *, grade, solution, points=None, locked=None):
    """The `# %%` header metadata exactly as jupytext writes it (JSON with sorted keys)."""
    meta = {"grade": grade, "grade_id": grade_id, "locked": (not solution) if locked is None else locked,
            "schema_version": 3, "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return "nbgrader=" + json.dumps(meta, sort_keys=True)


ADD_IMPL = nbgrader("add_impl", grade=False, solution=True)
ADD_TEST = nbgrader("add_test", grade=True, solution=False, points=2)
SCALE_IMPL = nbgrader("scale_impl", grade=False, solution=True)
SCALE_TEST = nbgrader("scale_test", grade=True, solution=False, points=3)
WHY = nbgrader("why", grade=True, solution=True, points=1)

SOLUTION = HEADER + f'''
# %% [markdown]
# # Lab 00: adding numbers
# Implement `add` and `scale`, then run the tests.

# %% {ADD_IMPL}
def add(a, b):
    """The sum of a and b."""
    ### BEGIN SOLUTION
    total = a + b  # the secret sauce of this lab
    return total
    ### END SOLUTION


# %% {ADD_TEST}
assert add(1, 2) == 3
### BEGIN HIDDEN TESTS
assert add(-1, 1) == 0, "hidden: negative numbers"
import os
assert os.environ["MMALIGN_PROFILE"] == "ci", "the grader passes the caller's profile (default ci)"
### END HIDDEN TESTS

# %% {SCALE_IMPL}
def scale(x, k):
    ### BEGIN SOLUTION
    return [k * v for v in x]
    ### END SOLUTION


# %% {SCALE_TEST}
assert scale([1, 2], 3) == [3, 6]

# %% [markdown] {WHY}
# Why does `add` need no loop?
#
# ### BEGIN SOLUTION
# Because Python's `+` already adds two numbers in one step.
# ### END SOLUTION
'''


def write_solution(folder, text=SOLUTION, name="00_add.py"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def cell(nb, grade_id):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def test_generate_replaces_solutions_and_removes_hidden_tests(tmp_path):
    nb = labs.generate_lab(write_solution(tmp_path))
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code", "code", "code", "markdown"]
    assert cell(nb, "add_impl").source == (
        'def add(a, b):\n    """The sum of a and b."""\n    # YOUR CODE HERE\n    raise NotImplementedError()'
    )
    assert cell(nb, "scale_impl").source == "def scale(x, k):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    assert cell(nb, "add_test").source == "assert add(1, 2) == 3"  # visible assert kept, hidden gone
    assert cell(nb, "why").source == "Why does `add` need no loop?\n\nYOUR ANSWER HERE"
    meta = dict(cell(nb, "add_test").metadata["nbgrader"])
    assert meta.pop("checksum") and meta.pop("cell_type") == "code"  # nbgrader's, see the checksum test
    assert meta == json.loads(ADD_TEST.split("=", 1)[1])
    assert cell(nb, "add_test").metadata["editable"] is False  # locked: read-only, as nbgrader does
    assert cell(nb, "add_impl").metadata["deletable"] is False and "editable" not in cell(nb, "add_impl").metadata
    assert nb.metadata == {"kernelspec": labs.KERNELSPEC, "language_info": {"name": "python"}}
    assert [c.id for c in nb.cells] == [f"cell-{i}" for i in range(6)]
    text = labs.lab_text(nb)
    for secret in ("secret sauce", "hidden:", "BEGIN", "END SOLUTION", "Because", "[k * v"):
        assert secret not in text
    nbformat.validate(nbformat.reads(text, as_version=4))


def test_generate_is_deterministic(tmp_path):
    solution = write_solution(tmp_path / "solutions")
    assert labs.generate_labs(tmp_path / "solutions", tmp_path / "labs") == [tmp_path / "labs" / "00_add.ipynb"]
    first = (tmp_path / "labs" / "00_add.ipynb").read_bytes()
    assert labs.generate_labs(tmp_path / "solutions", tmp_path / "labs") == []  # unchanged: not rewritten
    other = write_solution(tmp_path / "elsewhere")  # same text, other place: same bytes
    assert labs.lab_text(labs.generate_lab(other)).encode() == first
    assert labs.lab_text(labs.generate_lab(solution)).encode() == first
    assert b'"outputs": []' in first and b'"execution_count": null' in first and b"jupytext" not in first


def test_labs_carry_nbgrader_checksums(tmp_path):
    """nbgrader's checksum, computed here by hand: md5 of source, type, grade, solution, locked, id, points."""
    import hashlib

    nb = labs.generate_lab(write_solution(tmp_path))

    def by_hand(c, locked):
        meta = c.metadata["nbgrader"]
        parts = [c.source, c.cell_type, str(meta["grade"]), str(meta["solution"]), str(locked), meta["grade_id"]]
        if meta["grade"]:
            parts.append(str(float(meta["points"])))
        return hashlib.md5("".join(parts).encode()).hexdigest()

    for grade_id, locked in (("add_impl", False), ("add_test", True), ("why", False)):
        meta = cell(nb, grade_id).metadata["nbgrader"]
        assert meta["checksum"] == by_hand(cell(nb, grade_id), locked), grade_id
        assert meta["cell_type"] == cell(nb, grade_id).cell_type
    edited = cell(nb, "add_test")
    edited.source = "assert True"
    assert labs.compute_checksum(edited) != edited.metadata["nbgrader"]["checksum"]  # validate's test
    assert "checksum" not in nb.cells[0].metadata.get("nbgrader", {})


def test_solution_without_markers_is_replaced_whole(tmp_path):
    text = HEADER + f"\n# %% {ADD_IMPL}\ndef add(a, b):\n    return a + b\n"
    nb = labs.generate_lab(write_solution(tmp_path, text))
    assert nb.cells[0].source == "# YOUR CODE HERE\nraise NotImplementedError()"


def test_helpers_for_course_tests(tmp_path):
    solution = write_solution(tmp_path / "solutions")
    write_solution(tmp_path / "solutions", "x = 1\n", name="_helpers.py")
    assert labs.iter_solutions(tmp_path / "solutions") == [solution]
    assert labs.lab_path_for(solution, tmp_path / "labs") == tmp_path / "labs" / "00_add.ipynb"
    full = labs.solution_as_notebook(solution)
    assert "total = a + b" in cell(full, "add_impl").source and "hidden:" in cell(full, "add_test").source
    with pytest.raises(FileNotFoundError, match="solutions folder"):
        labs.iter_solutions(tmp_path / "nope")


# --------------------------------------------------------------------------------------------------
# Bad solutions
# --------------------------------------------------------------------------------------------------

BAD = {
    "begin without end": (f"# %% {ADD_IMPL}\ndef f():\n    ### BEGIN SOLUTION\n    return 1\n", "never closed"),
    "end without begin": (f"# %% {ADD_IMPL}\ndef f():\n    return 1\n    ### END SOLUTION\n", "without a matching"),
    "nested": (f"# %% {ADD_TEST}\n### BEGIN HIDDEN TESTS\n### BEGIN SOLUTION\nx\n### END SOLUTION\n"
               "### END HIDDEN TESTS\n", "cannot nest"),
    "wrong end": (f"# %% {ADD_IMPL}\n### BEGIN SOLUTION\nx = 1\n### END HIDDEN TESTS\n", "without a matching"),
    "across cells": (f"# %% {ADD_IMPL}\n### BEGIN SOLUTION\nx = 1\n\n# %% {ADD_TEST}\n### END SOLUTION\n",
                     "never closed"),
    "misspelled": (f"# %% {ADD_IMPL}\n## BEGIN SOLUTION\nx = 1\n## END SOLUTION\n", "looks like a marker"),
    "no solution": (f"# %% {ADD_TEST}\nassert True\n", "no solution region"),
    "no points": ('# %% nbgrader={"grade": true, "grade_id": "t", "solution": false}\nassert True\n', '"points"'),
    "no grade_id": ('# %% nbgrader={"grade": true, "points": 1, "solution": false}\nassert True\n', "grade_id"),
    "bad json": ('# %% nbgrader={"grade": true, "grade_id": "t", "points": 1,}\nassert True\n', "must be JSON"),
    "markers outside solution cell": ("# %%\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n", "not a solution cell"),
    "hidden tests outside test cell": (f"# %% {ADD_IMPL}\n### BEGIN HIDDEN TESTS\nx\n### END HIDDEN TESTS\n",
                                       "not an autograder test cell"),
    "duplicate grade_id": (f"# %% {ADD_IMPL}\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n\n"
                           f"# %% {ADD_IMPL}\ny = 2\n", "already used"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_solution_raises_clear_error(tmp_path, case):
    body, message = BAD[case]
    path = write_solution(tmp_path, HEADER + "\n" + body)
    with pytest.raises(labs.LabFormatError, match=message) as info:
        labs.generate_lab(path)
    assert str(path) in str(info.value)  # the message names the file


# --------------------------------------------------------------------------------------------------
# check_labs
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def course(tmp_path):
    solutions, lab_dir = tmp_path / "solutions", tmp_path / "labs"
    write_solution(solutions)
    labs.generate_labs(solutions, lab_dir)
    return solutions, lab_dir


def test_check_labs_clean(course):
    assert labs.check_labs(*course) == []
    assert labs.main(["check", *map(str, course)]) == 0


def test_check_labs_reports_hand_edit(course, capsys):
    solutions, lab_dir = course
    lab = lab_dir / "00_add.ipynb"
    nb = nbformat.read(lab, as_version=4)
    nb.cells[1].source = "def add(a, b):\n    return a + b"
    nbformat.write(nb, lab)
    problems = labs.check_labs(solutions, lab_dir)
    assert len(problems) == 1 and "differs" in problems[0] and "cell 2" in problems[0]
    assert labs.main(["check", str(solutions), str(lab_dir)]) == 1
    assert "differs" in capsys.readouterr().out


def test_check_labs_reports_leaks_missing_and_extra(course):
    solutions, lab_dir = course
    lab = lab_dir / "00_add.ipynb"
    nb = nbformat.read(lab, as_version=4)
    nb.cells[1].source += "\n    total = a + b  # the secret sauce of this lab"  # a solution-only line
    nb.cells[2].source += "\n### BEGIN HIDDEN TESTS"
    nbformat.write(nb, lab_dir / "00_add.ipynb")
    problems = "\n".join(labs.check_labs(solutions, lab_dir))
    assert "leaks an answer" in problems and "'BEGIN SOLUTION'" not in problems and "'HIDDEN TESTS'" in problems
    lab.rename(lab_dir / "99_old.ipynb")
    problems = "\n".join(labs.check_labs(solutions, lab_dir))
    assert "00_add.ipynb: missing" in problems and "99_old.ipynb: no solution" in problems


def test_secret_lines_skip_lines_that_also_appear_outside_regions(tmp_path):
    text = HEADER + (f"\n# %% {ADD_IMPL}\nresult = compute_everything(a, b)\n### BEGIN SOLUTION\n"
                     "result = compute_everything(a, b)\nanswer = the_real_secret_formula(a)\nreturn x\n"
                     "### END SOLUTION\n")
    secrets = labs.secret_lines(labs.read_solution(write_solution(tmp_path, text)))
    assert secrets == {"answer = the_real_secret_formula(a)"}  # short `return x` and shared line excluded


# --------------------------------------------------------------------------------------------------
# Grading (one kernel per notebook; all graded once)
# --------------------------------------------------------------------------------------------------


def submission(lab_nb, answers=None, tests=None, drop=()):
    """A copy of the lab where the student filled `answers` / edited `tests` (grade_id -> source)."""
    nb = nbformat.from_dict(json.loads(json.dumps(lab_nb)))
    for grade_id, source in {**(answers or {}), **(tests or {})}.items():
        cell(nb, grade_id).source = source
    nb.cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") not in drop]
    return nb


ADD_OK = "def add(a, b):\n    return a + b"
SCALE_OK = "def scale(x, k):\n    return [k * v for v in x]"


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the solution (CLI, --json) and five students (grade_dir) once; tests read the results."""
    root = tmp_path_factory.mktemp("grading")
    solution = write_solution(root / "solutions")
    lab = labs.generate_lab(solution)
    subs = root / "submissions"
    students = {
        "alice": submission(lab, {"add_impl": ADD_OK, "scale_impl": SCALE_OK}),
        "bob": submission(lab, {"add_impl": "def add(a, b):\n    return a - b", "scale_impl": SCALE_OK},
                          tests={"add_test": "assert True"}),
        "carol": submission(lab, {"add_impl": ADD_OK}),
        "dave": submission(lab, {"add_impl": "def add(a, b):\n    return 3", "scale_impl": SCALE_OK},
                           drop=("scale_test",)),
        "untouched": lab,
    }
    for name, nb in students.items():
        labs.write_lab(nb, subs / name / "00_add.ipynb")
    (subs / "eve").mkdir()
    (subs / "eve" / "00_add.ipynb").write_text('{"cells": [', encoding="utf-8")
    labs.write_lab(labs.solution_as_notebook(solution), root / "instructor" / "00_add.ipynb")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MMALIGN_PROFILE", raising=False)  # the grader's default profile is ci
        status = labs.main(["grade", str(root / "instructor" / "00_add.ipynb"), "--solution", str(solution),
                            "--json", str(root / "solution.json")])
        rows = labs.grade_dir(subs, root / "solutions", log=lambda line: None)
    assert status == 0
    with open(subs / "grades.csv", newline="") as f:
        table = list(csv.DictReader(f))
    return {
        "solution": json.loads((root / "solution.json").read_text()),
        "rows": {row["student"]: row for row in rows},
        "csv": {row["student"]: row for row in table},
        "root": root,
    }


def earned(result):
    return {row["grade_id"]: row["earned"] for row in result["cells"]}


def test_solution_gets_full_marks(graded):
    result = graded["solution"]
    assert earned(result) == {"add_test": 2, "scale_test": 3}
    assert (result["score"], result["max_score"]) == (5, 5)
    assert result["manual"] == [{"grade_id": "why", "points": 1, "earned": 0, "status": "needs manual grading"}]
    assert result["total_max"] == 6 and [p for p in result["problems"] if p != sandbox.NO_SANDBOX] == []


def test_untouched_lab_gets_zero(graded):
    result = graded["rows"]["untouched"]["result"]
    assert result["manual"] == [{"grade_id": "why", "points": 1, "earned": 0, "status": "unanswered"}]
    assert (result["score"], result["total_max"]) == (0, 6)  # nbgrader: untouched manual answer scores 0
    assert earned(result) == {"add_test": 0, "scale_test": 0} and result["max_score"] == 5
    assert all(row["status"] == "failed" and "NotImplementedError" in row["error"] for row in result["cells"])


def test_correct_student_gets_full_marks(graded):
    assert graded["rows"]["alice"]["result"]["score"] == 5


def test_edited_visible_test_does_not_help(graded):
    result = graded["rows"]["bob"]["result"]
    assert earned(result) == {"add_test": 0, "scale_test": 3}  # the instructor's test ran, not `assert True`
    assert result["cells"][0]["error"] == "AssertionError at `assert add(1, 2) == 3`"


def test_partial_submission_gets_partial_marks(graded):
    assert earned(graded["rows"]["carol"]["result"]) == {"add_test": 2, "scale_test": 0}


def test_hidden_tests_and_missing_cells(graded):
    result = graded["rows"]["dave"]["result"]
    rows = {row["grade_id"]: row for row in result["cells"]}
    assert rows["add_test"]["status"] == "failed" and "hidden: negative numbers" in rows["add_test"]["error"]
    assert rows["scale_test"]["status"] == "missing" and result["score"] == 0
    assert any("'scale_test' is missing" in p for p in result["problems"])


def test_grade_dir_csv_and_broken_notebook(graded):
    table = graded["csv"]
    assert {name: (row["lab"], row["score"], row["max"]) for name, row in table.items()} == {
        "alice": ("00_add", "5", "5"), "bob": ("00_add", "3", "5"), "carol": ("00_add", "2", "5"),
        "dave": ("00_add", "0", "5"), "eve": ("00_add", "0", ""), "untouched": ("00_add", "0", "5"),
    }
    assert "eve/00_add.ipynb is not a readable Jupyter notebook" in table["eve"]["notes"]


def test_grade_errors_name_the_file(graded, capsys):
    root = graded["root"]
    broken = root / "submissions" / "eve" / "00_add.ipynb"
    assert labs.main(["grade", str(broken), "--solution", str(root / "solutions" / "00_add.py")]) == 2
    assert f"{broken} is not a readable Jupyter notebook" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="pass --solution"):
        labs.grade_notebook(broken, solutions_dir=root / "nowhere")
    report = labs.format_report(graded["rows"]["dave"]["result"])
    assert "total: 0 / 5" in report and "manual answer why: unanswered, 0 / 1" in report
    assert "manual grading needed: why" in labs.format_report(graded["solution"])

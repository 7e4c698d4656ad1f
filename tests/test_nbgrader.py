"""The labs with the real nbgrader: same student version, same scores, checksums that validate reads.

Needs the optional ``[instructor]`` extra (``pip install -e .[instructor]``, which .ci/run installs);
skipped with a message where nbgrader is absent. One chapter (lab 3) goes through nbgrader's
``generate_assignment`` and ``autograde`` and through ``mmalign.labs grade`` with three submissions:
untouched, the solution, and one wrong answer (about 2-4 minutes on 2 cores: six notebook runs).
"""

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mmalign import labs

nbgrader = pytest.importorskip(
    "nbgrader", reason="nbgrader is not installed: pip install -e .[instructor] (instructors only)"
)

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "03_sampling"
ASSIGNMENT = "lab3"
NBGRADER = Path(sys.executable).with_name("nbgrader")
WRONG_SEMI_HARD = '''def my_semi_hard(sim, ids, margin=0.2):
    # wrong: the hardest negative everywhere, the semi-hard window ignored
    valid = ids[:, None] != ids[None, :]
    neg_i = sim.masked_fill(~valid, float("-inf")).argmax(1)
    neg_t = sim.T.masked_fill(~valid.T, float("-inf")).argmax(1)
    return neg_i, neg_t'''


def _by_id(nb):
    return {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in nb.cells if "nbgrader" in c.metadata}


def _comparable(nb):
    """What a student sees and nbgrader reads: type, source, nbgrader metadata, lock flags, per cell."""
    return [(c.cell_type, c.source.strip(), c.metadata.get("nbgrader"), c.metadata.get("editable"),
             c.metadata.get("deletable")) for c in nb.cells]


def _submissions():
    lab = nbformat.read(labs.lab_path_for(CHAPTER, ROOT / "labs"), as_version=4)
    solution = _by_id(labs.solution_as_notebook(ROOT / "solutions" / f"{CHAPTER}.py"))
    solved = copy.deepcopy(lab)
    for grade_id, cell in _by_id(solved).items():
        if cell.metadata["nbgrader"].get("solution"):
            cell.source = solution[grade_id].source
    wrong = copy.deepcopy(solved)
    _by_id(wrong)["semi_hard_impl"].source = WRONG_SEMI_HARD
    return {"untouched": lab, "solved": solved, "wrong": wrong}


def _run(args, cwd):
    env = dict(os.environ, PATH=f"{NBGRADER.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               MMALIGN_PROFILE="ci", MPLBACKEND="Agg")
    proc = subprocess.run([str(NBGRADER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """An nbgrader course with lab 3, its release, and three autograded submissions."""
    root = tmp_path_factory.mktemp("nbgrader_course")
    (root / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        f"c.CourseDirectory.root = {str(root)!r}\n"
        "c.CourseDirectory.course_id = 'mmalign'\n"
        "c.ExecutePreprocessor.timeout = 600\n"
        "c.Execute.timeout = 600\n",
        encoding="utf-8",
    )
    source = root / "source" / ASSIGNMENT / f"{CHAPTER}.ipynb"
    source.parent.mkdir(parents=True)
    nbformat.write(labs.solution_as_notebook(ROOT / "solutions" / f"{CHAPTER}.py"), source)
    _run(["generate_assignment", ASSIGNMENT, "--force"], root)
    subs = _submissions()
    ours = {}
    for student, nb in subs.items():
        path = root / "submitted" / student / ASSIGNMENT / f"{CHAPTER}.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(nb, path)
        mine = root / "mine" / student / f"{CHAPTER}.ipynb"
        mine.parent.mkdir(parents=True)
        nbformat.write(nb, mine)
        ours[student] = labs.grade_notebook(mine, ROOT / "solutions" / f"{CHAPTER}.py", profile="ci", timeout=600)
    _run(["autograde", ASSIGNMENT, "--force"], root)
    from nbgrader.api import Gradebook

    theirs = {}
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        for student in subs:
            notebook = gb.find_submission_notebook(CHAPTER, ASSIGNMENT, student)
            theirs[student] = {
                "score": notebook.score,
                "max_score": notebook.max_score,
                "cells": {g.name: (g.auto_score, g.max_score) for g in notebook.grades},
            }
    return {"root": root, "ours": ours, "theirs": theirs}


def test_generate_assignment_gives_the_committed_lab(course):
    released = nbformat.read(course["root"] / "release" / ASSIGNMENT / f"{CHAPTER}.ipynb", as_version=4)
    committed = nbformat.read(labs.lab_path_for(CHAPTER, ROOT / "labs"), as_version=4)
    assert _comparable(released) == _comparable(committed)


@pytest.mark.parametrize("student", ["untouched", "solved", "wrong"])
def test_autograde_scores_equal_ours(course, student):
    ours, theirs = course["ours"][student], course["theirs"][student]
    assert ours["score"] == theirs["score"], (ours, theirs)
    assert ours["total_max"] == theirs["max_score"], (ours, theirs)
    for row in ours["cells"]:
        assert theirs["cells"][row["grade_id"]] == (row["earned"], row["points"]), (row, theirs["cells"])
    for row in ours["manual"]:
        auto, points = theirs["cells"][row["grade_id"]]
        expected = 0 if row["status"] == "unanswered" else None  # None: nbgrader waits for a person
        assert (auto, points) == (expected, row["points"]), (row, theirs["cells"])


def test_the_three_submissions_differ_as_expected(course):
    ours = course["ours"]
    assert ours["untouched"]["score"] == 0
    assert ours["solved"]["score"] == ours["solved"]["max_score"] > 0
    earned = {row["grade_id"]: row["earned"] for row in ours["wrong"]["cells"]}
    assert earned["semi_hard_test"] == 0 and earned["training_test"] > 0
    assert [m["status"] for m in ours["untouched"]["manual"]] == ["unanswered"]
    assert [m["status"] for m in ours["solved"]["manual"]] == ["needs manual grading"]


def test_validate_catches_an_edited_locked_cell(tmp_path):
    """nbgrader's validator, with its checksum check only (its execution step would rerun the lab)."""
    from nbgrader.preprocessors import CheckCellMetadata
    from nbgrader.validator import Validator

    lab = labs.lab_path_for(CHAPTER, ROOT / "labs")
    shutil.copy(lab, tmp_path / "untouched.ipynb")
    nb = nbformat.read(lab, as_version=4)
    _by_id(nb)["semi_hard_test"].source = "assert True  # the tests are easier this way"
    nbformat.write(nb, tmp_path / "edited.ipynb")
    validator = Validator()
    validator.preprocessors = [CheckCellMetadata]
    assert "changed" not in validator.validate(str(tmp_path / "untouched.ipynb"))
    changed = validator.validate(str(tmp_path / "edited.ipynb"))["changed"]
    assert [cell["source"] for cell in changed] == ["assert True  # the tests are easier this way"]

"""Labs from solutions, and grading of submissions: an nbgrader-style workflow without nbgrader.

Instructors keep ``solutions/NN_name.py`` (jupytext percent format). Answers sit between
``### BEGIN SOLUTION`` / ``### END SOLUTION``, hidden tests between ``### BEGIN HIDDEN TESTS`` /
``### END HIDDEN TESTS``, and every nbgrader cell carries its metadata as JSON on its ``# %%``
line, exactly as jupytext writes it::

    # %% nbgrader={"grade": false, "grade_id": "add_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
    def add(a, b):
        ### BEGIN SOLUTION
        return a + b
        ### END SOLUTION

    # %% nbgrader={"grade": true, "grade_id": "add_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
    assert add(1, 2) == 3
    ### BEGIN HIDDEN TESTS
    assert add(-1, 1) == 0
    ### END HIDDEN TESTS

Command line (run from the repository root)::

    python -m mmalign.labs generate [solutions] [labs]      # write labs/NN_name.ipynb
    python -m mmalign.labs check [solutions] [labs]         # exit 1 when a lab is stale or leaks
    python -m mmalign.labs grade SUB.ipynb [--solution solutions/NN_name.py] [--timeout 300] [--json out.json]
    python -m mmalign.labs grade-dir DIR [--solutions solutions] [--csv DIR/grades.csv] [--memory-limit 4096]

What the pieces do, in nbgrader terms:

* ``generate`` is ``nbgrader generate_assignment``: solution regions become ``# YOUR CODE HERE`` /
  ``raise NotImplementedError()`` (``YOUR ANSWER HERE`` in markdown), a solution cell without
  markers is replaced as a whole, hidden tests are deleted, outputs are stripped, locked cells are
  made read-only and every graded, solution or locked cell carries nbgrader's ``checksum`` (so
  ``nbgrader validate`` catches an edited locked cell). The output is deterministic.
* ``grade`` is ``nbgrader autograde`` where the submission cannot forge its grade: the student's
  code cells run in a separate, sandboxed process (:mod:`mmalign.labs.sandbox`) from which the
  library objects the lab asks for were taken away; the instructor's test cells, hidden tests
  included (matched by ``grade_id``), run in the grader's process, where each answer is a proxy
  that asks the student's process for *values* (:mod:`mmalign.labs.remote`), loaded safely and
  compared there. A test cell earns its points when it runs without error in the grader. A
  manually graded answer (``grade: true``, ``solution: true``) left untouched scores 0 (as in
  nbgrader); an edited one waits for the instructor. Lines that reach into the kernel, the
  library or the system are listed for a person to read (:mod:`mmalign.labs.review`).

Where things are: :mod:`~mmalign.labs.notebook` (reading and validating solution files, nbgrader
metadata, checksums), :mod:`~mmalign.labs.generation`, :mod:`~mmalign.labs.checking`,
:mod:`~mmalign.labs.grading` (with :mod:`~mmalign.labs.remote`, :mod:`~mmalign.labs.runner`, the
code that runs in the student's process, :mod:`~mmalign.labs.sandbox` and :mod:`~mmalign.labs.review`),
:mod:`~mmalign.labs.testing` (helpers for test cells) and :mod:`~mmalign.labs.cli`.

Grading executes student code: with bubblewrap it runs in a sandbox; without it, grade in a
container or a throwaway account, never as yourself on a machine holding anything of value.
"""

import importlib

# ``import mmalign.labs`` is cheap (nbformat and the grader load on first use): a test cell in a student's
# kernel imports ``mmalign.labs.testing`` without paying for nbformat's schema validator.
_EXPORTS = {
    "checking": ("check_labs", "secret_lines"),
    "cli": ("main",),
    "generation": ("generate_lab", "generate_labs", "lab_text", "write_lab"),
    "grading": ("format_report", "grade_dir", "grade_notebook", "lab_config"),
    "notebook": ("CODE_STUB", "CSV_COLUMNS", "FORBIDDEN_IN_LABS", "HEADER_EXAMPLE", "KERNELSPEC", "LEAK_MIN_CHARS",
                 "MARKDOWN_STUB", "LabFormatError", "compute_checksum", "iter_solutions", "lab_path_for",
                 "read_solution", "solution_as_notebook"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = ("checking", "cli", "generation", "grading", "notebook", "remote", "review", "runner", "sandbox",
               "testing")

__all__ = [
    "LabFormatError",
    "iter_solutions",
    "lab_path_for",
    "read_solution",
    "solution_as_notebook",
    "compute_checksum",
    "generate_lab",
    "lab_text",
    "write_lab",
    "generate_labs",
    "check_labs",
    "grade_notebook",
    "grade_dir",
    "format_report",
    "lab_config",
    "secret_lines",
    "main",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE) | set(_SUBMODULES))

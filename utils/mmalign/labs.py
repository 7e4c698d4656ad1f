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
    python -m mmalign.labs grade-dir DIR [--solutions solutions] [--csv DIR/grades.csv]

What the pieces do, in nbgrader terms:

* ``generate`` is ``nbgrader generate_assignment``: solution regions become ``# YOUR CODE HERE`` /
  ``raise NotImplementedError()`` (``YOUR ANSWER HERE`` in markdown), a solution cell without
  markers is replaced as a whole, hidden tests are deleted, outputs are stripped, locked cells are
  made read-only. The output is deterministic (same solution, byte-identical lab).
* ``grade`` is ``nbgrader autograde``: every autograder test cell of the submission (``grade: true``,
  ``solution: false``) is replaced by the instructor's version, hidden tests included, matched by
  ``grade_id``; the notebook runs top to bottom and a test cell earns its points when it runs
  without error. Manually graded answers (``grade: true``, ``solution: true``) are listed, not scored.

Grading executes student code: run it in a container or a throwaway account, never as yourself on
a machine holding anything of value.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import re
import sys
from pathlib import Path

import nbformat

__all__ = [
    "LabFormatError",
    "iter_solutions",
    "lab_path_for",
    "read_solution",
    "solution_as_notebook",
    "generate_lab",
    "lab_text",
    "write_lab",
    "generate_labs",
    "check_labs",
    "grade_notebook",
    "grade_dir",
    "format_report",
    "secret_lines",
    "main",
]

CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
MARKDOWN_STUB = "YOUR ANSWER HERE"
SOLUTION, HIDDEN = "SOLUTION", "HIDDEN TESTS"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
FORBIDDEN_IN_LABS = ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS")
CSV_COLUMNS = ["student", "lab", "score", "max", "notes"]
LEAK_MIN_CHARS = 25  # region lines at least this long (stripped) must never appear in a lab
HEADER_EXAMPLE = (
    '# %% nbgrader={"grade": true, "grade_id": "my_test", "locked": true, "points": 1, '
    '"schema_version": 3, "solution": false, "task": false}'
)

_MARKER = re.compile(r"^(?P<indent>\s*)###\s*(?P<edge>BEGIN|END)\s+(?P<kind>SOLUTION|HIDDEN TESTS)\s*$")
# Lines that look like markers but are not (e.g. '## BEGIN SOLUTION', '### begin solution'):
_MARKER_LIKE = re.compile(r"\b(BEGIN|END)\s+(SOLUTION|HIDDEN\s+TESTS)")
_MARKER_LIKE_LOWER = re.compile(r"^\s*#+\s*(begin|end)\s+(solution|hidden\s+tests)", re.IGNORECASE)
_LINE_ARROW = re.compile(r"^-+>\s*\d*\s?")  # IPython's '----> 3 ' in front of the failing line
_GRADE_ID = re.compile(r"^[A-Za-z0-9_\-]+$")
_KEPT_CELL_METADATA = ("nbgrader", "tags")


class LabFormatError(ValueError):
    """A solution file (or a submission) that the lab tooling cannot use; the message says why."""


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def iter_solutions(solutions_dir="solutions") -> list[Path]:
    """The solution files of ``solutions_dir``: every ``*.py`` except ``_*.py`` and ``conftest.py``.

    Sorted by name, so labs are processed in chapter order.
    """
    solutions_dir = Path(solutions_dir)
    if not solutions_dir.is_dir():
        raise FileNotFoundError(
            f"solutions folder {solutions_dir} does not exist; run from the repository root or "
            "pass the folder (python -m mmalign.labs generate SOLUTIONS_DIR LABS_DIR)."
        )
    return sorted(
        p for p in solutions_dir.glob("*.py") if not p.name.startswith(("_", ".")) and p.name != "conftest.py"
    )


def lab_path_for(solution_path, labs_dir="labs") -> Path:
    """Where the lab of ``solutions/NN_name.py`` lives: ``labs/NN_name.ipynb``."""
    return Path(labs_dir) / (Path(solution_path).stem + ".ipynb")


# --------------------------------------------------------------------------------------------------
# Reading and validating a solution
# --------------------------------------------------------------------------------------------------


def _where(path, index: int, cell) -> str:
    """'solutions/x.py, cell 3 (grade_id 'add_test')' or '..., cell 3 (starting 'def add(a, b):')'."""
    grade_id = _nbgrader(cell).get("grade_id")
    if grade_id:
        return f"{path}, cell {index + 1} (grade_id {grade_id!r})"
    first = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
    return f"{path}, cell {index + 1} (starting {first[:50]!r})"


def _nbgrader(cell) -> dict:
    """The cell's nbgrader metadata, or {} when it has none (or something that is not a dict)."""
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def _is_solution(cell) -> bool:
    return bool(_nbgrader(cell).get("solution"))


def _is_test(cell) -> bool:
    """An autograder test cell: graded and not a solution."""
    meta = _nbgrader(cell)
    return bool(meta.get("grade")) and not meta.get("solution")


def _is_manual(cell) -> bool:
    """A manually graded answer: graded and a solution."""
    meta = _nbgrader(cell)
    return bool(meta.get("grade")) and bool(meta.get("solution"))


def _split_regions(source: str, where: str) -> list[tuple[str | None, str, list[str]]]:
    """Cut a cell's lines into ``(kind, indent, lines)`` runs; kind is None outside any region.

    A region's lines exclude its two marker lines; ``indent`` is the BEGIN marker's indentation.
    Raises :class:`LabFormatError` on an unbalanced, nested or misspelled marker.
    """
    runs: list[tuple[str | None, str, list[str]]] = [(None, "", [])]
    open_kind = None
    for number, line in enumerate(source.splitlines(), 1):
        match = _MARKER.match(line)
        if match is None:
            if _MARKER_LIKE.search(line) or _MARKER_LIKE_LOWER.match(line):
                raise LabFormatError(
                    f"{where}, line {number}: {line.strip()!r} looks like a marker but is not one; "
                    "write exactly '### BEGIN SOLUTION', '### END SOLUTION', '### BEGIN HIDDEN TESTS' "
                    "or '### END HIDDEN TESTS' alone on its line."
                )
            runs[-1][2].append(line)
            continue
        edge, kind = match["edge"], match["kind"]
        if edge == "BEGIN":
            if open_kind is not None:
                raise LabFormatError(
                    f"{where}, line {number}: '### BEGIN {kind}' inside an open '{open_kind}' region; "
                    f"close it with '### END {open_kind}' first (regions cannot nest)."
                )
            open_kind = kind
            runs.append((kind, match["indent"], []))
        else:
            if open_kind != kind:
                found = f"the open region is '{open_kind}'" if open_kind else "no region is open"
                raise LabFormatError(
                    f"{where}, line {number}: '### END {kind}' without a matching '### BEGIN {kind}' "
                    f"({found}); add the BEGIN marker or remove this line."
                )
            open_kind = None
            runs.append((None, "", []))
    if open_kind is not None:
        raise LabFormatError(
            f"{where}: '### BEGIN {open_kind}' is never closed in this cell; add '### END {open_kind}' "
            "before the next '# %%' (a region must start and end in the same cell)."
        )
    return [run for run in runs if run[0] is not None or run[2]]


def _check_metadata(cell, where: str) -> None:
    """Raise when the cell's nbgrader metadata is missing pieces nbgrader (and the grader) need."""
    bad = cell.metadata.get("incorrectly_encoded_metadata")
    if bad is not None:
        raise LabFormatError(
            f"{where}: jupytext could not read the metadata {bad!r} on the '# %%' line; it must be "
            f"JSON (double quotes, true/false, no trailing comma), e.g.\n{HEADER_EXAMPLE}"
        )
    if "nbgrader" not in cell.metadata:
        return
    meta = cell.metadata["nbgrader"]
    if not isinstance(meta, dict):
        raise LabFormatError(f"{where}: nbgrader metadata must be a JSON object, got {meta!r}.")
    grade_id = meta.get("grade_id")
    if not isinstance(grade_id, str) or not _GRADE_ID.match(grade_id):
        raise LabFormatError(
            f"{where}: nbgrader cells need a grade_id made of letters, digits, '_' and '-' "
            f'(got {grade_id!r}); add e.g. "grade_id": "recall_test" to the metadata.'
        )
    for key in ("grade", "solution"):
        if not isinstance(meta.get(key), bool):
            raise LabFormatError(
                f'{where}: nbgrader metadata needs "{key}": true or false (got {meta.get(key)!r}).'
            )
    if meta.get("task"):
        raise LabFormatError(f'{where}: task cells are not supported; set "task": false.')
    if meta["grade"]:
        points = meta.get("points")
        if isinstance(points, bool) or not isinstance(points, (int, float)) or points < 0:
            raise LabFormatError(
                f'{where}: a graded cell needs "points": a number >= 0 (got {points!r}); '
                'add e.g. "points": 1 to the metadata.'
            )
    if _is_test(cell) and cell.cell_type != "code":
        raise LabFormatError(
            f"{where}: an autograder test cell (grade true, solution false) must be a code cell."
        )


def _check_regions(cell, where: str) -> None:
    """Raise when markers are unbalanced, or sit in a cell whose metadata does not allow them."""
    kinds = {kind for kind, _, _ in _split_regions(cell.source, where) if kind}
    if SOLUTION in kinds and not _is_solution(cell):
        raise LabFormatError(
            f"{where}: has a SOLUTION region but is not a solution cell; put nbgrader metadata with "
            '"solution": true on its \'# %%\' line, e.g.\n'
            '# %% nbgrader={"grade": false, "grade_id": "my_impl", "locked": false, "schema_version": 3, '
            '"solution": true, "task": false}'
        )
    if HIDDEN in kinds and not _is_test(cell):
        raise LabFormatError(
            f"{where}: has a HIDDEN TESTS region but is not an autograder test cell, so the grader "
            'would never run it; give the cell "grade": true, "solution": false and "points".'
        )


def _check_notebook(nb, path) -> None:
    """Validate every cell, grade_id uniqueness, and that the lab asks for at least one answer."""
    seen: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        where = _where(path, index, cell)
        _check_metadata(cell, where)
        _check_regions(cell, where)
        grade_id = _nbgrader(cell).get("grade_id")
        if grade_id in seen:
            raise LabFormatError(
                f"{where}: grade_id {grade_id!r} is already used by cell {seen[grade_id] + 1}; "
                "grade_ids must be unique within a lab."
            )
        if grade_id:
            seen[grade_id] = index
    if not any(_is_solution(cell) for cell in nb.cells):
        raise LabFormatError(
            f"{path}: has no solution region, so the lab would ask nothing; wrap the answers in "
            "'### BEGIN SOLUTION' / '### END SOLUTION' inside cells whose '# %%' line carries "
            'nbgrader metadata with "solution": true.'
        )


def read_solution(solution_path) -> nbformat.NotebookNode:
    """Read ``solutions/NN_name.py`` with jupytext (percent format) and validate it.

    Raises :class:`FileNotFoundError` when the file is missing and :class:`LabFormatError` when it is
    not a lab: no ``# %%`` cells, unreadable or incomplete nbgrader metadata, unbalanced markers,
    duplicate grade_ids, or no solution at all.
    """
    import jupytext  # imported here: grading a folder does not need it at import time

    path = Path(solution_path)
    if not path.is_file():
        raise FileNotFoundError(f"no solution file {path}; check the name (solutions/NN_name.py).")
    text = path.read_text(encoding="utf-8")
    if not re.search(r"^# %%", text, re.MULTILINE):
        raise LabFormatError(f"{path}: no '# %%' cell marker; solutions are jupytext percent files.")
    nb = jupytext.reads(text, fmt="py:percent")
    _check_notebook(nb, path)
    return nb


def _normalize(nb) -> nbformat.NotebookNode:
    """Deterministic notebook: python3 kernel, nbformat 4.5, ids ``cell-<index>``, no outputs.

    Cell metadata keeps only nbgrader and tags (jupytext layout hints are dropped).
    """
    out = nbformat.v4.new_notebook()
    out.metadata = nbformat.from_dict({"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}})
    for index, cell in enumerate(nb.cells):
        kept = [key for key in _KEPT_CELL_METADATA if key in cell.metadata]
        metadata = {key: copy.deepcopy(cell.metadata[key]) for key in kept}
        if cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(cell.source, metadata=metadata)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(cell.source, metadata=metadata)
        else:
            new = nbformat.v4.new_raw_cell(cell.source, metadata=metadata)
        new.id = f"cell-{index}"
        out.cells.append(new)
    return out


def solution_as_notebook(solution_path) -> nbformat.NotebookNode:
    """The solution file as a notebook, answers and hidden tests included (markers kept as comments).

    This is what "the instructor's notebook" means when grading; write it with :func:`write_lab` to
    grade the solution itself (it must get full marks).
    """
    return _normalize(read_solution(solution_path))


# --------------------------------------------------------------------------------------------------
# Generating labs
# --------------------------------------------------------------------------------------------------


def _clear_source(cell, where: str) -> str:
    """The student's version of one cell's source (regions replaced or removed)."""
    runs = _split_regions(cell.source, where)
    if _is_solution(cell) and not any(kind == SOLUTION for kind, _, _ in runs):
        # nbgrader: a solution cell without markers is an answer as a whole.
        return "\n".join(CODE_STUB) if cell.cell_type == "code" else MARKDOWN_STUB
    lines: list[str] = []
    for kind, indent, body in runs:
        if kind is None:
            lines.extend(body)
        elif kind == SOLUTION and cell.cell_type == "code":
            lines.extend(indent + stub for stub in CODE_STUB)
        elif kind == SOLUTION:
            lines.append(MARKDOWN_STUB)
    changed = any(kind for kind, _, _ in runs)
    while changed and lines and not lines[-1].strip():  # a removed trailing region leaves blank lines
        lines.pop()
    return "\n".join(lines) if changed else cell.source


def _lock(cell) -> None:
    """nbgrader's LockCells: locked cells read-only, graded and solution cells undeletable."""
    meta = _nbgrader(cell)
    if not meta:
        return
    if meta.get("locked"):
        cell.metadata["editable"] = False
    if meta.get("locked") or meta.get("grade") or meta.get("solution"):
        cell.metadata["deletable"] = False


def generate_lab(solution_path) -> nbformat.NotebookNode:
    """The student notebook of ``solutions/NN_name.py``: answers cleared, hidden tests removed.

    Code regions become ``# YOUR CODE HERE`` + ``raise NotImplementedError()`` at the marker's
    indentation, markdown regions ``YOUR ANSWER HERE``; nbgrader metadata is kept; outputs and
    execution counts are empty; the same input always gives the same notebook.
    """
    nb = solution_as_notebook(solution_path)
    for index, cell in enumerate(nb.cells):
        cell.source = _clear_source(cell, _where(solution_path, index, cell))
        _lock(cell)
    return nb


def lab_text(nb) -> str:
    """The notebook as the exact text written to disk (nbformat's JSON, sorted keys, final newline)."""
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def write_lab(nb, path) -> bool:
    """Write ``nb`` to ``path`` (creating folders); return False when the file already had that text."""
    path = Path(path)
    text = lab_text(nb)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return True


def generate_labs(solutions_dir="solutions", labs_dir="labs") -> list[Path]:
    """Regenerate every lab; return the labs whose file changed. Stops at the first bad solution."""
    changed = []
    for solution in iter_solutions(solutions_dir):
        lab = lab_path_for(solution, labs_dir)
        if write_lab(generate_lab(solution), lab):
            changed.append(lab)
    return changed


# --------------------------------------------------------------------------------------------------
# Checking committed labs
# --------------------------------------------------------------------------------------------------


def _region_lines(nb) -> tuple[set[str], set[str]]:
    """Stripped lines inside (solution or hidden) regions, and those outside, over all cells."""
    inside, outside = set(), set()
    for cell in nb.cells:
        runs = _split_regions(cell.source, "solution")
        if _is_solution(cell) and not any(kind == SOLUTION for kind, _, _ in runs):
            runs = [(SOLUTION, "", cell.source.splitlines())]  # a whole-cell answer
        for kind, _, body in runs:
            (inside if kind else outside).update(line.strip() for line in body)
    return inside, outside


def secret_lines(solution_nb, min_chars: int = LEAK_MIN_CHARS) -> set[str]:
    """Region lines of at least ``min_chars`` characters that appear nowhere outside the regions."""
    inside, outside = _region_lines(solution_nb)
    return {line for line in inside - outside if len(line) >= min_chars}


def _first_difference(expected: str, actual: str) -> str:
    """'cell 4' (or 'line 12') where two lab texts first differ, for the problem message."""
    try:
        a, b = json.loads(expected)["cells"], json.loads(actual)["cells"]
    except (ValueError, KeyError, TypeError):
        a = b = None
    if a is not None:
        for index, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"cell {index + 1}"
        if len(a) != len(b):
            return f"cell count {len(b)} instead of {len(a)}"
    for number, (x, y) in enumerate(zip(expected.splitlines(), actual.splitlines()), 1):
        if x != y:
            return f"line {number}"
    return "the end of the file"


def _leaks(lab_path: Path, text: str, secrets: set[str]) -> list[str]:
    """Marker text or solution-only lines found in a lab's cells."""
    try:
        cells = json.loads(text).get("cells", [])
    except ValueError as exc:
        return [f"{lab_path}: not valid JSON ({exc}); regenerate it with `python -m mmalign.labs generate`."]
    problems = []
    for index, cell in enumerate(cells):
        blob = json.dumps(cell, ensure_ascii=False)
        for marker in FORBIDDEN_IN_LABS:
            if marker in blob:
                problems.append(
                    f"{lab_path}, cell {index + 1}: contains {marker!r}; the lab leaks solution markup."
                )
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        for line in source.splitlines():
            if line.strip() in secrets:
                problems.append(
                    f"{lab_path}, cell {index + 1}: contains {line.strip()!r}, a line that exists only in "
                    "a solution/hidden region of the solution; the lab leaks an answer."
                )
    return problems


def check_labs(solutions_dir="solutions", labs_dir="labs") -> list[str]:
    """Problems with the committed labs (empty list: all good).

    Reported: a solution that cannot be turned into a lab, a lab missing, an extra lab without a
    solution, a lab that differs from its regeneration, and a lab containing marker text or a line
    (of at least 25 characters) that the solution has only inside its solution/hidden regions.
    """
    labs_dir = Path(labs_dir)
    fix = "run `python -m mmalign.labs generate` (make labs) and commit the result"
    problems: list[str] = []
    solutions = iter_solutions(solutions_dir)
    for solution in solutions:
        lab = lab_path_for(solution, labs_dir)
        try:
            expected = lab_text(generate_lab(solution))
            secrets = secret_lines(read_solution(solution))
        except (LabFormatError, OSError) as exc:
            problems.append(f"{solution}: cannot generate its lab: {exc}")
            continue
        if not lab.is_file():
            problems.append(f"{lab}: missing (solution {solution}); {fix}.")
            continue
        actual = lab.read_text(encoding="utf-8")
        if actual != expected:
            problems.append(
                f"{lab}: differs from the lab generated from {solution} (first at "
                f"{_first_difference(expected, actual)}); labs are never edited by hand, {fix}."
            )
        problems.extend(_leaks(lab, actual, secrets))
    known = {lab_path_for(s, labs_dir) for s in solutions}
    for lab in sorted(labs_dir.glob("*.ipynb")) if labs_dir.is_dir() else []:
        if lab not in known:
            missing = Path(solutions_dir) / (lab.stem + ".py")
            problems.append(f"{lab}: no solution {missing}; delete the lab or add its solution.")
            problems.extend(_leaks(lab, lab.read_text(encoding="utf-8"), set()))
    return problems


# --------------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------------


def _read_submission(path: Path) -> nbformat.NotebookNode:
    """The student's notebook, or a :class:`LabFormatError` naming the file when it is not one."""
    if not path.is_file():
        raise FileNotFoundError(f"no submission {path}.")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:  # nbformat raises NotJSONError, ValidationError, KeyError...
        raise LabFormatError(
            f"{path} is not a readable Jupyter notebook ({type(exc).__name__}: {str(exc)[:200]}); "
            "ask the student to open it in Jupyter, save it and submit again."
        ) from None


def _default_solution(submission: Path, solutions_dir) -> Path:
    """``solutions/<stem>.py`` for ``.../<stem>.ipynb``."""
    return Path(solutions_dir) / (submission.stem + ".py")


def _graded_notebook(student, tests: dict) -> tuple[nbformat.NotebookNode, dict[str, list[int]]]:
    """The notebook to execute: the student's cells with each test cell swapped for the instructor's.

    Returns the notebook and, per test grade_id, the indices of the cells that carry it.
    """
    nb = nbformat.v4.new_notebook()
    nb.metadata = nbformat.from_dict({"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}})
    positions: dict[str, list[int]] = {}
    for index, cell in enumerate(student.cells):
        grade_id = _nbgrader(cell).get("grade_id")
        if isinstance(grade_id, str) and grade_id in tests:
            cell = copy.deepcopy(tests[grade_id])
            positions.setdefault(grade_id, []).append(index)
        else:
            cell = copy.deepcopy(cell)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.id = f"cell-{index}"
        nb.cells.append(cell)
    return nb, positions


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _error_line(cell, reply) -> str | None:
    """One line saying why a cell failed, e.g. "AssertionError at `assert add(2, 2) == 4`"."""
    content = (reply or {}).get("content", {})
    if content.get("ename") == "Timeout":  # our error_on_timeout reply; the output says KeyboardInterrupt
        return f"Timeout: {content.get('evalue')}"
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            message = output.get("ename", "Error") + (f": {output['evalue']}" if output.get("evalue") else "")
            traceback = _strip_ansi("\n".join(output.get("traceback", []))).splitlines()
            failing = [line for line in traceback if line.startswith("---->")]
            if failing and not output.get("evalue"):
                message += f" at `{_LINE_ARROW.sub('', failing[-1]).strip()}`"
            return message[:300]
    if content.get("status") == "error":
        return f"{content.get('ename', 'Error')}: {content.get('evalue', '')}".strip(": ")[:300]
    return None


def _execute(nb, cwd: Path, timeout: int, profile: str) -> tuple[dict[int, dict], str | None]:
    """Run ``nb`` in place (errors allowed); return the execute reply of each cell run and why it stopped."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellControlSignal, DeadKernelError

    replies: dict[int, dict] = {}

    def record(cell, cell_index, execute_reply):
        replies[cell_index] = execute_reply or {"content": {"status": "error", "ename": "NoReply"}}

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        interrupt_on_timeout=True,
        error_on_timeout={"ename": "Timeout", "evalue": f"the cell ran longer than {timeout} s",
                          "traceback": []},
        record_timing=False,
        skip_cells_with_tag="",
        on_cell_executed=record,
        resources={"metadata": {"path": str(cwd)}},
    )
    env = dict(os.environ, MMALIGN_PROFILE=profile)
    try:
        client.execute(env=env)
    except (DeadKernelError, CellControlSignal, RuntimeError) as exc:
        return replies, f"execution stopped: {type(exc).__name__}: {exc}"
    return replies, None


def grade_notebook(submission, solution=None, *, timeout: int = 300, profile: str | None = None,
                   solutions_dir="solutions") -> dict:
    """Autograde one submission against its solution; return the per-cell result and the total.

    ``solution`` defaults to ``solutions_dir/<submission stem>.py``. The notebook runs with kernel
    python3 in the submission's folder, with ``MMALIGN_PROFILE`` = ``profile`` (default: the caller's
    ``MMALIGN_PROFILE``, else ``ci``); ``timeout`` is per cell. Result keys: ``submission``,
    ``solution``, ``lab``, ``cells`` (one dict per test: ``grade_id``, ``points``, ``earned``,
    ``status`` in passed/failed/missing/not run, ``error``), ``score``, ``max_score``, ``manual``
    (manually graded answers: ``grade_id``, ``points``), ``problems`` (notes for the instructor).
    """
    submission = Path(submission)
    solution = Path(solution) if solution is not None else _default_solution(submission, solutions_dir)
    if not solution.is_file():
        raise FileNotFoundError(
            f"no solution {solution} for {submission}; pass --solution solutions/NN_name.py "
            "(or name the submission like its lab)."
        )
    instructor = solution_as_notebook(solution)
    student = _read_submission(submission)
    tests = {_nbgrader(c)["grade_id"]: c for c in instructor.cells if _is_test(c)}
    nb, positions = _graded_notebook(student, tests)
    profile = profile or os.environ.get("MMALIGN_PROFILE", "ci") or "ci"
    replies, stopped = _execute(nb, submission.resolve().parent, timeout, profile)

    problems = [stopped] if stopped else []
    cells = []
    for grade_id, test in tests.items():
        points = _nbgrader(test)["points"]
        row = {"grade_id": grade_id, "points": points, "earned": 0, "status": "passed", "error": None}
        if grade_id not in positions:
            row.update(status="missing", error="test cell missing from the submission")
            problems.append(f"graded cell {grade_id!r} is missing from the submission (0 points).")
        else:
            if len(positions[grade_id]) > 1:
                problems.append(
                    f"graded cell {grade_id!r} appears {len(positions[grade_id])} times; all copies must pass."
                )
            for index in positions[grade_id]:
                if index not in replies:
                    row.update(status="not run", error=stopped or "cell was not executed")
                    break
                error = _error_line(nb.cells[index], replies[index])
                if error:
                    row.update(status="failed", error=error)
                    break
            if row["status"] == "passed":
                row["earned"] = points
        cells.append(row)
    manual = [{"grade_id": _nbgrader(c)["grade_id"], "points": _nbgrader(c)["points"]}
              for c in instructor.cells if _is_manual(c)]
    return {
        "submission": str(submission),
        "solution": str(solution),
        "lab": solution.stem,
        "cells": cells,
        "score": sum(row["earned"] for row in cells),
        "max_score": sum(row["points"] for row in cells),
        "manual": manual,
        "problems": problems,
    }


def format_report(result: dict) -> str:
    """The per-cell table and the total, as printed by ``python -m mmalign.labs grade``."""
    rows = [("grade_id", "points", "earned", "result")]
    for r in result["cells"]:
        rows.append((r["grade_id"], f"{r['points']:g}", f"{r['earned']:g}", r["error"] or r["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{result['submission']}  (solution {result['solution']})"]
    for row in rows:
        lines.append("  ".join(value.ljust(width) for value, width in zip(row[:3], widths)) + "  " + row[3])
    lines.append(f"total: {result['score']:g} / {result['max_score']:g}")
    for item in result["manual"]:
        lines.append(f"manual grading needed: {item['grade_id']} ({item['points']:g} points, not in the total)")
    lines += [f"note: {problem}" for problem in result["problems"]]
    return "\n".join(lines)


def _student_of(path: Path, root: Path) -> str:
    """The submission's top folder under ``root`` (the student), or '' for a file directly in it."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def grade_dir(submissions_dir, solutions_dir="solutions", csv_path=None, *, timeout: int = 300,
              profile: str | None = None, log=print) -> list[dict]:
    """Grade every ``.ipynb`` under ``submissions_dir`` (``<student>/<NN_name>.ipynb``) into one CSV.

    The CSV (default ``submissions_dir/grades.csv``) has columns student, lab, score, max, notes;
    a submission that cannot be graded (unreadable, no matching solution) scores 0 with the reason
    in notes. Returns one dict per submission: the CSV row plus ``result`` (the grade_notebook dict
    or None).
    """
    root = Path(submissions_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"submissions folder {root} does not exist.")
    csv_path = Path(csv_path) if csv_path is not None else root / "grades.csv"
    paths = sorted(p for p in root.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    rows = []
    for path in paths:
        row = {"student": _student_of(path, root), "lab": path.stem, "score": 0, "max": "", "notes": "",
               "result": None}
        try:
            result = grade_notebook(path, solutions_dir=solutions_dir, timeout=timeout, profile=profile)
        except (LabFormatError, OSError) as exc:
            row["notes"] = str(exc)
        else:
            row.update(score=result["score"], max=result["max_score"], notes="; ".join(result["problems"]),
                       result=result)
        log(f"{row['student'] or '.'}/{row['lab']}: {row['score']:g} / {row['max'] or '?'}"
            + (f"  ({row['notes']})" if row["notes"] else ""))
        rows.append(row)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    log(f"wrote {csv_path} ({len(rows)} submissions)")
    return rows


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmalign.labs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("generate", "write labs/NN_name.ipynb from solutions/NN_name.py"),
                       ("check", "report stale, missing, extra or leaking labs (exit 1)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("solutions_dir", nargs="?", default="solutions")
        p.add_argument("labs_dir", nargs="?", default="labs")
    p = sub.add_parser("grade", help="autograde one submitted notebook")
    p.add_argument("submission")
    p.add_argument("--solution", help="solution file (default: solutions/<submission stem>.py)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per cell (default 300)")
    p.add_argument("--json", dest="json_path", help="also write the result as JSON to this file")
    p = sub.add_parser("grade-dir", help="autograde every .ipynb under DIR into one CSV")
    p.add_argument("submissions_dir")
    p.add_argument("--solutions", default="solutions", help="solutions folder (default: solutions)")
    p.add_argument("--csv", dest="csv_path", help="output CSV (default: DIR/grades.csv)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per cell (default 300)")
    return parser


def main(argv=None) -> int:
    """Entry point of ``python -m mmalign.labs``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            changed = generate_labs(args.solutions_dir, args.labs_dir)
            n = len(iter_solutions(args.solutions_dir))
            print(f"{n} solution(s), {len(changed)} lab(s) written" + "".join(f"\n  {p}" for p in changed))
        elif args.command == "check":
            problems = check_labs(args.solutions_dir, args.labs_dir)
            for problem in problems:
                print(problem)
            if problems:
                return 1
            print("labs OK")
        elif args.command == "grade":
            result = grade_notebook(args.submission, args.solution, timeout=args.timeout)
            print(format_report(result))
            if args.json_path:
                Path(args.json_path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        elif args.command == "grade-dir":
            grade_dir(args.submissions_dir, args.solutions, args.csv_path, timeout=args.timeout)
    except (LabFormatError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

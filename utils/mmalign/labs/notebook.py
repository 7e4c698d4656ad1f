"""Solution files as notebooks: reading, validating, nbgrader cell metadata and checksums."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

from .._optional import missing_extra

try:
    import nbformat
except ModuleNotFoundError as e:
    raise missing_extra(e, "labs", "mmalign.labs") from e


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


def _is_locked(cell) -> bool:
    """nbgrader's ``is_locked``: a test cell, or a non-solution cell marked locked."""
    meta = _nbgrader(cell)
    if not meta or meta.get("solution"):
        return False
    return bool(meta.get("grade")) or bool(meta.get("locked"))


def compute_checksum(cell) -> str:
    """nbgrader's cell checksum (``nbgrader.utils.compute_checksum``), computed without nbgrader.

    MD5 of the source, the cell type, whether it is graded / a solution / locked, the grade_id and,
    for graded cells, the points as a float. ``nbgrader validate`` recomputes it: a locked cell whose
    checksum changed was edited; a manually graded answer whose checksum did not change was left
    unanswered (and scores 0).
    """
    meta = _nbgrader(cell)
    digest = hashlib.md5()
    for part in (cell.source, cell.cell_type, str(bool(meta.get("grade", False))),
                 str(bool(meta.get("solution", False))), str(_is_locked(cell)), meta["grade_id"]):
        digest.update(str(part).encode("utf-8"))
    if meta.get("grade"):
        digest.update(str(float(meta["points"])).encode("utf-8"))
    return digest.hexdigest()


def add_checksums(nb) -> None:
    """nbgrader's ComputeChecksums: ``checksum`` and ``cell_type`` in each graded, solution or locked cell."""
    for cell in nb.cells:
        meta = _nbgrader(cell)
        if meta and (meta.get("grade") or meta.get("solution") or _is_locked(cell)):
            meta["checksum"] = compute_checksum(cell)
            meta["cell_type"] = cell.cell_type


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

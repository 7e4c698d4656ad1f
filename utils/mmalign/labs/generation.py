"""Generating labs: the student notebook of a solution (nbgrader's ``generate_assignment``)."""

from __future__ import annotations

from pathlib import Path


from .notebook import (CODE_STUB, MARKDOWN_STUB, SOLUTION, _is_solution, _nbgrader, _split_regions, _where,
                       add_checksums, iter_solutions, lab_path_for, solution_as_notebook)

from .._optional import missing_extra

try:
    import nbformat
except ModuleNotFoundError as e:
    raise missing_extra(e, "labs", "mmalign.labs") from e

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
    """nbgrader's LockCells: answers undeletable; test and locked cells undeletable and read-only."""
    meta = _nbgrader(cell)
    if not meta:
        return
    if meta.get("solution"):
        cell.metadata["deletable"] = False
    elif meta.get("grade") or meta.get("locked"):
        cell.metadata["deletable"] = False
        cell.metadata["editable"] = False


def generate_lab(solution_path) -> nbformat.NotebookNode:
    """The student notebook of ``solutions/NN_name.py``: answers cleared, hidden tests removed.

    Code regions become ``# YOUR CODE HERE`` + ``raise NotImplementedError()`` at the marker's
    indentation, markdown regions ``YOUR ANSWER HERE``; nbgrader metadata is kept and gets nbgrader's
    ``checksum`` and ``cell_type`` (see :func:`~mmalign.labs.notebook.compute_checksum`); outputs and
    execution counts are empty; the same input always gives the same notebook.
    """
    nb = solution_as_notebook(solution_path)
    for index, cell in enumerate(nb.cells):
        cell.source = _clear_source(cell, _where(solution_path, index, cell))
        _lock(cell)
    add_checksums(nb)
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

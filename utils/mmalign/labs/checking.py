"""Checking committed labs: stale, missing, extra, or leaking solution text."""

from __future__ import annotations

import json
from pathlib import Path

from .generation import generate_lab, lab_text
from .notebook import (FORBIDDEN_IN_LABS, LEAK_MIN_CHARS, SOLUTION, LabFormatError, _is_solution, _split_regions,
                       iter_solutions, lab_path_for, read_solution)

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


"""Grading submissions (nbgrader's ``autograde``), guarded against answers that game the tests."""

from __future__ import annotations

import ast
import copy
import csv
import hashlib
import json
import os
import re
import secrets
from pathlib import Path


from . import guard as _guard_module
from .generation import generate_lab
from .notebook import (CSV_COLUMNS, KERNELSPEC, LabFormatError, _is_manual, _is_solution, _is_test, _nbgrader,
                       compute_checksum, solution_as_notebook)

from .._optional import missing_extra

try:
    import nbformat
except ModuleNotFoundError as e:
    raise missing_extra(e, "labs", "mmalign.labs") from e

_GUARD_SOURCE = Path(_guard_module.__file__).read_text(encoding="utf-8")

_LINE_ARROW = re.compile(r"^-+>\s*\d*\s?")  # IPython's '----> 3 ' in front of the failing line


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


def _top_level_names(source: str) -> set[str]:
    """Names a cell defines at top level (functions, classes, assignments)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics and the like: nothing to learn
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _used_names(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def _library_imports(nb) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """The ``mmalign`` modules a notebook imports, and ``local name -> (module, name)`` of what it takes."""
    modules, names = [], {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mmalign":
                modules.append(node.module)
                for alias in node.names:
                    names[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                modules += [a.name for a in node.names if a.name.split(".")[0] == "mmalign"]
    return list(dict.fromkeys(modules)), names


def guard_config(instructor, secret: str) -> dict:
    """What the in-kernel guard needs: the answers' names, the modules to load, the references to wrap.

    A reference is an ``mmalign`` function or class that a test cell uses and that the instructor's
    answers do not use: calling it from a student's answer is doing the exercise with the library.
    """
    modules, imported = _library_imports(instructor)
    answers, allowed, tested = set(), set(), set()
    for cell in instructor.cells:
        if cell.cell_type != "code":
            continue
        if _is_solution(cell):
            answers |= _top_level_names(cell.source)
            allowed |= _used_names(cell.source)
        elif _is_test(cell):
            tested |= _used_names(cell.source)
    references = sorted({imported[name] for name in tested - allowed if name in imported})
    return {"secret": secret, "answers": sorted(answers), "modules": modules, "references": references}


def _code_cell(source: str, index: str):
    cell = nbformat.v4.new_code_cell(source)
    cell.id = index
    return cell


def _graded_notebook(student, tests: dict, config: dict) -> tuple[nbformat.NotebookNode, dict[str, list[int]], str]:
    """The notebook to execute: a guard, then the student's cells with each test cell swapped for the
    instructor's and framed by the guard's ``before`` / ``after`` checks.

    Returns the notebook, per test grade_id the indices of the cells that carry it (test cell at
    ``i``, its guard cells at ``i - 1`` and ``i + 1``), and the guard's name in the kernel.
    """
    guard = "_mmalign_guard_" + hashlib.sha256(config["secret"].encode()).hexdigest()[:12]
    nb = nbformat.v4.new_notebook()
    nb.metadata = nbformat.from_dict({"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}})
    install = (
        f"_g = {{'__name__': 'mmalign_grading_guard'}}\n"
        f"exec(compile({_GUARD_SOURCE!r}, '<mmalign grading guard>', 'exec'), _g)\n"
        f"{guard} = _g['install']({json.dumps(config)!r})\n"
        "del _g"
    )
    nb.cells.append(_code_cell(install, "guard-install"))
    positions: dict[str, list[int]] = {}
    for index, cell in enumerate(student.cells):
        grade_id = _nbgrader(cell).get("grade_id")
        is_test = isinstance(grade_id, str) and grade_id in tests
        if is_test:
            nb.cells.append(_code_cell(f"{guard}.before({grade_id!r})", f"guard-{index}-before"))
            cell = copy.deepcopy(tests[grade_id])
            positions.setdefault(grade_id, []).append(len(nb.cells))
        else:
            cell = copy.deepcopy(cell)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.id = f"cell-{index}"
        nb.cells.append(cell)
        if is_test:
            nb.cells.append(_code_cell(f"{guard}.after({grade_id!r})", f"guard-{index}-after"))
    return nb, positions, guard


def _printed(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


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


def _manual_rows(instructor, student, lab) -> list[dict]:
    """Manually graded answers: 0 when left as in the lab (nbgrader's checksum rule), else to grade."""
    lab_cells = {_nbgrader(c).get("grade_id"): c for c in lab.cells}
    submitted = {}
    for cell in student.cells:
        submitted.setdefault(_nbgrader(cell).get("grade_id"), cell)
    rows = []
    for cell in instructor.cells:
        if not _is_manual(cell):
            continue
        grade_id, points = _nbgrader(cell)["grade_id"], _nbgrader(cell)["points"]
        row = {"grade_id": grade_id, "points": points, "earned": 0}
        theirs, ours = submitted.get(grade_id), lab_cells.get(grade_id)
        if theirs is None:
            row.update(status="missing")
        else:
            probe = copy.deepcopy(ours)
            probe.source, probe.cell_type = theirs.source, theirs.cell_type
            unchanged = compute_checksum(probe) == _nbgrader(ours).get("checksum")
            row.update(status="unanswered" if unchanged else "needs manual grading")
        rows.append(row)
    return rows


def grade_notebook(submission, solution=None, *, timeout: int = 300, profile: str | None = None,
                   solutions_dir="solutions") -> dict:
    """Autograde one submission against its solution; return the per-cell result and the total.

    ``solution`` defaults to ``solutions_dir/<submission stem>.py``. The notebook runs with kernel
    python3 in the submission's folder, with ``MMALIGN_PROFILE`` = ``profile`` (default: the caller's
    ``MMALIGN_PROFILE``, else ``ci``); ``timeout`` is per cell. Every test cell runs between the
    guard's checks (:mod:`mmalign.labs.guard`); it earns its points when the three cells pass.

    Result keys: ``submission``, ``solution``, ``lab``, ``cells`` (one dict per test: ``grade_id``,
    ``points``, ``earned``, ``status`` in passed/failed/missing/not run, ``error``), ``score`` (what
    nbgrader's autograde gives: test points earned, untouched manual answers 0), ``max_score`` (the
    autograded points), ``manual`` (manually graded answers: ``grade_id``, ``points``, ``earned``,
    ``status`` in unanswered/needs manual grading/missing), ``total_max`` (``max_score`` plus the
    manual points: nbgrader's max_score), ``problems`` (notes for the instructor).
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
    secret = secrets.token_hex(16)
    nb, positions, _ = _graded_notebook(student, tests, guard_config(instructor, secret))
    profile = profile or os.environ.get("MMALIGN_PROFILE", "ci") or "ci"
    replies, stopped = _execute(nb, submission.resolve().parent, timeout, profile)

    problems = [stopped] if stopped else []
    if 0 in replies and _error_line(nb.cells[0], replies[0]):
        problems.append(f"the grading guard failed to start: {_error_line(nb.cells[0], replies[0])}")
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
                for stage, at in (("before", index - 1), ("test", index), ("after", index + 1)):
                    if at not in replies:
                        row.update(status="not run", error=stopped or "cell was not executed")
                        break
                    error = _error_line(nb.cells[at], replies[at])
                    if not error and stage != "test":
                        if _guard_module.token(secret, stage, grade_id) not in _printed(nb.cells[at]):
                            error = "the grading guard did not run (was the cell rewritten or skipped?)"
                    if error:
                        row.update(status="failed", error=error)
                        break
                if row["status"] != "passed":
                    break
            if row["status"] == "passed":
                row["earned"] = points
        cells.append(row)
    manual = _manual_rows(instructor, student, generate_lab(solution))
    max_score = sum(row["points"] for row in cells)
    return {
        "submission": str(submission),
        "solution": str(solution),
        "lab": solution.stem,
        "cells": cells,
        "score": sum(row["earned"] for row in cells) + sum(row["earned"] for row in manual),
        "max_score": max_score,
        "manual": manual,
        "total_max": max_score + sum(row["points"] for row in manual),
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
        if item["status"] == "needs manual grading":
            lines.append(f"manual grading needed: {item['grade_id']} ({item['points']:g} points, not in the total)")
        else:
            lines.append(f"manual answer {item['grade_id']}: {item['status']}, 0 / {item['points']:g}")
    if result["manual"]:
        lines.append(f"total with manual answers: out of {result['total_max']:g} (as nbgrader counts)")
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


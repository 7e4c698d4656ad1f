"""Grading submissions (nbgrader's ``autograde``) so that a submission cannot forge its grade.

The instructor's test cells run in the grader's process; the student's notebook runs in a separate,
sandboxed process (:mod:`mmalign.labs.remote`, :mod:`mmalign.labs.sandbox`) that is only ever asked
for values. See :func:`grade_notebook`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import csv
import io
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import remote, review, sandbox, testing
from .generation import generate_lab
from .notebook import (CSV_COLUMNS, LabFormatError, _is_manual, _is_solution, _is_test, _nbgrader, compute_checksum,
                       solution_as_notebook)

from .._optional import missing_extra

try:
    import nbformat
except ModuleNotFoundError as e:
    raise missing_extra(e, "labs", "mmalign.labs") from e

def _read_submission(path: Path, data: bytes | None = None) -> nbformat.NotebookNode:
    """The student's notebook (from ``data`` when given: the bytes read before any grading started), or a
    :class:`LabFormatError` naming the file when it is not one."""
    if data is None and not path.is_file():
        raise FileNotFoundError(f"no submission {path}.")
    try:
        text = (data if data is not None else path.read_bytes()).decode("utf-8")
        return nbformat.reads(text, as_version=4)
    except Exception as exc:  # nbformat raises NotJSONError, ValidationError, KeyError...
        raise LabFormatError(
            f"{path} is not a readable Jupyter notebook ({type(exc).__name__}: {str(exc)[:200]}); "
            "ask the student to open it in Jupyter, save it and submit again."
        ) from None


def _default_solution(submission: Path, solutions_dir) -> Path:
    """``solutions/<stem>.py`` for ``.../<stem>.ipynb``."""
    return Path(solutions_dir) / (submission.stem + ".py")


def _top_level_names(source: str, definitions_only: bool = False) -> set[str]:
    """Names a cell defines at top level (functions, classes, and unless ``definitions_only`` assignments)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics and the like: nothing to learn
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and not definitions_only:
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


# A lab declares a library function that its exercise re-implements but its tests do not call, e.g.
#   # While grading, the library's own version is taken away: mmalign.dist.gathered_info_nce
_TAKEN_AWAY = re.compile(r"^#\s*While grading, the library's own version is taken away:\s*(mmalign[\w.]*)\.(\w+)\s*$",
                         re.MULTILINE)


def lab_config(instructor) -> dict:
    """What grading a lab needs, read from the instructor's notebook.

    ``answers``: the names the solution cells define (functions, classes) that tests call; ``references``:
    ``(module, name)`` of the ``mmalign`` objects that the test cells use and no other code cell does (the
    library's version of the exercise, taken away in the student's process), and those a cell declares in a
    line ``# While grading, the library's own version is taken away: mmalign.module.name``; ``prelude``: the import
    statements of the ordinary code cells, run in the grader's test namespace; ``tests``: per grade_id its
    source and the line numbers of its hidden region.
    """
    modules, imported = _library_imports(instructor)
    answers, elsewhere, tested = set(), set(), set()
    prelude, tests, solution_ids = [], {}, []
    for cell in instructor.cells:
        if cell.cell_type != "code":
            continue
        if _is_test(cell):
            tested |= _used_names(cell.source)
            tests[_nbgrader(cell)["grade_id"]] = {"source": cell.source, "points": _nbgrader(cell)["points"],
                                                  "hidden": _hidden_lines(cell.source)}
            continue
        elsewhere |= _used_names(cell.source)
        if _is_solution(cell):
            answers |= _top_level_names(cell.source, definitions_only=True)
            solution_ids.append(_nbgrader(cell)["grade_id"])
        else:
            prelude += _imports_of(cell.source)
    references = {imported[name] for name in tested - elsewhere
                  if name in imported and not imported[name][0].startswith("mmalign.labs")}
    for cell in instructor.cells:  # what the tests do not name but the exercise is: declared by the lab
        for module, name in _TAKEN_AWAY.findall(cell.source):
            references.add((module, name))
    references = sorted(references)
    return {"answers": sorted(answers), "references": references, "modules": modules,
            "prelude": "\n".join(dict.fromkeys(prelude)), "tests": tests, "solution_ids": solution_ids}


def _imports_of(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def _hidden_lines(source: str) -> set[int]:
    """1-based line numbers inside (and on) the hidden-test markers of a test cell's source."""
    hidden, inside = set(), False
    for number, line in enumerate(source.splitlines(), 1):
        text = line.strip()
        if re.fullmatch(r"###\s*BEGIN\s+HIDDEN TESTS", text):
            inside = True
        if inside:
            hidden.add(number)
        if re.fullmatch(r"###\s*END\s+HIDDEN TESTS", text):
            inside = False
    return hidden


def _student_cells(student, config) -> list[tuple[int, str]]:
    """The student's code cells the grader runs: every one up to the last answer, test cells left out
    (the grader runs the instructor's tests itself; nothing after the last answer defines one)."""
    ids = [_nbgrader(c).get("grade_id") for c in student.cells]
    answers = [i for i, grade_id in enumerate(ids) if grade_id in config["solution_ids"]]
    last = max(answers) if answers else len(student.cells) - 1
    return [(i, c.source) for i, c in enumerate(student.cells[: last + 1])
            if c.cell_type == "code" and ids[i] not in config["tests"] and isinstance(c.source, str)]


def _failure(exc: BaseException, filename: str, hidden: set[int], source: str) -> str:
    """One line saying why a test failed, never quoting a hidden line of the test."""
    if isinstance(exc, AssertionError) and exc.args:
        return f"AssertionError: {exc.args[0]}"[:300]
    if isinstance(exc, AssertionError):
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
        if frames and frames[-1].lineno not in hidden:
            line = source.splitlines()[frames[-1].lineno - 1].strip()
            return f"AssertionError at `{line}`"[:300]
        return "AssertionError in a hidden check"
    if getattr(exc, "mmalign_student", False) or isinstance(exc, remote.StudentError):
        return str(exc)[:300]
    return f"{type(exc).__name__}: {exc}"[:300]


def _seed(seed: int = 0) -> None:
    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def _run_tests(config, process, present: set[str], profile: str) -> tuple[list[dict], list[str]]:
    """Run the instructor's test cells in this process, the answers being proxies of the student's."""
    import torch

    rows, problems = [], []
    namespace = {"__name__": "__mmalign_test__"}
    saved_profile = os.environ.get("MMALIGN_PROFILE")
    os.environ["MMALIGN_PROFILE"] = profile
    threads = torch.get_num_threads()
    testing._process = process
    try:
        try:
            exec(compile(config["prelude"], "<imports of the lab>", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - the instructor's imports; tests will say what is missing
            problems.append(f"the lab's imports failed in the grader: {type(exc).__name__}: {exc}")
        for grade_id, test in config["tests"].items():
            row = {"grade_id": grade_id, "points": test["points"], "earned": 0, "status": "failed", "error": None}
            rows.append(row)
            if grade_id not in present:
                row.update(status="missing", error="test cell missing from the submission")
                problems.append(f"graded cell {grade_id!r} is missing from the submission (0 points).")
                continue
            if time.monotonic() > process.deadline:
                row.update(status="not run", error="the submission's time limit was reached")
                continue
            try:
                process.ensure()
            except remote.StudentError as exc:
                row["error"] = str(exc)[:300]
                continue
            for name in config["answers"]:
                namespace[name] = remote.StudentFunction(process, name)
            _seed(0)
            filename = f"<test {grade_id}>"
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    exec(compile(test["source"], filename, "exec"), namespace)
            except Exception as exc:  # noqa: BLE001 - any failure of a test is a failed test
                row["error"] = _failure(exc, filename, test["hidden"], test["source"])
            else:
                row.update(status="passed", earned=test["points"])
            finally:
                torch.set_num_threads(threads)
                torch.set_grad_enabled(True)
    finally:
        testing._process = None
        if saved_profile is None:
            os.environ.pop("MMALIGN_PROFILE", None)
        else:
            os.environ["MMALIGN_PROFILE"] = saved_profile
    return rows, problems


def _references(config) -> list[tuple[str, object]]:
    import importlib

    out = []
    for module, name in config["references"]:
        try:
            out.append((f"{module}.{name}", getattr(importlib.import_module(module), name)))
        except Exception:  # noqa: BLE001
            continue
    return out


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


class _Lab:
    """A solution read once: the instructor's notebook, its config and its lab (for manual answers)."""

    def __init__(self, solution: Path):
        self.solution = solution
        self.instructor = solution_as_notebook(solution)
        self.config = lab_config(self.instructor)
        self.lab = generate_lab(solution)


def grade_notebook(submission, solution=None, *, timeout: int = 300, profile: str | None = None,
                   solutions_dir="solutions", time_limit: float | None = None,
                   memory_limit: float | None = sandbox.DEFAULT_MEMORY_LIMIT_MIB, _data: bytes | None = None,
                   _lab: "_Lab | None" = None) -> dict:
    """Autograde one submission against its solution; return the per-cell result and the total.

    ``solution`` defaults to ``solutions_dir/<submission stem>.py``. The student's code cells (up to the
    last answer) run in a fresh sandboxed process (:mod:`mmalign.labs.sandbox`: a temporary folder
    holding only the notebook, which is its ``HOME``, ``IPYTHONDIR``, ``TMPDIR`` and working directory, a
    reduced environment with ``MMALIGN_PROFILE`` = ``profile``, default the caller's or ``ci``), after the
    library objects that the lab asks the student to write were taken away. The instructor's test cells,
    hidden tests included, run in *this* process; the student's functions are proxies that ask the
    student's process for values (:mod:`mmalign.labs.remote`). ``timeout`` bounds one cell or one call,
    ``time_limit`` (default ``20 * timeout``) the whole submission; past it the process group is killed.
    ``memory_limit`` (MiB, default :data:`~mmalign.labs.sandbox.DEFAULT_MEMORY_LIMIT_MIB`; None or 0: none)
    bounds the resident memory of all the submission's processes together
    (:class:`~mmalign.labs.sandbox.MemoryWatch`): over it they are killed, the running test fails with
    "memory limit N MiB exceeded" and the next test starts them again.

    Result keys: ``submission``, ``solution``, ``lab``, ``cells`` (one dict per test: ``grade_id``,
    ``points``, ``earned``, ``status`` in passed/failed/missing/not run, ``error``), ``score`` (what
    nbgrader's autograde gives: test points earned, untouched manual answers 0), ``max_score`` (the
    autograded points), ``manual`` (manually graded answers: ``grade_id``, ``points``, ``earned``,
    ``status`` in unanswered/needs manual grading/missing), ``total_max`` (``max_score`` plus the
    manual points: nbgrader's max_score), ``problems`` (notes for the instructor), ``review`` (lines of
    the submission for a person to read: ``cell``, ``line``, ``text``, ``why``), ``sandboxed``,
    ``memory_peak_mib`` (the largest resident total the watch measured, None without a watch).
    """
    submission = Path(submission)
    if _lab is None:
        solution = Path(solution) if solution is not None else _default_solution(submission, solutions_dir)
        if not solution.is_file():
            raise FileNotFoundError(
                f"no solution {solution} for {submission}; pass --solution solutions/NN_name.py "
                "(or name the submission like its lab)."
            )
        _lab = _Lab(solution)
    solution, config = _lab.solution, _lab.config
    student = _read_submission(submission, _data)
    profile = profile or os.environ.get("MMALIGN_PROFILE", "ci") or "ci"
    cells = _student_cells(student, config)
    present = {_nbgrader(c).get("grade_id") for c in student.cells}
    workdir = Path(tempfile.mkdtemp(prefix="mmalign-grade-"))
    problems: list[str] = []
    memory = sandbox.MemoryWatch(memory_limit)
    try:
        os.chmod(workdir, 0o700)
        (workdir / submission.name).write_bytes(_data if _data is not None else submission.read_bytes())
        deadline = time.monotonic() + (time_limit if time_limit is not None else 20 * timeout)
        process = remote.StudentProcess(workdir, cells, config["references"], timeout=timeout, deadline=deadline,
                                        profile=profile, memory=memory)
        try:
            rows, notes = _run_tests(config, process, present, profile)
        finally:
            process.stop()
        problems += notes
        if process.sandboxed is False:
            problems.append(sandbox.NO_SANDBOX)
        if memory.kills:
            problems.append(f"{memory.reason}: the submission's processes were stopped "
                            f"{memory.kills} time(s); the tests running then scored 0")
        elif memory_limit and not memory.available:
            problems.append("no memory limit here (it needs Linux's /proc)")
        for index, error in process.cell_errors[:3]:
            if "NotImplementedError" not in str(error):
                problems.append(f"cell {index + 1} of the submission raised {str(error)[:200]}")
    finally:
        memory.close()
        shutil.rmtree(workdir, ignore_errors=True)
    flagged = review.flagged_lines(cells) + review.copied_references(cells, _references(config))
    if flagged:
        problems.append(f"{len(flagged)} line(s) of the submission are listed for review (reach into the "
                        "kernel, the library or the system; see the review report)")
    manual = _manual_rows(_lab.instructor, student, _lab.lab)
    max_score = sum(row["points"] for row in rows)
    return {
        "submission": str(submission),
        "solution": str(solution),
        "lab": solution.stem,
        "cells": rows,
        "score": sum(row["earned"] for row in rows) + sum(row["earned"] for row in manual),
        "max_score": max_score,
        "manual": manual,
        "total_max": max_score + sum(row["points"] for row in manual),
        "problems": problems,
        "review": flagged,
        "sandboxed": bool(process.sandboxed),
        "memory_peak_mib": round(memory.peak_bytes / 2**20) if memory.limit_mib and memory.available else None,
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
    for f in result.get("review", []):
        lines.append(f"review: cell {f['cell'] + 1}, line {f['line']}: {f['text']}    [{f['why']}]")
    return "\n".join(lines)


def _student_of(path: Path, root: Path) -> str:
    """The submission's top folder under ``root`` (the student), or '' for a file directly in it."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def check_writable(path) -> Path:
    """Raise ``OSError`` naming ``path`` unless a file can be written there (checked before grading)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name for the output.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=True):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as exc:
        raise OSError(f"cannot write {path} ({exc.strerror or exc}); choose another path before grading.") from None
    return path


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_or_print(path, text: str, what: str, log=print) -> bool:
    """Write ``text`` atomically; when that fails, print it so the grades are never lost."""
    try:
        write_atomic(path, text)
        return True
    except OSError as exc:
        log(f"error: could not write the {what} to {path} ({exc}); here it is instead:")
        print(text, file=sys.stdout)
        return False


def review_report(rows) -> str:
    """The lines listed for a person to read, one block per submission (empty when none)."""
    blocks = []
    for row in rows:
        flagged = (row.get("result") or {}).get("review") or []
        if not flagged:
            continue
        lines = [f"{row['student'] or '.'}/{row['lab']}:"]
        lines += [f"  cell {f['cell'] + 1}, line {f['line']}: {f['text']}    [{f['why']}]" for f in flagged]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def grade_dir(submissions_dir, solutions_dir="solutions", csv_path=None, *, timeout: int = 300,
              profile: str | None = None, log=print, time_limit: float | None = None,
              memory_limit: float | None = sandbox.DEFAULT_MEMORY_LIMIT_MIB) -> list[dict]:
    """Grade every ``.ipynb`` under ``submissions_dir`` (``<student>/<NN_name>.ipynb``) into one CSV.

    The CSV (default ``submissions_dir/grades.csv``) has columns student, lab, score, max, notes; a
    submission that cannot be graded (unreadable, no matching solution, any failure of the grader on it)
    scores 0 with the reason in notes. Every submission and every solution is read before the first one
    is graded, each submission runs in its own sandbox, and the CSV is written atomically at the end, so
    one submission cannot change another's row. Lines listed for review go to ``<csv>.review.txt``.
    Returns one dict per submission: the CSV row plus ``result`` (the grade_notebook dict or None).
    """
    root = Path(submissions_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"submissions folder {root} does not exist.")
    csv_path = check_writable(Path(csv_path) if csv_path is not None else root / "grades.csv")
    review_path = csv_path.with_name(csv_path.stem + ".review.txt")
    paths = sorted(p for p in root.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    submissions = {}
    for path in paths:  # read everything first: grading one cannot change another
        try:
            submissions[path] = path.read_bytes()
        except OSError as exc:
            submissions[path] = exc
    labs: dict[str, object] = {}
    for path in paths:
        if path.stem not in labs:
            try:
                labs[path.stem] = _Lab(_default_solution(path, solutions_dir))
            except (LabFormatError, OSError) as exc:
                labs[path.stem] = exc
    rows = []
    for path in paths:
        row = {"student": _student_of(path, root), "lab": path.stem, "score": 0, "max": "", "notes": "",
               "result": None}
        data, lab = submissions[path], labs[path.stem]
        try:
            if isinstance(data, Exception):
                raise data
            if isinstance(lab, Exception):
                raise lab
            result = grade_notebook(path, timeout=timeout, profile=profile, time_limit=time_limit,
                                    memory_limit=memory_limit, _data=data, _lab=lab)
        except (LabFormatError, OSError) as exc:
            row["notes"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a class is always graded
            row["notes"] = f"the grader failed on this submission ({type(exc).__name__}: {str(exc)[:200]})"
        else:
            row.update(score=result["score"], max=result["max_score"], notes="; ".join(result["problems"]),
                       result=result)
        log(f"{row['student'] or '.'}/{row['lab']}: {row['score']:g} / {row['max'] or '?'}"
            + (f"  ({row['notes']})" if row["notes"] else ""))
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if save_or_print(csv_path, buffer.getvalue(), "grades", log):
        log(f"wrote {csv_path} ({len(rows)} submissions)")
    report = review_report(rows)
    if report and save_or_print(review_path, report, "review report", log):
        log(f"wrote {review_path}: lines for a person to read in {report.count(':' + chr(10))} submission(s)")
    return rows

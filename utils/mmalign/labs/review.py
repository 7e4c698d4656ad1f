"""Code for a person to read: the lines of a submission that reach for the machinery, not the exercise.

Grades never depend on this report. It lists lines that touch kernel or IPython internals, the garbage
collector, the input history, closures and code objects, import machinery, threads and processes,
``/proc``, or that execute source text, and answers that copy the library's reference line by line.
"""

from __future__ import annotations

import inspect
import re

PATTERNS = [
    (r"\bget_ipython\b|\bIPython\b|\bipykernel\b|\bjupyter_client\b|\bzmq\b|\bSession\b", "kernel or IPython internals"),
    (r"\bgc\b", "the garbage collector"),
    (r"\bIn\s*\[|\b_ih\b|\b_i\d*\b|\bOut\s*\[|\b_oh\b", "the input / output history"),
    (r"__closure__|cell_contents|__code__|__globals__|__defaults__|__kwdefaults__|__wrapped__|co_consts",
     "closures and code objects"),
    (r"\bimportlib\b|\b__import__\b|\brunpy\b|\breload\b|spec_from_file_location|SourceFileLoader",
     "import machinery"),
    (r"\bthreading\b|\bThread\b|\bconcurrent\.futures\b|\bmultiprocessing\b|\b_thread\b", "threads or processes"),
    (r"/proc\b", "/proc"),
    (r"\bsubprocess\b|\bos\.system\b|\bos\.popen\b|\bos\.fork\b|\bos\.exec|\bos\.spawn|\bsetsid\b|\bpty\b",
     "starting processes"),
    (r"\bexec\s*\(|\beval\s*\(|\bcompile\s*\(|\bgetsource\b|__file__|\bsys\.modules\b", "executing source text"),
    (r"\bsys\._getframe\b|\bsys\.settrace\b|\bsys\.setprofile\b|\bf_back\b|\bf_locals\b|\bctypes\b|\bsignal\b",
     "frames, tracing, signals or ctypes"),
    (r"\bbuiltins\b|__builtins__", "builtins"),
    (r"\bsolutions\b|\.ipynb\b", "other notebooks or solutions"),
]
_COMPILED = [(re.compile(pattern), why) for pattern, why in PATTERNS]


def flagged_lines(cells) -> list[dict]:
    """``[{"cell", "line", "text", "why"}]`` for the student's code cells ``[(index, source)]``."""
    found = []
    for index, source in cells:
        for number, line in enumerate(source.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            reasons = [why for pattern, why in _COMPILED if pattern.search(line)]
            if reasons:
                found.append({"cell": index, "line": number, "text": stripped[:160], "why": ", ".join(reasons)})
    return found


def _significant(source: str) -> set[str]:
    lines = set()
    for line in source.splitlines():
        text = line.strip()
        if len(text) >= 20 and not text.startswith(("#", '"', "'", "def ", "return", ")", "raise ")):
            lines.add(re.sub(r"\s+", " ", text))
    return lines


def copied_references(cells, references) -> list[dict]:
    """Answers that hold several lines of a library reference's source (``references``: objects)."""
    student = {}
    for index, source in cells:
        for line in _significant(source):
            student.setdefault(line, index)
    found = []
    for label, obj in references:
        try:
            lines = _significant(inspect.getsource(obj))
        except (OSError, TypeError):
            continue
        common = [line for line in lines if line in student]
        if len(common) >= 3 or (lines and len(common) >= max(2, len(lines) // 2)):
            found.append({"cell": student[common[0]], "line": 0, "text": common[0][:160],
                          "why": f"{len(common)} lines of the library's {label}"})
    return found

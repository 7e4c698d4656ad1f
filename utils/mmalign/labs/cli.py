"""The command line: ``python -m mmalign.labs generate|check|grade|grade-dir``."""

from __future__ import annotations

import argparse
import json
import sys

from . import __doc__ as _DOC
from .checking import check_labs
from .generation import generate_labs
from .grading import check_writable, format_report, grade_dir, grade_notebook, save_or_print
from .notebook import LabFormatError, iter_solutions
from .sandbox import DEFAULT_MEMORY_LIMIT_MIB

_MEMORY_HELP = (f"MiB of resident memory for all of a submission's processes together (default "
                f"{DEFAULT_MEMORY_LIMIT_MIB}; 0: no limit); over it they are killed and the running test scores 0")

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmalign.labs", description=_DOC.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("generate", "write labs/NN_name.ipynb from solutions/NN_name.py"),
                       ("check", "report stale, missing, extra or leaking labs (exit 1)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("solutions_dir", nargs="?", default="solutions")
        p.add_argument("labs_dir", nargs="?", default="labs")
    p = sub.add_parser("grade", help="autograde one submitted notebook")
    p.add_argument("submission")
    p.add_argument("--solution", help="solution file (default: solutions/<submission stem>.py)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per cell or call (default 300)")
    p.add_argument("--time-limit", type=float, help="seconds for the whole submission (default 20 x timeout)")
    p.add_argument("--memory-limit", type=float, default=DEFAULT_MEMORY_LIMIT_MIB, help=_MEMORY_HELP)
    p.add_argument("--json", dest="json_path", help="also write the result as JSON to this file")
    p = sub.add_parser("grade-dir", help="autograde every .ipynb under DIR into one CSV")
    p.add_argument("submissions_dir")
    p.add_argument("--solutions", default="solutions", help="solutions folder (default: solutions)")
    p.add_argument("--csv", dest="csv_path", help="output CSV (default: DIR/grades.csv)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per cell or call (default 300)")
    p.add_argument("--time-limit", type=float, help="seconds per submission (default 20 x timeout)")
    p.add_argument("--memory-limit", type=float, default=DEFAULT_MEMORY_LIMIT_MIB, help=_MEMORY_HELP)
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
            if args.json_path:
                check_writable(args.json_path)  # before grading: a computed grade is never lost
            result = grade_notebook(args.submission, args.solution, timeout=args.timeout, time_limit=args.time_limit,
                                    memory_limit=args.memory_limit)
            print(format_report(result))
            if args.json_path and not save_or_print(args.json_path, json.dumps(result, indent=1) + "\n", "result",
                                                    lambda line: print(line, file=sys.stderr)):
                return 1
        elif args.command == "grade-dir":
            grade_dir(args.submissions_dir, args.solutions, args.csv_path, timeout=args.timeout,
                      time_limit=args.time_limit, memory_limit=args.memory_limit)
    except (LabFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


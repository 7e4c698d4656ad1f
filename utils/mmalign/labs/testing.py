"""Helpers for test cells that must run both in a notebook and in the grader.

In a notebook (the student's kernel, nbgrader) they call the function directly. While
:mod:`mmalign.labs.grading` runs a test cell, the answers are proxies of the student's process and
``student_side`` runs a library function *there*, with the student's objects, returning plain values
that the test then checks in the grader.
"""

from __future__ import annotations

_process = None  # set by the grader (in its own process) while it runs the instructor's test cells


def student_side(function, *args, **kwargs):
    """``function(*args, **kwargs)``; under the grader, evaluated in the student's sandboxed process.

    Use it for library helpers that need the student's code itself (e.g. running it on several
    processes); the result must be plain values (tensors, numbers, lists / dicts of them).
    """
    if _process is None:
        return function(*args, **kwargs)
    from .remote import student_side as remote

    return remote(_process, function, args, kwargs)

"""Helpers for test cells that run both in a notebook and in the grader.

In a notebook (the student's kernel, nbgrader) a test cell runs beside the student's code and may read
what the student's own cells produced, for feedback. While :mod:`mmalign.labs.grading` runs the same
cell in the grader, the answers are proxies of the student's sandboxed process and :func:`grading` is
True: a test then computes what it checks (trains again from a seed, launches processes) instead of
reading a variable of the notebook, and :func:`on_processes` calls the student's function on several
processes that the grader starts itself. Grades never come from what a notebook reports::

    if grading():   # in the grader: train again, from a fixed seed, with the student's loss
        test_history = fit(...)
    else:           # in the notebook: the student's own run above, for feedback
        test_history = history
"""

from __future__ import annotations

_process = None  # set by the grader (in its own process) while it runs the instructor's test cells


def grading() -> bool:
    """True while the grader runs this test cell (the student's answers are proxies of their process)."""
    return _process is not None


def on_processes(function, inputs) -> list[tuple]:
    """Call the student's ``function(*inputs[r])`` on rank ``r`` of ``len(inputs)`` processes at once.

    Only under the grader (:func:`grading`): it starts ``len(inputs)`` processes of the submission in one
    fresh sandbox, joined by ``torch.distributed`` (gloo, CPU), each running the student's cells; it sends
    every rank its inputs (tensors that require grad are differentiated) and returns, per rank, ``(value,
    grads)``: what the function returned there, as values, and the gradient of the sum of its tensors
    with respect to each input tensor that requires grad (in order; None where it does not reach). The
    gradients include the collectives' backward, so a differentiable ``all_gather`` sums every rank's
    contribution. The caller compares these values with its own reference in the grader.
    """
    if _process is None:
        raise RuntimeError("on_processes runs a student's function on processes that the grader starts; in a "
                           "notebook run the function with torchrun (e.g. mmalign.experiments.scaling."
                           "check_on_processes) and guard the call with `if grading():`")
    from .remote import on_processes as remote

    return remote(_process, function, inputs)

"""The library's one input-check policy: bad input raises a clear error, never a NaN or a wrong number.

Every public function of mmalign checks its arguments with the helpers below before it computes.
The rules:

- **Shapes, dtypes, widths, numbers and options** are always checked (they cost nothing). A failure
  raises ``ValueError`` (``TypeError`` for a wrong type) whose message names the argument, says what
  came in and what was expected, and how to fix it.
- **Non-finite values** (NaN / inf in a tensor) are checked too, because a NaN loss is the failure a
  student cannot trace back. This check reads every element (and on a GPU it synchronises), so it can
  be switched off for a hot loop that is already known to be clean::

      with mmalign.checks.disabled():      # or MMALIGN_CHECKS=0 in the environment
          loss = info_nce(a, b)

  Only the element-wise scans are switched off (finiteness, and the few value checks that read every
  element: rows of codebook targets summing to 1, a plan's mass, labels below the vocabulary size,
  mined negative indices in range and never the anchor's own positive);
  structural checks stay on. On chapter 2's training loop
  the scans cost under 2 % of a step (0.1-0.9 % per loss of the zoo on CPU, measured with
  ``benchmarks/check_overhead.py``): a scan is one sum per tensor and one host sync per call
  (``check_all_finite`` fuses the tensors of a call); only when the sum is not finite does an
  exact ``isfinite`` pass count the bad values for the message.
- Errors are raised at the boundary of the public function, never from inside torch or numpy.

Typical use::

    from mmalign.checks import check_embeddings, check_positive
    check_embeddings("a", a)                       # 2-d float, non-empty, finite
    check_positive("temperature", temperature)
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading
from typing import Iterable, Sequence

import torch

__all__ = [
    "enabled", "disabled", "set_enabled", "check_tensor", "check_embeddings", "check_finite", "check_all_finite",
    "check_finite_result",
    "check_same_width", "check_real", "check_positive", "check_nonnegative", "check_int", "check_probability",
    "check_choice", "check_ids", "check_id_pair", "check_mask",
]

_state = threading.local()


def _default() -> bool:
    value = os.environ.get("MMALIGN_CHECKS", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"MMALIGN_CHECKS={value!r} is not understood; use 1 (checks on, default) or 0 (off)")
    return value not in ("0", "false", "off")


def enabled() -> bool:
    """True when the (element-wise) finiteness checks run: the default, unless ``MMALIGN_CHECKS=0``."""
    flag = getattr(_state, "enabled", None)
    return _default() if flag is None else flag


def set_enabled(flag: bool | None) -> None:
    """Turn the finiteness checks on or off for this thread (``None``: back to ``MMALIGN_CHECKS``)."""
    _state.enabled = flag


@contextlib.contextmanager
def disabled():
    """Context manager: skip the finiteness scans inside (structural checks stay on)."""
    old = getattr(_state, "enabled", None)
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = old


# --- tensors ---------------------------------------------------------------------------------------------
def check_tensor(name: str, x, ndim: int | Sequence[int] | None = None, floating: bool = True,
                 finite: bool = True, nonempty: bool = True) -> torch.Tensor:
    """``x`` is a torch tensor with ``ndim`` dimensions, a real floating dtype, elements, finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}; convert it with torch.as_tensor(...)")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-d" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if floating and (not x.dtype.is_floating_point or x.dtype.is_complex):
        raise ValueError(
            f"{name} must be a real floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}; "
            f"use {name}.float()"
        )
    if nonempty and x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): pass at least one row")
    if finite:
        check_finite(name, x)
    return x


def _sum_is_finite(tensors) -> bool:
    """One reduction per tensor and one host sync in all: the sum of a tensor with a NaN or inf is
    non-finite. A finite tensor whose sum overflows is a false alarm, re-checked exactly by the caller."""
    sums = [t.detach().sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.detach().sum()
            for t in tensors]
    if not sums:
        return True
    if len(sums) == 1 or all(s.device.type == "cpu" for s in sums):
        return all(math.isfinite(float(s)) for s in sums)  # no device sync on CPU
    return math.isfinite(float(torch.stack([s.to(sums[0].device, torch.float32) for s in sums]).sum()))


def _raise_not_finite(name: str, x: torch.Tensor) -> None:
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    raise ValueError(
        f"{name} holds NaN or inf values ({n_nan} NaN, {n_inf} inf, shape {tuple(x.shape)}); find where they come "
        "from upstream (a division by zero, an exp that overflowed, a bad input row) before this call"
    )


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """No NaN or inf in ``x`` (skipped when checks are disabled).

    Costs one sum and one host sync (a full ``isfinite`` scan only when the sum is not finite)."""
    if enabled() and x.dtype.is_floating_point and x.numel() and not _sum_is_finite([x]):
        if not bool(torch.isfinite(x).all()):
            _raise_not_finite(name, x)
    return x


def check_all_finite(*named) -> None:
    """``check_all_finite(("a", a), ("b", b), ...)``: no NaN/inf in any of them, with ONE host sync.

    ``None`` entries and non-float tensors are skipped. The error names the first bad argument.
    """
    if not enabled():
        return
    items = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.numel()]
    if not items or _sum_is_finite([t for _, t in items]):
        return
    for n, t in items:
        if not bool(torch.isfinite(t).all()):
            _raise_not_finite(n, t)


def check_finite_result(name: str, result: torch.Tensor, *named, hint: str = "") -> torch.Tensor:
    """A computed value (a loss, logits) is finite; if not, blame the first non-finite input in
    ``named`` (pairs of name, tensor), else say the computation overflowed (``hint`` says what to do)."""
    if enabled() and result.numel() and not _sum_is_finite([result]) and not bool(torch.isfinite(result).all()):
        check_all_finite(*named)
        raise ValueError(f"{name} is not finite although the inputs are; {hint or 'check the scale of the inputs'}")
    return result


def check_embeddings(name: str, x, dim: int | None = None, finite: bool = True) -> torch.Tensor:
    """A (N, D) batch of embeddings: 2-d, real floating, N > 0, finite, and D == ``dim`` if given.

    ``finite=False`` leaves the scan to one fused :func:`check_all_finite` call by the caller."""
    check_tensor(name, x, ndim=2, finite=False, nonempty=False)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): pass at least one row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero width (shape {tuple(x.shape)}): each row needs at least one feature")
    if finite:
        check_finite(name, x)
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} features per row, got {x.shape[1]} (shape {tuple(x.shape)})")
    return x


def check_same_width(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """The last dimensions of ``a`` and ``b`` agree (two embeddings in one space)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{name_a} and {name_b} have different widths ({a.shape[-1]} vs {b.shape[-1]}); "
            "project both into the same space first"
        )


def check_ids(name: str, ids, n: int, device=None) -> torch.Tensor:
    """(n,) integer item ids (a list, numpy array or tensor) as a LongTensor on ``device``."""
    t = torch.as_tensor(ids, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer ids, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must be 1-d with one id per row ({n} rows), got shape {tuple(t.shape)}")
    return t.long()


def check_id_pair(ids, n_a: int, n_b: int, device=None, sides: tuple[str, str] = ("a", "b"),
                  name: str = "ids") -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``ids`` argument of the losses and miners, as ``(ids of the first side (n_a,), ids of the
    second (n_b,))`` LongTensors, or None when it is None (the diagonal pairs).

    ``ids`` is one (n,) tensor when both sides share the ids (a paired batch: n_a == n_b == n) or a pair
    ``(ids_a, ids_b)`` when they differ; a None inside the pair means ``arange`` for that side.
    """
    if ids is None:
        return None
    if isinstance(ids, (tuple, list)) and len(ids) == 2 and not all(isinstance(i, (int, numbers.Integral)) for i in ids):
        first, second = ids
    elif isinstance(ids, (tuple, list)) and len(ids) != n_a:
        raise ValueError(f"{name} must be one ({n_a},) tensor or a pair (ids of {sides[0]}, ids of {sides[1]}), "
                         f"got a {type(ids).__name__} of {len(ids)} items")
    else:
        if n_a != n_b:
            raise ValueError(f"one {name} tensor labels both sides, but {sides[0]} has {n_a} rows and {sides[1]} "
                             f"{n_b}: pass {name}=(ids of {sides[0]}, ids of {sides[1]})")
        first = second = ids
    out = []
    for side, part, n in ((sides[0], first, n_a), (sides[1], second, n_b)):
        if part is None:
            out.append(torch.arange(n, device=device))
        else:
            out.append(check_ids(f"{name} of {side}", part, n, device=device))
    return out[0], out[1]


def check_mask(name: str, mask, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """A boolean (or 0/1) mask of exactly ``shape`` as a bool tensor."""
    m = torch.as_tensor(mask, device=device)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if m.dtype.is_floating_point or m.dtype.is_complex or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{name} must be boolean (True = keep) or 0/1 integers, got {m.dtype}")
        m = m.bool()
    return m


# --- numbers and options ----------------------------------------------------------------------------------
def _real(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_real(name: str, value) -> float:
    """A finite real number (a 0-d tensor or numpy scalar is accepted) as a float."""
    return _real(name, value)


def check_positive(name: str, value) -> float:
    """A finite number > 0 (a temperature, a learning rate, an epsilon)."""
    v = _real(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def check_nonnegative(name: str, value) -> float:
    """A finite number >= 0 (a margin, a weight decay, a clip norm)."""
    v = _real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def check_probability(name: str, value, open_low: bool = False, open_high: bool = False) -> float:
    """A number in [0, 1] (optionally excluding an end): a momentum, a dropout rate, an alpha."""
    v = _real(name, value)
    if v < 0 or v > 1 or (open_low and v == 0) or (open_high and v == 1):
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {v}")
    return v


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number within [minimum, maximum] (a batch size, k, a count)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices: Iterable) -> object:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value

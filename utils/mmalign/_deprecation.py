"""Old call styles that keep working for one release, with a warning that says what to write instead.

Release 0.2 gave the library one vocabulary (CONTRIBUTING.md, "One vocabulary"): item ids are ``ids``
everywhere, and in losses and miners only the tensors are positional, every setting is a keyword. The
0.1 spellings (``labels_a``/``labels_b``, ``item_ids``, ``img_ids``/``txt_ids``, ``row_ids``/``col_ids``,
``q_ids``/``queue_ids``, settings passed by position in the old order) are mapped onto the new ones
by :func:`keyword_settings` and raise a :class:`MmalignDeprecationWarning`; release 0.3 removes them.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Callable

__all__ = ["MmalignDeprecationWarning", "keyword_settings", "warn_deprecated"]


class MmalignDeprecationWarning(DeprecationWarning):
    """A 0.1 spelling that still works in 0.2 and is removed in 0.3."""


def warn_deprecated(message: str, stacklevel: int = 3) -> None:
    """Warn that a 0.1 spelling was used; with ``MMALIGN_DEPRECATIONS=error`` in the environment, raise
    instead (to find every old spelling in a code base, notebooks included: their kernels inherit it)."""
    message += " (the old spelling is removed in mmalign 0.3)"
    if os.environ.get("MMALIGN_DEPRECATIONS", "").lower() == "error":
        raise MmalignDeprecationWarning(message)
    warnings.warn(message, MmalignDeprecationWarning, stacklevel=stacklevel)


def keyword_settings(old_order: tuple[str, ...] = (), renamed: dict[str, str] | None = None,
                     id_pairs: dict[tuple[str, str], str] | None = None) -> Callable:
    """Decorate a function whose settings became keyword-only, mapping the 0.1 call style onto it.

    Args:
        old_order: the 0.1 names of the arguments that followed the (still positional) tensors, in their
            0.1 order; extra positional arguments are bound to these names, with a warning.
        renamed: ``{old name: new name}`` of keywords that were renamed.
        id_pairs: ``{(old name of the first side, old name of the second side): new name}``: two 0.1 id
            arguments that became one ``ids`` pair; a side left out becomes None.
    """
    renamed = dict(renamed or {})
    id_pairs = dict(id_pairs or {})

    def decorate(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        n_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params.values())
        name = fn.__qualname__

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > n_positional:
                extra = args[n_positional:]
                if len(extra) > len(old_order):
                    raise TypeError(f"{name}() takes {n_positional} positional arguments but {len(args)} were given")
                names = old_order[:len(extra)]
                for old in names:
                    if old in kwargs:
                        raise TypeError(f"{name}() got multiple values for argument {old!r}")
                kwargs.update(zip(names, extra))
                args = args[:n_positional]
                warn_deprecated(f"{name}(): passing {', '.join(names)} by position is deprecated; pass every "
                                f"setting by keyword, e.g. {name}(..., {_new_name(names[0], renamed, id_pairs)}=...)")
            for (first, second), new in id_pairs.items():
                # (a pair whose first side kept the new name, e.g. ids/queue_ids -> ids, triggers on the second)
                if any(t in kwargs for t in ((second,) if first == new else (first, second))):
                    if new in kwargs and new != first:
                        raise TypeError(f"{name}() got both {new!r} and the deprecated {first!r}/{second!r}; pass {new} only")
                    pair = (kwargs.pop(first, None), kwargs.pop(second, None))
                    kwargs[new] = None if pair == (None, None) else pair
                    warn_deprecated(f"{name}(): {first}/{second} are deprecated; pass {new}=({first}, {second}) "
                                    f"(or {new}=one tensor when both sides share the ids)")
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {new!r} and the deprecated {old!r}; pass {new} only")
                    kwargs[new] = kwargs.pop(old)
                    warn_deprecated(f"{name}(): {old}= is deprecated; write {new}=")
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def _new_name(old: str, renamed: dict[str, str], id_pairs: dict[tuple[str, str], str]) -> str:
    for pair, new in id_pairs.items():
        if old in pair:
            return new
    return renamed.get(old, old)

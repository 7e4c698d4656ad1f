"""Several seeds for a reference table: which seeds a profile runs, and mean / spread of per-seed tables.

The rule of CONTRIBUTING.md: where two variants differ by less than their spread, the full profile runs
several seeds and the chapter shows mean and spread. A chapter's ``run`` trains its table once per seed of
:func:`seeds_for` and summarises with :func:`summarize`::

    per_seed = {seed: table_for(seed) for seed in seeds_for(cfg)}     # {seed: {row: {column: value}}}
    out = summarize(per_seed)   # {"seeds": [...], "table": mean, "std": ..., "per_seed": {...}}

``std`` is the sample standard deviation over seeds (ddof = 1; 0 for a single seed). Two rows whose
means differ by less than :func:`gap_is_measured`'s bound are "no measured difference".
"""

from __future__ import annotations

import math

from ..checks import check_int

FULL_SEEDS = 3  # seeds of the full and gpu profiles (the CI profile runs one: it must fit 90 s)


def seeds_for(cfg, n: int | None = None) -> list[int]:
    """``[cfg.seed, cfg.seed + 1, ...]``: one seed in the CI profile, :data:`FULL_SEEDS` otherwise."""
    if n is None:
        n = 1 if cfg.profile == "ci" else FULL_SEEDS
    check_int("n", n, minimum=1)
    return [cfg.seed + i for i in range(n)]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std needs at least one value, got an empty list")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _combine(tables: list, how: str):
    first = tables[0]
    if isinstance(first, dict):
        return {k: _combine([t[k] for t in tables], how) for k in first if all(k in t for t in tables)}
    if _is_number(first) and all(_is_number(t) for t in tables):
        m, s = mean_std([float(t) for t in tables])
        return m if how == "mean" else s
    return first if how == "mean" else None


def summarize(per_seed: dict[int, dict]) -> dict:
    """``{"seeds", "table" (mean per number), "std" (per number), "per_seed" ({str(seed): table})}``.

    Every seed's table must have the same nested keys; non-numeric leaves are copied from the first seed
    into ``table`` and are ``None`` in ``std``.
    """
    if not per_seed:
        raise ValueError("summarize needs at least one seed's table, got none")
    seeds = list(per_seed)
    tables = [per_seed[s] for s in seeds]
    return {"seeds": seeds, "table": _combine(tables, "mean"), "std": _combine(tables, "std"),
            "per_seed": {str(s): per_seed[s] for s in seeds}}


def no_measured_difference(mean_a: float, std_a: float, mean_b: float, std_b: float) -> bool:
    """True when two means differ by less than the larger of their two seed spreads (one std)."""
    return abs(mean_a - mean_b) < max(std_a, std_b)


def mean_std_frame(table: dict, std: dict | None, columns=None, digits: int = 1):
    """A pandas DataFrame of ``"mean ± std"`` strings (rows of ``table``; ``std`` of the same shape, or None
    or a missing row for a single seed, shown as the mean alone)."""
    import pandas as pd

    columns = list(columns or next(iter(table.values())))
    rows = {}
    for name, row in table.items():
        spread = (std or {}).get(name) or {}
        rows[name] = {c: (f"{row[c]:.{digits}f} ± {spread[c]:.{digits}f}" if spread.get(c) is not None
                          else f"{row[c]:.{digits}f}") for c in columns if c in row}
    return pd.DataFrame(rows).T

r"""Several seeds for a reference table: which seeds a profile runs, and mean / spread of per-seed tables.

The rule of CONTRIBUTING.md: where two variants may differ by little, the full profile runs several seeds
(the same seeds for every variant) and the chapter shows mean and spread. A chapter's ``run`` trains its
table once per seed of :func:`seeds_for` and summarises with :func:`summarize`::

    per_seed = {seed: table_for(seed) for seed in seeds_for(cfg)}     # {seed: {row: {column: value}}}
    out = summarize(per_seed)   # {"seeds": [...], "table": mean, "std": ..., "per_seed": {...}}

``std`` is the sample standard deviation over seeds (ddof = 1; 0 for a single seed).

**The course's one evidence rule** (CONTRIBUTING.md, "Claims and numbers"): two variants run on the same
seeds (same seed = same data order and initialisation) are compared by their **paired per-seed
differences** :math:`d_s = a_s - b_s`, never by their means and spreads alone. :func:`paired_difference`
reports the mean difference, its sample standard deviation, its standard error
:math:`\mathrm{se} = \mathrm{sd}/\sqrt{n}` and the sign count, and calls the difference **measured** when

* there are at least :data:`MIN_SEEDS` seeds,
* every :math:`d_s` has the same sign (none is zero), and
* :math:`|\bar d| > ` :data:`SE_FACTOR` :math:`\cdot\,\mathrm{se}`.

Otherwise the verdict is "no measured difference". One seed (the CI profile) never measures a difference::

    d = paired_difference(per_seed_values(out, "DFE-6", "rsum"), per_seed_values(out, "baseline", "rsum"))
    d.verdict          # "higher", "lower" or "no measured difference"
    d.describe()       # "+4.2 ± 1.1 (se 0.6, 3/3 seeds higher): higher"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..checks import check_int

FULL_SEEDS = 3  # seeds of the full and gpu profiles (the CI profile runs one: it must fit 90 s)
MIN_SEEDS = 2  # a difference needs at least this many paired seeds to be "measured"
SE_FACTOR = 2.0  # ... and a mean difference larger than this many standard errors


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


@dataclass(frozen=True)
class PairedDifference:
    """Paired per-seed differences a - b: mean, sample std, standard error, sign counts and the verdict."""

    mean: float
    std: float
    se: float
    n: int
    higher: int  # seeds where a > b
    lower: int  # seeds where a < b
    measured: bool
    differences: tuple = ()

    @property
    def verdict(self) -> str:
        """``"higher"`` (a > b, measured), ``"lower"`` (a < b, measured) or ``"no measured difference"``."""
        if not self.measured:
            return "no measured difference"
        return "higher" if self.mean > 0 else "lower"

    def describe(self, digits: int = 1) -> str:
        """E.g. ``"+4.2 ± 1.1 (se 0.6, 3/3 seeds higher): higher"``."""
        side = "higher" if self.higher >= self.lower else "lower"
        count = max(self.higher, self.lower)
        return (f"{self.mean:+.{digits}f} ± {self.std:.{digits}f} (se {self.se:.{digits}f}, "
                f"{count}/{self.n} seeds {side}): {self.verdict}")

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "se": self.se, "n": self.n, "higher": self.higher,
                "lower": self.lower, "measured": self.measured, "verdict": self.verdict}


def _paired(a, b) -> tuple[list[float], list[float]]:
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise ValueError("paired_difference needs a and b of one kind: two {seed: value} mappings or two "
                         f"sequences in the same seed order, got {type(a).__name__} and {type(b).__name__}")
    if isinstance(a, Mapping):
        if set(map(str, a)) != set(map(str, b)):
            raise ValueError(f"a and b were run on different seeds ({sorted(map(str, a))} vs {sorted(map(str, b))}); "
                             "a paired comparison needs the same seeds on both sides")
        keys = sorted(a, key=str)
        bb = {str(k): v for k, v in b.items()}
        a, b = [a[k] for k in keys], [bb[str(k)] for k in keys]
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b need the same, non-zero number of seeds, got {len(a)} and {len(b)}")
    for name, values in (("a", a), ("b", b)):
        for v in values:
            if not _is_number(v) or not math.isfinite(v):
                raise ValueError(f"{name} holds {v!r}; per-seed values must be finite numbers")
    return [float(v) for v in a], [float(v) for v in b]


def paired_difference(a, b, *, se_factor: float = SE_FACTOR, min_seeds: int = MIN_SEEDS) -> PairedDifference:
    """The course's evidence rule on per-seed values of two variants run on the same seeds.

    ``a``, ``b``: ``{seed: value}`` mappings with the same seeds, or sequences in the same seed order.
    Measured when ``n >= min_seeds``, every difference has the same (non-zero) sign and
    ``|mean| > se_factor * se`` (se = sample std / sqrt(n)).
    """
    a, b = _paired(a, b)
    d = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(d)
    n = len(d)
    se = std / math.sqrt(n)
    higher, lower = sum(x > 0 for x in d), sum(x < 0 for x in d)
    measured = n >= min_seeds and (higher == n or lower == n) and abs(mean) > se_factor * se
    return PairedDifference(mean, std, se, n, higher, lower, measured, tuple(d))


def per_seed_values(summary: dict, *keys) -> dict[str, float]:
    """``{seed: value}`` of one number of a :func:`summarize` output, e.g. ``per_seed_values(out, "DFE-6", "rsum")``."""
    if "per_seed" not in summary:
        raise ValueError("per_seed_values needs the output of summarize (a dict with 'per_seed'), got keys "
                         f"{sorted(summary)[:8]}")
    out = {}
    for seed, table in summary["per_seed"].items():
        v = table
        for k in keys:
            if not isinstance(v, Mapping) or k not in v:
                raise ValueError(f"seed {seed}'s table has no entry {keys!r} (missing {k!r})")
            v = v[k]
        out[seed] = v
    return out


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

"""Several seeds of a reference table: mean and sample standard deviation per number, against hand values."""

import math

import pytest

from mmalign.config import load_config
from mmalign.experiments.seeds import mean_std, seeds_for, summarize


def test_mean_std_hand_values():
    assert mean_std([2.0, 4.0, 9.0]) == pytest.approx((5.0, math.sqrt(((-3) ** 2 + 1 + 16) / 2)))
    assert mean_std([3.5]) == (3.5, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def test_summarize_nested_tables_keeps_per_seed_values_and_text():
    per_seed = {0: {"a": {"x": 1.0, "n": 3, "s": "left"}, "b": {"x": 0.0}},
                1: {"a": {"x": 3.0, "n": 5, "s": "left"}, "b": {"x": 2.0}},
                2: {"a": {"x": 5.0, "n": 7, "s": "left"}, "b": {"x": 4.0}}}
    out = summarize(per_seed)
    assert out["seeds"] == [0, 1, 2]
    assert out["table"]["a"] == {"x": 3.0, "n": 5.0, "s": "left"}
    assert out["std"]["a"]["x"] == pytest.approx(2.0) and out["std"]["a"]["s"] is None
    assert out["per_seed"]["1"]["b"]["x"] == 2.0
    with pytest.raises(ValueError, match="at least one seed"):
        summarize({})


def test_seeds_per_profile():
    assert seeds_for(load_config("ci")) == [0]
    assert seeds_for(load_config("full")) == [0, 1, 2]
    assert seeds_for(load_config("ci"), 2) == [0, 1]
    with pytest.raises(ValueError, match="n must be >= 1"):
        seeds_for(load_config("ci"), 0)
    import mmalign.experiments.seeds as seeds

    assert not hasattr(seeds, "no_measured_difference"), "the unpaired spread rule is gone: use paired_difference"


def test_paired_difference_hand_worked_three_seeds():
    from mmalign.experiments.seeds import paired_difference
    # a - b per seed: +3, +1, +2 -> mean 2, sd 1, se 1/sqrt(3) = 0.577; 2 > 2 * 0.577: measured, higher
    d = paired_difference({0: 13.0, 1: 11.0, 2: 12.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert (d.mean, d.std, d.n, d.higher, d.lower) == (2.0, 1.0, 3, 3, 0)
    assert d.se == pytest.approx(1 / math.sqrt(3))
    assert d.measured and d.verdict == "higher"
    assert d.describe() == "+2.0 ± 1.0 (se 0.6, 3/3 seeds higher): higher"
    # same means as an unpaired view would see, but the signs disagree: +5, -1, +2 -> not measured
    d = paired_difference([15.0, 9.0, 12.0], [10.0, 10.0, 10.0])
    assert (d.higher, d.lower) == (2, 1) and not d.measured and d.verdict == "no measured difference"
    # every seed the same sign but the mean is within 2 se: -0.5, -4, -0.2 -> mean -1.567, sd 2.11, se 1.22
    d = paired_difference([9.5, 6.0, 9.8], [10.0, 10.0, 10.0])
    assert d.lower == 3 and d.mean == pytest.approx(-1.5666667) and not d.measured
    # a constant gap is measured (se 0), lower
    d = paired_difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert d.measured and d.verdict == "lower" and d.se == 0.0
    # a tie on one seed is not a sign: not measured
    assert not paired_difference([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]).measured


def test_paired_difference_one_seed_and_pairing_by_seed():
    from mmalign.experiments.seeds import paired_difference, per_seed_values, summarize
    assert not paired_difference([5.0], [1.0]).measured  # one seed never measures a difference
    # mappings are paired by seed, not by order
    d = paired_difference({"0": 1.0, "1": 5.0}, {"1": 4.0, "0": 0.0})
    assert d.differences == (1.0, 1.0)
    out = summarize({0: {"x": {"r": 3.0}, "y": {"r": 1.0}}, 1: {"x": {"r": 4.0}, "y": {"r": 1.5}}})
    assert per_seed_values(out, "x", "r") == {"0": 3.0, "1": 4.0}
    assert paired_difference(per_seed_values(out, "x", "r"), per_seed_values(out, "y", "r")).verdict == "higher"
    with pytest.raises(ValueError, match="different seeds"):
        paired_difference({0: 1.0}, {1: 1.0})
    with pytest.raises(ValueError, match="same, non-zero number"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite numbers"):
        paired_difference([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="no entry"):
        per_seed_values(out, "x", "missing")

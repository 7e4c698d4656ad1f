"""Several seeds of a reference table: mean and sample standard deviation per number, against hand values."""

import math

import pytest

from mmalign.config import load_config
from mmalign.experiments.seeds import mean_std, no_measured_difference, seeds_for, summarize


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


def test_seeds_per_profile_and_the_spread_rule():
    assert seeds_for(load_config("ci")) == [0]
    assert seeds_for(load_config("full")) == [0, 1, 2]
    assert seeds_for(load_config("ci"), 2) == [0, 1]
    with pytest.raises(ValueError, match="n must be >= 1"):
        seeds_for(load_config("ci"), 0)
    assert no_measured_difference(10.0, 1.0, 10.5, 0.2)
    assert not no_measured_difference(10.0, 1.0, 12.0, 0.5)

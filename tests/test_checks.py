"""The input-check policy (mmalign.checks): what is checked, the switch for the finiteness scans
(context manager, set_enabled, MMALIGN_CHECKS) and the wording of the messages."""

import math
import threading

import numpy as np
import pytest
import torch

from mmalign import checks
from mmalign.checks import (check_all_finite, check_choice, check_embeddings, check_finite, check_finite_result,
                            check_ids, check_int, check_mask, check_nonnegative, check_positive, check_probability,
                            check_same_width, check_tensor)
from mmalign.losses import info_nce


@pytest.fixture(autouse=True)
def _default_switch(monkeypatch):
    monkeypatch.delenv("MMALIGN_CHECKS", raising=False)
    checks.set_enabled(None)
    yield
    checks.set_enabled(None)


def nan_batch():
    a = torch.randn(4, 3)
    a[2, 1] = float("nan")
    return a


# ---------------------------------------------------------------- the switch
def test_on_by_default_and_disabled_skips_only_the_scan():
    assert checks.enabled()
    with pytest.raises(ValueError, match=r"a holds NaN or inf values \(1 NaN, 0 inf"):
        info_nce(nan_batch(), torch.randn(4, 3))
    with checks.disabled():
        assert not checks.enabled()
        loss = info_nce(nan_batch(), torch.randn(4, 3))  # scan off: the NaN goes through
        assert torch.isnan(loss)
        with pytest.raises(ValueError, match="embedding sizes differ"):  # structure still checked
            info_nce(torch.randn(4, 3), torch.randn(4, 5))
        with pytest.raises(ValueError, match="temperature must be > 0"):
            info_nce(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)
    assert checks.enabled()


def test_disabled_restores_the_previous_state_even_on_error():
    checks.set_enabled(False)
    with pytest.raises(RuntimeError):
        with checks.disabled():
            raise RuntimeError("boom")
    assert checks.enabled() is False
    checks.set_enabled(True)
    with checks.disabled():
        pass
    assert checks.enabled() is True


def test_set_enabled_none_falls_back_to_the_environment(monkeypatch):
    checks.set_enabled(False)
    assert not checks.enabled()
    checks.set_enabled(None)
    assert checks.enabled()
    monkeypatch.setenv("MMALIGN_CHECKS", "0")
    assert not checks.enabled()
    checks.set_enabled(True)  # an explicit setting wins over the variable
    assert checks.enabled()


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("false", False), ("FALSE", False),
                                       ("1", True), ("on", True), ("true", True), ("", True), (" 0 ", False)])
def test_env_var(monkeypatch, value, on):
    monkeypatch.setenv("MMALIGN_CHECKS", value)
    assert checks.enabled() is on
    if on:
        with pytest.raises(ValueError, match="NaN or inf"):
            check_finite("x", nan_batch())
    else:
        assert check_finite("x", nan_batch()).shape == (4, 3)


def test_env_var_not_understood(monkeypatch):
    monkeypatch.setenv("MMALIGN_CHECKS", "maybe")
    with pytest.raises(ValueError, match=r"MMALIGN_CHECKS='maybe' is not understood; use 1 .* or 0"):
        checks.enabled()


def test_switch_is_per_thread():
    seen = {}
    with checks.disabled():
        t = threading.Thread(target=lambda: seen.setdefault("other", checks.enabled()))
        t.start()
        t.join()
        seen["here"] = checks.enabled()
    assert seen == {"other": True, "here": False}


# ---------------------------------------------------------------- the scans
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad, counts", [(float("nan"), "1 NaN, 0 inf"), (float("inf"), "0 NaN, 1 inf"),
                                         (float("-inf"), "0 NaN, 1 inf")])
def test_finite_scan_counts(dtype, bad, counts):
    x = torch.zeros(3, 5, dtype=dtype)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=rf"emb holds NaN or inf values \({counts}, shape \(3, 5\)\); find where"):
        check_finite("emb", x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_finite_scan_has_no_false_alarm_when_the_sum_overflows(dtype):
    big = torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype)  # finite, but its sum is inf
    assert check_finite("big", big) is big
    check_all_finite(("a", big), ("b", big))
    assert check_finite_result("loss", big) is big


def test_all_finite_names_the_first_bad_tensor_and_skips_none_and_ints():
    a, b = torch.randn(2, 2), nan_batch()
    with pytest.raises(ValueError, match="^b holds NaN"):
        check_all_finite(("a", a), ("ids", torch.arange(3)), ("none", None), ("b", b))
    check_all_finite(("a", a), ("empty", torch.zeros(0)), ("none", None))


def test_finite_result_blames_an_input_or_the_computation():
    a = nan_batch()
    with pytest.raises(ValueError, match="^a holds NaN"):
        check_finite_result("loss", a.sum(), ("a", a))
    with pytest.raises(ValueError, match="loss is not finite although the inputs are; lower the scale"):
        check_finite_result("loss", torch.tensor(float("inf")), ("a", torch.ones(2)), hint="lower the scale")
    with checks.disabled():
        check_finite_result("loss", torch.tensor(float("nan")), ("a", a))


# ---------------------------------------------------------------- structural helpers and their messages
def test_check_tensor_messages():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list; convert it with torch.as_tensor"):
        check_tensor("x", [1.0, 2.0])
    with pytest.raises(ValueError, match=r"x must be 2-d or 3-d, got shape \(4,\)"):
        check_tensor("x", torch.zeros(4), ndim=(2, 3))
    with pytest.raises(ValueError, match=r"x must be a real floating-point tensor .* got torch.int64; use x.float\(\)"):
        check_tensor("x", torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="got torch.complex64"):
        check_tensor("x", torch.zeros(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"x is empty \(shape \(0, 3\)\): pass at least one row"):
        check_tensor("x", torch.zeros(0, 3))
    assert check_tensor("x", torch.zeros(0, 3), nonempty=False).shape == (0, 3)
    assert check_tensor("i", torch.arange(3), floating=False).dtype == torch.long


def test_check_embeddings_and_width_messages():
    with pytest.raises(ValueError, match=r"e has zero width \(shape \(3, 0\)\)"):
        check_embeddings("e", torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"e must have 8 features per row, got 6 \(shape \(2, 6\)\)"):
        check_embeddings("e", torch.zeros(2, 6), dim=8)
    with pytest.raises(ValueError, match=r"a and b have different widths \(8 vs 6\); project both"):
        check_same_width("a", torch.zeros(2, 8), "b", torch.zeros(2, 6))
    with checks.disabled():
        check_embeddings("e", nan_batch())
    check_embeddings("e", nan_batch(), finite=False)


def test_check_ids_and_mask():
    assert check_ids("ids", np.arange(3, dtype=np.int32), 3).dtype == torch.long
    with pytest.raises(ValueError, match="ids must hold integer ids, got torch.float32"):
        check_ids("ids", torch.zeros(3), 3)
    with pytest.raises(ValueError, match="ids must hold integer ids, got torch.bool"):
        check_ids("ids", torch.ones(3, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match=r"ids must be 1-d with one id per row \(3 rows\), got shape \(2,\)"):
        check_ids("ids", [0, 1], 3)
    assert check_mask("m", [[1, 0]], (1, 2)).tolist() == [[True, False]]
    with pytest.raises(ValueError, match=r"m must have shape \(1, 2\), got \(2,\)"):
        check_mask("m", [1, 0], (1, 2))
    with pytest.raises(ValueError, match="m must be boolean .* or 0/1 integers"):
        check_mask("m", [[2, 0]], (1, 2))
    with pytest.raises(ValueError, match="m must be boolean"):
        check_mask("m", [[0.5, 1.0]], (1, 2))


@pytest.mark.parametrize("fn, value, exc, match", [
    (check_positive, 0, ValueError, r"t must be > 0, got 0.0"),
    (check_positive, -1e-9, ValueError, r"t must be > 0"),
    (check_positive, float("nan"), ValueError, r"t must be finite, got nan"),
    (check_positive, float("inf"), ValueError, r"t must be finite, got inf"),
    (check_positive, "0.1", TypeError, r"t must be a real number, got str '0.1'"),
    (check_positive, True, TypeError, r"t must be a real number, got bool"),
    (check_positive, torch.ones(2), ValueError, r"t must be a number, got a tensor of shape \(2,\)"),
    (check_nonnegative, -0.5, ValueError, r"t must be >= 0, got -0.5"),
    (check_probability, 1.5, ValueError, r"t must be in \[0, 1\], got 1.5"),
    (check_int, 2.0, TypeError, r"t must be a whole number, got float 2.0"),
    (check_int, True, TypeError, r"t must be a whole number, got bool"),
])
def test_number_messages(fn, value, exc, match):
    with pytest.raises(exc, match=match):
        fn("t", value)


def test_number_helpers_accept_and_convert():
    assert check_positive("t", torch.tensor(0.5)) == 0.5
    assert check_positive("t", np.float32(0.25)) == 0.25
    assert check_nonnegative("m", 0) == 0.0
    assert check_probability("p", 0.0) == 0.0 and check_probability("p", 1) == 1.0
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\), got 1.0"):
        check_probability("p", 1.0, open_low=True, open_high=True)
    assert check_int("k", np.int64(3), minimum=1) == 3
    assert check_int("k", torch.tensor(4)) == 4
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        check_int("k", 0, minimum=1)
    with pytest.raises(ValueError, match="k must be <= 6, got 7"):
        check_int("k", 7, maximum=6)
    assert check_choice("mode", "sum", ("mean", "sum")) == "sum"
    with pytest.raises(ValueError, match=r"mode must be one of \('mean', 'sum'\), got 'avg'"):
        check_choice("mode", "avg", ("mean", "sum"))
    assert math.isfinite(check_positive("lr", 1e-300))

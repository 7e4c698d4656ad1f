"""Bad inputs in the modules added with chapters 7-9 (issue 22): ``ot``, ``losses.codis``, ``models.codis``,
``evaluation``, ``data.pairs`` and ``models.temperature``. Each case raises a clear error naming the
argument (pytest.raises with match= on the message), or gives the documented, exactly checked result."""

import math
import zipfile

import numpy as np
import pytest
import torch

from mmalign.ot import cost_matrix, entropy, ipot, marginal_error, sinkhorn, uniform

NAN, INF = float("nan"), float("inf")


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------ ot
COST = rand(3, 4, 5)  # a batch of three 4 x 5 costs
PLAN = torch.full((4, 5), 0.05)
UNEQUAL = torch.full((3, 4), 0.25)
UNEQUAL[1] *= 2  # element 1 only

OT_CASES = {
    "sinkhorn marginal batch mismatch": (lambda: sinkhorn(COST, 0.1, a=torch.full((2, 4), 0.25)), ValueError,
                                         r"^a has batch shape \(2,\) but the cost has batch shape \(3,\)"),
    "ipot marginal extra batch dims": (lambda: ipot(COST[0], 0.5, b=torch.full((2, 5), 0.2)), ValueError,
                                       r"^b has batch shape \(2,\) but the cost has batch shape \(\)"),
    "sinkhorn unequal mass names the element": (lambda: sinkhorn(COST, 0.1, a=UNEQUAL), ValueError,
                                                r"different total mass at batch element \(1,\) \(a sums to 2, b to 1\)"),
    "sinkhorn 0-d marginal": (lambda: sinkhorn(COST[0], 0.1, a=torch.tensor(1.0)), ValueError, r"^a has a 0-d tensor"),
    "sinkhorn nan marginal": (lambda: sinkhorn(COST[0], 0.1, a=torch.tensor([NAN, 0.5, 0.25, 0.25])), ValueError,
                              r"^a holds NaN or inf values \(1 NaN"),
    "sinkhorn int marginal": (lambda: sinkhorn(COST[0], 0.1, b=torch.ones(5, dtype=torch.long)), ValueError,
                              r"^b must be a real floating-point tensor"),
    "sinkhorn zero mass": (lambda: sinkhorn(COST[0], 0.1, a=torch.zeros(4), b=torch.zeros(5)), ValueError, r"zero total mass"),
    "sinkhorn empty cost": (lambda: sinkhorn(torch.zeros(0, 3), 0.1), ValueError, r"^cost is empty \(shape \(0, 3\)\)"),
    "ipot beta 0": (lambda: ipot(COST, 0.0), ValueError, r"^beta must be > 0, got 0.0"),
    "ipot beta nan": (lambda: ipot(COST, NAN), ValueError, r"^beta must be finite, got nan"),
    "ipot beta string": (lambda: ipot(COST, "0.5"), TypeError, r"^beta must be a real number"),
    "sinkhorn epsilon nan": (lambda: sinkhorn(COST, NAN), ValueError, r"^epsilon must be finite"),
    "ipot inner_iters 0": (lambda: ipot(COST, 0.5, inner_iters=0), ValueError, r"^inner_iters must be >= 1"),
    "sinkhorn tol negative": (lambda: sinkhorn(COST, 0.1, tol=-1e-3), ValueError, r"^tol must be > 0"),
    "marginal_error length-1 marginal": (lambda: marginal_error(PLAN, torch.ones(1)), ValueError,
                                         r"^a has 1 entries \(shape \(1,\)\) but the plan has 4 rows"),
    "marginal_error nan marginal": (lambda: marginal_error(PLAN, b=torch.full((5,), NAN)), ValueError, r"^b holds NaN"),
    "marginal_error negative marginal": (lambda: marginal_error(PLAN, a=torch.tensor([0.5, 0.5, 0.5, -0.5])), ValueError,
                                         r"^a has negative masses"),
    "marginal_error batch mismatch": (lambda: marginal_error(PLAN.expand(3, 4, 5), a=torch.full((2, 4), 0.25)),
                                      ValueError, r"^a has batch shape \(2,\) but the plan has batch shape \(3,\)"),
    "marginal_error 1-d plan": (lambda: marginal_error(torch.ones(4)), ValueError, r"^plan must be a non-empty \(\.\.\., N, K\)"),
    "marginal_error nan plan": (lambda: marginal_error(torch.full((2, 2), NAN)), ValueError, r"^plan holds NaN"),
    "entropy nan plan": (lambda: entropy(torch.tensor([[NAN, 0.5], [0.25, 0.25]])), ValueError, r"^plan holds NaN or inf"),
    "entropy complex plan": (lambda: entropy(torch.full((2, 2), 0.25, dtype=torch.complex64)), ValueError,
                             r"^plan must be a real floating-point tensor .*complex64"),
    "entropy int plan": (lambda: entropy(torch.eye(3, dtype=torch.long)), ValueError, r"^plan must be a real floating-point"),
    "entropy negative plan": (lambda: entropy(torch.tensor([[0.5, -0.1], [0.3, 0.3]])), ValueError,
                              r"^plan has negative entries \(smallest -0.1"),
    "entropy 1-d plan": (lambda: entropy(torch.full((4,), 0.25)), ValueError, r"^plan must be a non-empty \(\.\.\., N, K\)"),
    "entropy list plan": (lambda: entropy([[0.5, 0.5]]), TypeError, r"^plan must be a torch.Tensor"),
    "uniform n 0": (lambda: uniform(0, PLAN), ValueError, r"^n must be >= 1"),
    "uniform like not a tensor": (lambda: uniform(3, 1.0), TypeError, r"^like must be a torch.Tensor"),
    "cost_matrix nan features": (lambda: cost_matrix(torch.full((2, 3), NAN), rand(4, 3)), ValueError, r"^features holds NaN"),
}


def test_entropy_clamps_lp_round_off_to_zero():
    """An LP solver's -1e-9 entry counts as 0 (documented), so the entropy is that of the clean plan."""
    clean = torch.tensor([[0.5, 0.0], [0.25, 0.25]], dtype=torch.float64)
    noisy = clean.clone()
    noisy[0, 1] = -1e-9
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert float(entropy(noisy)) == pytest.approx(want, abs=1e-12)
    assert float(entropy(noisy)) == float(entropy(clean))


def test_marginal_error_of_per_element_marginals():
    plan = torch.stack([torch.full((2, 2), 0.25), torch.tensor([[0.5, 0.0], [0.0, 0.5]])])
    a = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    # element 0 matches a[0]; element 1 has rows (0.5, 0.5) against (0.75, 0.25): 0.5 on the rows
    assert marginal_error(plan, a).tolist() == pytest.approx([0.0, 0.5])
    # one (K,) marginal for every element broadcasts, as in the solvers
    assert marginal_error(plan, b=torch.tensor([0.5, 0.5])).tolist() == pytest.approx([0.0, 0.0])


def test_solvers_take_one_marginal_per_batch_element():
    a = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    cost = torch.zeros(2, 2, 2, dtype=torch.float64)
    r = sinkhorn(cost, 1.0, a=a, n_iters=50)
    assert torch.allclose(r.plan.sum(-1), a, atol=1e-10)


# ------------------------------------------------------------------------ every case above
CASES = {**OT_CASES}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_a_clear_error(name):
    fn, exc, match = CASES[name]
    with pytest.raises(exc, match=match):
        fn()

"""Optimal transport (mmalign.ot): values against hand-worked cases, brute force and each other."""

import itertools

import pytest
import torch

from mmalign.ot import cost_matrix, entropy, ipot, marginal_error, sinkhorn, uniform

SOLVERS = [("sinkhorn", sinkhorn), ("ipot", ipot)]


def exact_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The optimal permutation of a square cost by brute force; plan (n, n) with mass 1/n per entry."""
    n = cost.shape[0]
    best = min(itertools.permutations(range(n)), key=lambda p: float(cost[range(n), list(p)].sum()))
    plan = torch.zeros_like(cost)
    plan[range(n), list(best)] = 1.0 / n
    return plan, float((plan * cost).sum())


def naive_sinkhorn(cost, eps, a, b, n_iters):
    """The textbook (non-log) Sinkhorn, float64: u = a / K v, v = b / K^T u."""
    k = torch.exp(-cost / eps)
    v = torch.ones_like(b)
    for _ in range(n_iters):
        u = a / (k @ v)
        v = b / (k.T @ u)
    return u[:, None] * k * v[None, :]


@pytest.mark.parametrize("name,fn", SOLVERS)
def test_marginals_hold(name, fn):
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(7, 5, generator=g, dtype=torch.float64)
    a = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    r = fn(cost, 0.1, a, b, n_iters=500)
    assert torch.allclose(r.plan.sum(1), a, atol=1e-8), f"{name}: rows {r.plan.sum(1)} vs a {a}"
    assert torch.allclose(r.plan.sum(0), b, atol=1e-10)
    assert float(marginal_error(r.plan, a, b)) < 1e-6
    assert (r.plan >= 0).all()


def test_sinkhorn_matches_textbook_iterations():
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(6, 4, generator=g, dtype=torch.float64)
    a, b = uniform(6, cost), uniform(4, cost)
    for n in (1, 3, 25):
        ref = naive_sinkhorn(cost, 0.3, a, b, n)
        assert torch.allclose(sinkhorn(cost, 0.3, n_iters=n).plan, ref, atol=1e-12)


def test_hand_worked_2x2():
    # cost [[0, 1], [1, 0]], uniform marginals: T = [[p, 1/2 - p], [1/2 - p, p]] and the entropic optimum
    # satisfies p / (1/2 - p) = e^{1/eps}, i.e. p = e^{1/eps} / (2 (1 + e^{1/eps})).
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    eps = 0.5
    p = torch.exp(torch.tensor(1 / eps, dtype=torch.float64)) / (2 * (1 + torch.exp(torch.tensor(1 / eps, dtype=torch.float64))))
    want = torch.tensor([[p, 0.5 - p], [0.5 - p, p]], dtype=torch.float64)
    r = sinkhorn(cost, eps, n_iters=50)
    assert torch.allclose(r.plan, want, atol=1e-12)
    assert float(r.cost) == pytest.approx(float(1 - 2 * p), abs=1e-12)
    # IPOT converges to the exact plan diag(1/2, 1/2), cost 0
    q = ipot(cost, 0.5, n_iters=200)
    assert torch.allclose(q.plan, torch.eye(2, dtype=torch.float64) / 2, atol=1e-10)
    assert float(q.cost) == pytest.approx(0.0, abs=1e-10)


def test_hand_worked_3x3():
    # the optimal permutation is 0->1, 1->2, 2->0 (cost 1 + 1 + 1 = 3, every other is >= 5)
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 5.0, 1.0], [1.0, 2.0, 4.0]], dtype=torch.float64)
    want = torch.zeros(3, 3, dtype=torch.float64)
    want[0, 1] = want[1, 2] = want[2, 0] = 1 / 3
    for name, fn in SOLVERS:
        r = fn(cost, 0.05, n_iters=500)
        assert torch.allclose(r.plan, want, atol=1e-6), f"{name}: {r.plan}"
        assert float(r.cost) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_brute_force_assignment(seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(5, 5, generator=g, dtype=torch.float64)
    plan, best = exact_assignment(cost)
    q = ipot(cost, 0.05, n_iters=2000)
    assert float(q.cost) == pytest.approx(best, abs=1e-6)
    assert torch.allclose(q.plan, plan, atol=1e-4)
    s = sinkhorn(cost, 0.002, n_iters=5000)
    assert float(s.cost) == pytest.approx(best, abs=1e-3)


def test_solvers_agree_as_epsilon_shrinks():
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(6, 6, generator=g, dtype=torch.float64)
    exact = ipot(cost, 0.05, n_iters=3000).plan
    gaps = [float((sinkhorn(cost, eps, n_iters=4000).plan - exact).abs().sum()) for eps in (0.5, 0.1, 0.02, 0.005)]
    assert all(x > y for x, y in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.05
    # the entropic plan is blurrier (more entropy) at larger epsilon
    ents = [float(entropy(sinkhorn(cost, eps, n_iters=2000).plan)) for eps in (1.0, 0.1, 0.01)]
    assert ents[0] > ents[1] > ents[2]


@pytest.mark.parametrize("name,fn", SOLVERS)
def test_small_epsilon_no_underflow(name, fn):
    g = torch.Generator().manual_seed(4)
    cost = 10 * torch.rand(64, 16, generator=g)  # float32, exp(-cost / 1e-3) underflows outside the log domain
    r = fn(cost, 1e-3, n_iters=300)
    assert torch.isfinite(r.plan).all() and torch.isfinite(r.cost)
    assert float(r.plan.sum()) == pytest.approx(1.0, abs=1e-3)
    assert (r.plan.sum(0) > 0).all()


def test_batched_equals_one_by_one_and_tolerance():
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(3, 8, 4, generator=g, dtype=torch.float64)
    for name, fn in SOLVERS:
        batched = fn(cost, 0.1, n_iters=50)
        for i in range(3):
            single = fn(cost[i], 0.1, n_iters=50)
            assert torch.allclose(batched.plan[i], single.plan, atol=1e-12), name
            assert float(batched.cost[i]) == pytest.approx(float(single.cost), abs=1e-12)
    r = sinkhorn(cost, 0.1, n_iters=10_000, tol=1e-9)
    assert r.n_iters < 10_000 and r.error <= 1e-9
    assert float(marginal_error(r.plan).max()) < 1e-8


def test_autocast_and_dtypes():
    cost = torch.rand(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = sinkhorn(cost, 0.1, n_iters=50)
        c = cost_matrix(torch.randn(16, 4), torch.randn(8, 4))
    assert r.plan.dtype == torch.float32 and c.dtype == torch.float32
    r16 = sinkhorn(cost.half(), 0.1, n_iters=50)
    assert r16.plan.dtype == torch.float32 and torch.allclose(r16.plan, sinkhorn(cost.half().float(), 0.1, n_iters=50).plan)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_matches_cpu():
    cost = torch.rand(32, 8, dtype=torch.float64)
    for _, fn in SOLVERS:
        assert torch.allclose(fn(cost.cuda(), 0.1, n_iters=30).plan.cpu(), fn(cost, 0.1, n_iters=30).plan, atol=1e-10)


def test_gradients_plan_as_target_vs_cost_differentiated():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    c = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    # the plan used as a target: detached, so <T, D(z, c)> differentiates D only
    cost = cost_matrix(z, c)
    plan = sinkhorn(cost.detach(), 0.1, n_iters=200).plan
    loss = (plan * cost).sum()
    (grad_c,) = torch.autograd.grad(loss, c)
    # the same gradient by finite differences of <T, D(c)> with T held fixed
    num = torch.zeros_like(c)
    for i, j in itertools.product(range(4), range(3)):
        d = torch.zeros_like(c)
        d[i, j] = 1e-6
        num[i, j] = ((plan * cost_matrix(z, c.detach() + d)).sum() - (plan * cost_matrix(z, c.detach() - d)).sum()) / 2e-6
    assert torch.allclose(grad_c, num, atol=1e-6)
    # the cost differentiated through the solver: gradcheck on the unrolled iterations
    def f(cost_in):
        return sinkhorn(cost_in, 0.2, n_iters=20).cost
    assert torch.autograd.gradcheck(f, (torch.rand(4, 3, dtype=torch.float64, requires_grad=True),))
    # at convergence the gradient of the regularised OT value w.r.t. the cost is the plan (envelope theorem),
    # so differentiating the plan-weighted cost is not the same as using the plan as a fixed target
    cost_in = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    r = sinkhorn(cost_in, 0.2, n_iters=500)
    (gr,) = torch.autograd.grad(r.cost, cost_in)
    assert not torch.allclose(gr, r.plan.detach(), atol=1e-3)


def test_bad_input():
    cost = torch.rand(4, 3)
    with pytest.raises(ValueError, match="different total mass"):
        sinkhorn(cost, 0.1, torch.full((4,), 0.25), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="a has 5 entries"):
        sinkhorn(cost, 0.1, torch.full((5,), 0.2))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn(cost, -0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):  # ipot's regulariser is beta, not epsilon
        ipot(cost, 0.0)
    with pytest.raises(ValueError, match="negative masses"):
        ipot(cost, 0.1, torch.tensor([0.5, 0.5, 0.5, -0.5]), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="n_iters must be >= 1"):
        sinkhorn(cost, 0.1, n_iters=0)
    with pytest.raises(ValueError, match="cost must be"):
        sinkhorn(torch.rand(4), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), 0.1)
    with pytest.raises(ValueError, match="different widths"):
        cost_matrix(torch.randn(4, 8), torch.randn(3, 6))
    with pytest.raises(ValueError, match="metric must be one of"):
        cost_matrix(torch.randn(4, 8), torch.randn(3, 8), "l1")


def test_fast_path_equals_autograd_path():
    # the no-grad path reduces in preallocated buffers; it must give the autograd path's plan exactly
    g = torch.Generator().manual_seed(7)
    cost = torch.rand(2, 9, 5, generator=g, dtype=torch.float64)
    a = torch.tensor([0.0] + [1 / 8] * 8, dtype=torch.float64)  # a zero-mass row too
    fast = sinkhorn(cost, 0.05, a, n_iters=40).plan
    slow = sinkhorn(cost.clone().requires_grad_(True), 0.05, a, n_iters=40).plan.detach()
    assert torch.allclose(fast, slow, atol=1e-14)
    assert (fast[:, 0] == 0).all()


def test_sinkhorn_matches_pot_when_installed():
    pot = pytest.importorskip("ot")  # the optional benchmark extra (pip install -e .[bench])
    g = torch.Generator().manual_seed(8)
    cost = torch.rand(30, 7, generator=g, dtype=torch.float64)
    a = torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    # the iterates need not agree step by step (POT orders its updates its own way); the converged plans must
    ref = pot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), 0.1, method="sinkhorn_log", numItermax=500, stopThr=0.0)
    assert torch.allclose(sinkhorn(cost, 0.1, a, b, n_iters=500).plan, torch.as_tensor(ref), atol=1e-12)

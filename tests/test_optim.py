"""LAMB against a hand-written reference of You et al. (2020), Algorithm 2, plus checkpoint resume."""

import copy
import math

import pytest
import torch

from mmalign.optim import LAMB, lamb_trust_ratio


def reference_lamb(weights, grads_per_step, lr, betas, eps, wd, clamp):
    """Algorithm 2 written out per layer with Python floats (flattened weights)."""
    b1, b2 = betas
    w = [list(x) for x in weights]
    m = [[0.0] * len(x) for x in w]
    v = [[0.0] * len(x) for x in w]
    for t, grads in enumerate(grads_per_step, 1):
        for layer, g in enumerate(grads):
            upd = []
            for k, gk in enumerate(g):
                m[layer][k] = b1 * m[layer][k] + (1 - b1) * gk
                v[layer][k] = b2 * v[layer][k] + (1 - b2) * gk * gk
                m_hat = m[layer][k] / (1 - b1**t)
                v_hat = v[layer][k] / (1 - b2**t)
                upd.append(m_hat / (math.sqrt(v_hat) + eps) + wd * w[layer][k])
            w_norm = math.sqrt(sum(x * x for x in w[layer]))
            u_norm = math.sqrt(sum(x * x for x in upd))
            ratio = min(w_norm / u_norm, clamp) if w_norm > 0 and u_norm > 0 else 1.0
            w[layer] = [x - lr * ratio * u for x, u in zip(w[layer], upd)]
    return w


def test_lamb_matches_algorithm_2_on_two_groups():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w2 = torch.randn(5, generator=g, dtype=torch.float64)
    w3 = torch.zeros(2, dtype=torch.float64)  # zero weight norm: trust ratio 1
    params = [torch.nn.Parameter(x.clone()) for x in (w1, w2, w3)]
    groups = [
        {"params": params[:2], "lr": 0.01, "weight_decay": 0.1},
        {"params": params[2:], "lr": 0.05, "weight_decay": 0.0},
    ]
    opt = LAMB(groups, betas=(0.9, 0.99), eps=1e-6, clamp=10.0)
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params] for _ in range(5)]
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
    flat = lambda xs: [x.flatten().tolist() for x in xs]  # noqa: E731
    ref_a = reference_lamb(flat([w1, w2]), [flat(s[:2]) for s in grads], 0.01, (0.9, 0.99), 1e-6, 0.1, 10.0)
    ref_b = reference_lamb(flat([w3]), [flat(s[2:]) for s in grads], 0.05, (0.9, 0.99), 1e-6, 0.0, 10.0)
    for p, want in zip(params, ref_a + ref_b):
        assert p.detach().flatten().tolist() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_lamb_trust_ratio_clamp_and_zero_norms():
    w, u = torch.full((4,), 100.0), torch.full((4,), 1.0)
    assert lamb_trust_ratio(w, u, clamp=10.0).item() == 10.0  # 100 clamped
    assert lamb_trust_ratio(w, 50 * u, clamp=10.0).item() == pytest.approx(2.0)
    assert lamb_trust_ratio(torch.zeros(4), u, clamp=10.0).item() == 1.0
    assert lamb_trust_ratio(w, torch.zeros(4), clamp=10.0).item() == 1.0


def test_lamb_without_bias_correction_first_step():
    # step 1, no bias correction: m = .1 g, v = .001 g^2 -> update = .1 g / (sqrt(.001)|g| + eps)
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ||w|| = 5
    p.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    LAMB([p], lr=0.1, eps=0.0, weight_decay=0.0, bias_correction=False).step()
    u = 0.1 / math.sqrt(0.001)  # per coordinate, sign of g; ||u|| = u * sqrt2
    ratio = 5 / (u * math.sqrt(2))
    assert p.tolist() == pytest.approx([3 - 0.1 * ratio * u, 4 + 0.1 * ratio * u])


def test_lamb_state_dict_resume_gives_identical_next_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = LAMB([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}], lr=1e-2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def step(m, o):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    ckpt = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    step(model, opt)  # the run that continues

    torch.manual_seed(1)
    resumed = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt2 = LAMB([{"params": resumed[0].parameters()}, {"params": resumed[2].parameters(), "lr": 3e-3}], lr=1e-2)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    step(resumed, opt2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt2.param_groups[1]["lr"] == 3e-3 and opt2.state[next(resumed.parameters())]["step"] == 4


def test_lamb_skips_params_without_grad_and_rejects_bad_args():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.ones(2)
    LAMB([a, b]).step()
    assert torch.equal(b, torch.ones(2)) and not torch.equal(a, torch.ones(2))
    with pytest.raises(ValueError, match="betas"):
        LAMB([a], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="clamp"):
        LAMB([a], clamp=0)
    with pytest.raises(ValueError, match="lr"):
        LAMB([a], lr=-1)
    emb = torch.nn.Embedding(3, 2, sparse=True)
    emb(torch.tensor([0])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        LAMB(emb.parameters()).step()

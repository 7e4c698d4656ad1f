"""siglip_loss against a float64 Python loop over every pair (Zhai et al., 2023, eq. 1), gradients, extreme
temperatures, half precision and bad input."""

import math

import pytest
import torch

from mmalign.losses import info_nce, siglip_loss


def naive_siglip(a, b, temperature, bias, ids_a=None, ids_b=None):
    """-1/N sum_i sum_j log sigmoid(z_ij (cos(a_i, b_j) / tau + b)), pair by pair, in Python floats."""
    a, b = a.double().tolist(), b.double().tolist()
    ids_a = list(range(len(a))) if ids_a is None else [int(i) for i in ids_a]
    ids_b = list(range(len(b))) if ids_b is None else [int(i) for i in ids_b]
    total = 0.0
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            cos = sum(u * v for u, v in zip(x, y)) / math.sqrt(sum(u * u for u in x) * sum(v * v for v in y))
            z = 1.0 if ids_a[i] == ids_b[j] else -1.0
            t = z * (cos / temperature + bias)
            total += max(-t, 0.0) + math.log1p(math.exp(-abs(t)))  # -log sigmoid(t), stable
    return total / len(a)


def batch(n=6, m=None, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m or n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("temperature,bias", [(0.1, -10.0), (1.0, 0.0), (0.05, 2.5), (0.01, -10.0), (100.0, -3.0)])
def test_equals_the_naive_pair_loop(temperature, bias):
    a, b = batch()
    expected = naive_siglip(a, b, temperature, bias)
    assert float(siglip_loss(a, b, temperature=temperature, bias=bias)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_several_positives_through_ids_and_unpaired_sides():
    a, b = batch(n=6, m=4)
    ids_a, ids_b = torch.tensor([0, 0, 1, 2, 2, 3]), torch.tensor([2, 0, 9, 1])
    got = siglip_loss(a, b, temperature=0.2, bias=-1.0, ids=(ids_a, ids_b))
    assert float(got) == pytest.approx(naive_siglip(a, b, 0.2, -1.0, ids_a, ids_b), rel=1e-12)
    a, b = batch()
    shared = torch.tensor([0, 0, 1, 2, 2, 3])
    assert float(siglip_loss(a, b, temperature=0.2, bias=-1.0, ids=shared)) == pytest.approx(
        naive_siglip(a, b, 0.2, -1.0, shared, shared), rel=1e-12)
    assert float(siglip_loss(a, b, temperature=0.2, ids=shared)) != pytest.approx(float(siglip_loss(a, b, temperature=0.2)))


def test_without_normalize_uses_the_dot_product():
    a, b = batch()
    logits = a @ b.T / 0.5 - 1.0
    signs = 2 * torch.eye(6, dtype=torch.float64) - 1
    expected = torch.nn.functional.softplus(-signs * logits).sum() / 6
    torch.testing.assert_close(siglip_loss(a, b, temperature=0.5, bias=-1.0, normalize=False), expected,
                               rtol=1e-12, atol=1e-12)


def test_gradcheck_through_embeddings_temperature_and_bias():
    a, b = batch(n=4, d=3)
    a.requires_grad_(), b.requires_grad_()
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda x, y, t, c: siglip_loss(x, y, temperature=t, bias=c, ids=ids),
                                    (a, b, tau, bias))


def test_bias_gradient_is_the_hand_derivative():
    """dL/db = 1/N sum_ij (sigmoid(logit_ij) - [positive]): the fraction of probability mass on wrong labels."""
    a, b = batch()
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    siglip_loss(a, b, temperature=0.2, bias=bias).backward()
    logits = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T / 0.2 - 3.0
    expected = (torch.sigmoid(logits) - torch.eye(6, dtype=torch.float64)).sum() / 6
    torch.testing.assert_close(bias.grad, expected, rtol=1e-12, atol=1e-12)


def test_extreme_temperature_stays_finite_and_half_inputs_give_float32():
    a, b = batch(dtype=torch.float32)
    for tau in (1e-4, 1e4):
        loss = siglip_loss(a, b, temperature=tau, bias=-10.0)
        assert torch.isfinite(loss)
        assert float(loss) == pytest.approx(naive_siglip(a, b, tau, -10.0), rel=1e-5)
    half = siglip_loss(a.half(), b.half(), temperature=0.01, bias=-10.0)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert float(half) == pytest.approx(naive_siglip(a.half(), b.half(), 0.01, -10.0), rel=1e-3)


def test_differs_from_info_nce_and_learns_to_separate():
    """Pulling the matched pairs together lowers the loss; the softmax and sigmoid losses are other numbers."""
    a, b = batch()
    assert float(siglip_loss(a, b, temperature=0.1)) != pytest.approx(float(info_nce(a, b, temperature=0.1)))
    assert float(siglip_loss(a, a + 0.01 * b, temperature=0.1, bias=-5.0)) < float(siglip_loss(a, b, temperature=0.1, bias=-5.0))


def test_bad_input():
    a, b = batch()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        siglip_loss(a, b, temperature=0.0)
    with pytest.raises(ValueError, match="bias must be finite, got nan"):
        siglip_loss(a, b, bias=float("nan"))
    with pytest.raises(ValueError, match=r"bias must be a number, got a tensor of shape \(2,\)"):
        siglip_loss(a, b, bias=torch.zeros(2))
    with pytest.raises(ValueError, match="bias must be a real number or a 0-d tensor"):
        siglip_loss(a, b, bias="-10")
    with pytest.raises(ValueError, match="paired batches must have the same length"):
        siglip_loss(a, b[:4])
    with pytest.raises(ValueError, match="embedding sizes differ"):
        siglip_loss(a, b[:, :3])
    a[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        siglip_loss(a, b)
    with pytest.raises(TypeError):
        siglip_loss(a, b, 0.1)  # settings are keyword-only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_under_autocast_the_logits_stay_float32():
    a, b = batch()
    ref = naive_siglip(a, b, 0.05, -10.0)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = siglip_loss(a.float().cuda(), b.float().cuda(), temperature=0.05, bias=-10.0)
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    assert float(loss) == pytest.approx(ref, rel=1e-5)

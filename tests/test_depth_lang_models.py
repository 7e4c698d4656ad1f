"""Pooling, from-scratch text encoders, depth encoders and the three depth-fusion variants."""

import numpy as np
import pytest
import torch

from mmalign.losses.info_nce import info_nce
from mmalign.models.depth import DepthEncoder, colorize_depth
from mmalign.models.fusion import AverageFusion, ConcatFusion, EarlyFusionEncoder, depth_augmented_view_loss
from mmalign.models.pooling import AttentionPool, TransformerPool, masked_mean
from mmalign.models.text_scratch import CharTokenizer, TextEncoder

CORPUS = ["a red ball", "लाल गोला", "नीला घन", "赤い球", "青い立方体"]


def padded_batch(B=3, L=5, D=8, extra=4, seed=0):
    """x (B, L, D) with ragged lengths, and the same batch with `extra` more padded positions whose
    values (and those of the original padding) are random junk."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    lengths = torch.tensor([L, 2, 1])[:B]
    mask = torch.arange(L)[None] < lengths[:, None]
    x = torch.where(mask[..., None], x, 100 * torch.randn(B, L, D, generator=g))
    x2 = torch.cat([x, 50 * torch.randn(B, extra, D, generator=g)], 1)
    mask2 = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], 1)
    return x, mask, x2, mask2


# ---------------------------------------------------------------- pooling
def test_masked_mean_matches_loop():
    x, mask, _, _ = padded_batch()
    out = masked_mean(x, mask)
    for b in range(x.shape[0]):
        torch.testing.assert_close(out[b], x[b][mask[b]].mean(0))
    torch.testing.assert_close(masked_mean(x), x.mean(1))


def test_masked_mean_ignores_nonfinite_padding_and_empty_rows():
    x, mask, _, _ = padded_batch()
    x = torch.where(mask[..., None], x, torch.nan)
    mask[2] = False
    out = masked_mean(x, mask)
    assert torch.isfinite(out).all() and (out[2] == 0).all()


@pytest.mark.parametrize("make", [
    lambda: AttentionPool(8, 2),
    lambda: AttentionPool(8, 2, use_cls=True),
    lambda: TransformerPool(8, 2, layers=2),
    lambda: TransformerPool(8, 2, use_cls=True),
])
@pytest.mark.parametrize("train", [False, True])
def test_attention_pools_shape_and_padding_invariance(make, train):
    torch.manual_seed(0)
    pool = make().train(train)
    x, mask, x2, mask2 = padded_batch()
    out, out2 = pool(x, mask), pool(x2, mask2)
    assert out.shape == (3, 8)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    # the real tokens do matter
    x3 = x.clone()
    x3[0, 0] += 1.0
    assert not torch.allclose(pool(x3, mask)[0], out[0])
    # a sequence is pooled the same alone and inside a padded batch
    torch.testing.assert_close(pool(x[1:2, :2], None), out[1:2], rtol=1e-5, atol=1e-5)


def test_attention_pool_cls_differs_from_mean_and_gets_gradients():
    torch.manual_seed(0)
    x, mask, _, _ = padded_batch()
    pool = AttentionPool(8, 2, use_cls=True)
    pool(x, mask).sum().backward()
    assert pool.cls.grad is not None and pool.cls.grad.abs().sum() > 0


def test_pool_bad_input():
    x, mask, _, _ = padded_batch()
    with pytest.raises(ValueError, match="divisible"):
        AttentionPool(6, 4)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        AttentionPool(8, 2)(x, mask.float())
    mask[1] = False
    with pytest.raises(ValueError, match="no real token"):
        AttentionPool(8, 2)(x, mask)
    AttentionPool(8, 2, use_cls=True)(x, mask)  # CLS makes an empty sequence fine


# ---------------------------------------------------------------- tokenizer and text encoder
def test_char_tokenizer_round_trip_hindi_japanese(tmp_path):
    tok = CharTokenizer.from_corpus(CORPUS)
    texts = ["लाल गोला", "赤い球"]
    ids, mask = tok.encode(texts)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert mask.sum(1).tolist() == [len("लाल गोला"), 3]  # Devanagari vowel signs are their own code points
    assert tok.decode(ids) == texts
    assert (ids[~mask] == 0).all() and (ids[mask] > 1).all()  # padding 0, no UNK for seen chars
    # unseen characters map to UNK
    ids, mask = tok.encode(["赤い犬", "zz"])
    assert ids[0, 2] == tok.unk_id and ids[1, 0] == tok.unk_id and tok.decode(ids)[0] == "赤い\ufffd"
    # save / load gives the same vocabulary and the same ids
    tok.save(tmp_path / "tok.json")
    tok2 = CharTokenizer.load(tmp_path / "tok.json")
    assert tok2 == tok and tok2.itos == tok.itos
    assert torch.equal(tok2.encode(texts, max_len=12)[0], tok.encode(texts, max_len=12)[0])
    assert "赤" in (tmp_path / "tok.json").read_text(encoding="utf-8")  # readable JSON


def test_char_tokenizer_deterministic_cls_and_truncation():
    a = CharTokenizer.from_corpus(CORPUS)
    b = CharTokenizer.from_corpus(list(reversed(CORPUS)))
    assert a.itos == b.itos and a.itos[:2] == ["<pad>", "<unk>"]
    assert a.itos[2:] == sorted(a.itos[2:])
    tok = CharTokenizer.from_corpus(CORPUS, add_cls=True)
    ids, mask = tok.encode(["赤い球", "a"], max_len=3)
    assert ids[:, 0].tolist() == [tok.cls_id] * 2 and ids.shape == (2, 3)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert tok.decode(ids) == ["赤い", "a"]


def test_char_tokenizer_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        CharTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a CharTokenizer"):
        CharTokenizer.load(tmp_path / "x.json")


@pytest.mark.parametrize("pooling", TextEncoder.POOLINGS)
def test_text_encoder_shapes_padding_and_grad(pooling):
    torch.manual_seed(0)
    tok = CharTokenizer.from_corpus(CORPUS)
    enc = TextEncoder(len(tok), 16, pooling=pooling, layers=2, heads=4).eval()
    ids, mask = tok.encode(CORPUS)
    z = enc(ids, mask)
    assert z.shape == (len(CORPUS), 16) and torch.isfinite(z).all()
    ids2, mask2 = tok.encode(CORPUS, max_len=ids.shape[1] + 7)
    torch.testing.assert_close(enc(ids2, mask2), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc(*tok.encode(CORPUS[3:4])), z[3:4], rtol=1e-5, atol=1e-5)
    enc.train()
    enc(ids, mask).pow(2).sum().backward()
    assert enc.embed.weight.grad.abs().sum() > 0


def test_text_encoder_bad_input():
    with pytest.raises(ValueError, match="unknown pooling"):
        TextEncoder(10, 8, pooling="max")
    with pytest.raises(ValueError, match="max_len"):
        TextEncoder(10, 8, max_len=4)(torch.ones(1, 5, dtype=torch.long))


# ---------------------------------------------------------------- depth
def test_depth_encoder_shapes_and_grad():
    enc = DepthEncoder(12, width=8)
    d = torch.rand(4, 1, 32, 40, requires_grad=True)
    z = enc(d)
    assert z.shape == (4, 12)
    z.sum().backward()
    assert d.grad.abs().sum() > 0
    assert enc(torch.rand(4, 32, 40)).shape == (4, 12)
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, 1, H, W\)"):
        enc(torch.rand(4, 3, 32, 40))


def test_colorize_depth_matches_matplotlib_and_constant_is_safe():
    import matplotlib

    cm = matplotlib.colormaps["viridis"]
    g = torch.Generator().manual_seed(0)
    d = 0.5 + 9.5 * torch.rand(2, 6, 7, generator=g, dtype=torch.float64)
    rgb = colorize_depth(d)
    assert rgb.shape == (2, 3, 6, 7) and rgb.dtype == torch.float32
    for b, i, j in [(0, 0, 0), (0, 3, 5), (1, 5, 6), (1, 2, 1)]:
        x = (d[b, i, j] - d[b].min()) / (d[b].max() - d[b].min())
        np.testing.assert_allclose(rgb[b, :, i, j].numpy(), cm(float(x))[:3], atol=1e-6)
    # extremes are the two ends of the colormap
    flat = rgb.flatten(2)
    np.testing.assert_allclose(flat[0, :, d[0].flatten().argmin()].numpy(), cm(0.0)[:3], atol=1e-6)
    np.testing.assert_allclose(flat[0, :, d[0].flatten().argmax()].numpy(), cm(1.0)[:3], atol=1e-6)
    # constant depth, missing depth, (B, 1, H, W) input, another colormap
    const = colorize_depth(torch.full((1, 1, 4, 4), 3.0))
    assert torch.isfinite(const).all() and torch.allclose(const, torch.tensor(cm(0.0)[:3]).float()[None, :, None, None])
    d2 = d.clone()
    d2[0, 0, 0] = float("nan")
    out = colorize_depth(d2, cmap="magma")
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="unknown colormap"):
        colorize_depth(d, cmap="not-a-map")


# ---------------------------------------------------------------- fusion
def test_fusion_modules_shapes_and_gradients():
    torch.manual_seed(0)
    rgb_f = torch.randn(4, 10, requires_grad=True)
    dep_f = torch.randn(4, 6, requires_grad=True)
    for fuse in (AverageFusion(10, 6, 8), ConcatFusion(10, 6, 8)):
        z = fuse(rgb_f, dep_f)
        assert z.shape == (4, 8)
        rgb_f.grad = dep_f.grad = None
        z.pow(2).sum().backward()
        assert rgb_f.grad.abs().sum() > 0 and dep_f.grad.abs().sum() > 0
    avg = AverageFusion(10, 6, 8)
    torch.testing.assert_close(avg(rgb_f, dep_f), (avg.proj_rgb(rgb_f) + avg.proj_depth(dep_f)) / 2)

    img = torch.rand(2, 3, 24, 24, requires_grad=True)
    dep = torch.rand(2, 1, 24, 24, requires_grad=True)
    enc = EarlyFusionEncoder(8, width=8)
    z = enc(img, dep)
    assert z.shape == (2, 8) and enc(img, dep[:, 0]).shape == (2, 8)
    z.sum().backward()
    assert img.grad.abs().sum() > 0 and dep.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="resize the depth"):
        enc(img, dep[..., :20])
    with pytest.raises(ValueError, match="same B"):
        AverageFusion(10, 6, 8)(rgb_f, dep_f[:3])


def test_depth_augmented_view_loss_equals_hand_sum():
    g = torch.Generator().manual_seed(0)
    img, txt, dep = (torch.randn(5, 8, generator=g, requires_grad=True) for _ in range(3))
    loss = depth_augmented_view_loss(img, txt, dep, temperature=0.1, weight=0.3)
    torch.testing.assert_close(loss, info_nce(img, txt, temperature=0.1) + 0.3 * info_nce(img, dep, temperature=0.1))
    torch.testing.assert_close(depth_augmented_view_loss(img, txt, dep, weight=0.0), info_nce(img, txt))
    loss.backward()
    assert all(t.grad.abs().sum() > 0 for t in (img, txt, dep))
    with pytest.raises(ValueError, match="weight must be >= 0"):
        depth_augmented_view_loss(img, txt, dep, weight=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_follows_device():
    dev = torch.device("cuda")
    assert colorize_depth(torch.rand(2, 5, 5, device=dev)).device.type == "cuda"
    tok = CharTokenizer.from_corpus(CORPUS)
    ids, mask = tok.encode(CORPUS)
    for pooling in TextEncoder.POOLINGS:
        enc = TextEncoder(len(tok), 16, pooling=pooling).to(dev)
        assert enc(ids.to(dev), mask.to(dev)).device.type == "cuda"
    x = torch.randn(2, 3, 16, 16, device=dev)
    assert EarlyFusionEncoder(8).to(dev)(x, x[:, :1]).device.type == "cuda"

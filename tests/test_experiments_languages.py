"""Chapter 06's experiment pieces: the thesis-layout retrieval tables, chance levels and the model."""

import math

import torch

from mmalign.data.scenes import generate_scenes
from mmalign.experiments.languages import (CROSS_PAIRS, IMAGE_PAIRS, LANGS, MultilingualAligner, build_tokenizers,
                                           columns, pair_recall, retrieval_tables)


def naive_recall(q, g, q_ids, g_ids, k):
    """Loop version: a hit when the best positive has fewer than k negatives scoring above it (no ties)."""
    q = torch.nn.functional.normalize(q, dim=-1)
    g = torch.nn.functional.normalize(g, dim=-1)
    hits = 0
    for i in range(len(q)):
        s = g @ q[i]
        pos = g_ids == q_ids[i]
        best = s[pos].max()
        hits += int(((s > best) & ~pos).sum()) < k
    return 100 * hits / len(q)


def test_columns_follow_the_thesis_layout():
    assert columns("image")[:3] == ["E&I.R1", "H&I.R1", "J&I.R1"]
    assert columns("image")[-1] == "J&I.R10"
    assert columns("cross") == [f"{p}.R{k}" for k in (1, 5, 10) for p in ("H&E", "J&E", "J&H")]


def test_retrieval_tables_match_a_loop():
    g = torch.Generator().manual_seed(0)
    n, k_cap, d = 12, 3, 5
    text_ids = torch.arange(n).repeat_interleave(k_cap)
    emb = {"image": torch.randn(n, d, generator=g, dtype=torch.float64)}
    for lang in LANGS:
        emb[lang] = emb["image"][text_ids] + 0.8 * torch.randn(n * k_cap, d, generator=g, dtype=torch.float64)
    table = retrieval_tables(emb, text_ids)
    rows = torch.arange(n * k_cap)
    image_ids = torch.arange(n)
    for k in (1, 5, 10):
        for a, b in IMAGE_PAIRS:
            expected = 0.5 * (naive_recall(emb[a], emb["image"], text_ids, image_ids, k)
                              + naive_recall(emb["image"], emb[a], image_ids, text_ids, k))
            assert math.isclose(table[f"{a[0].upper()}&I.R{k}"], expected, abs_tol=1e-9)
        for a, b in CROSS_PAIRS:
            name = f"{a[0].upper()}&{b[0].upper()}.R{k}"
            expected = 0.5 * (naive_recall(emb[a], emb[b], rows, rows, k) + naive_recall(emb[b], emb[a], rows, rows, k))
            assert math.isclose(table[name], expected, abs_tol=1e-9)


def test_pair_recall_of_identical_sets_is_perfect():
    x = torch.randn(20, 4, dtype=torch.float64)
    ids = torch.arange(20)
    assert pair_recall(x, x, ids, ids, (1,)) == {1: 100.0}


def test_aligner_shapes_and_parameter_count():
    world = generate_scenes(6, seed=1, image_size=32)
    tok = build_tokenizers(world)
    model = MultilingualAligner(torch.randn(6, 10), tok, embed_dim=8, width=16, pooling="mean")
    tokens = []
    for lang in LANGS:
        tokens.extend(tok[lang].encode(world.caption_table(lang)[0][:4]))
    views = model(torch.randn(4, 10), *tokens)
    assert [tuple(v.shape) for v in views] == [(4, 8)] * 4
    counts = model.n_parameters()
    assert counts["image head"] == 10 * 8 + 8
    assert counts["text towers"] == sum(p.numel() for p in model.text.parameters())
    wide = MultilingualAligner(torch.randn(6, 10), tok, embed_dim=8, width=32, pooling="mean")
    assert wide.n_parameters()["text towers"] > counts["text towers"]


def test_foil_tables_match_a_loop():
    from mmalign.experiments.languages import HARD_PAIRS, first_captions, foil_tables, pair_name

    g = torch.Generator().manual_seed(3)
    n, k_cap, d = 10, 3, 6
    text_ids = torch.arange(n).repeat_interleave(k_cap)
    base = torch.randn(n * k_cap, d, generator=g, dtype=torch.float64)
    emb = {lang: base + 0.7 * torch.randn(n * k_cap, d, generator=g, dtype=torch.float64) for lang in LANGS}
    first = first_captions(text_ids)
    assert first.tolist() == list(range(0, n * k_cap, k_cap))
    foils = {lang: emb[lang][first] + 0.9 * torch.randn(n, d, generator=g, dtype=torch.float64) for lang in LANGS}
    got = foil_tables(emb, foils, text_ids)
    cos = lambda x, y: float(torch.nn.functional.cosine_similarity(x, y, dim=0))  # noqa: E731
    for a, b in HARD_PAIRS:
        afc, r1 = [], []
        for qa, gb in ((a, b), (b, a)):
            wins = hits = 0
            for i, row in enumerate(first.tolist()):
                q, true = emb[qa][row], emb[gb][row]
                wins += cos(q, true) > cos(q, foils[gb][i])
                others = [cos(q, emb[gb][j]) for j in range(n * k_cap) if j != row] + [cos(q, f) for f in foils[gb]]
                hits += cos(q, true) > max(others)
            afc.append(100 * wins / n)
            r1.append(100 * hits / n)
        assert math.isclose(got[f"{pair_name(a, b)}.foil2AFC"], sum(afc) / 2, abs_tol=1e-9)
        assert math.isclose(got[f"{pair_name(a, b)}.foilR1"], sum(r1) / 2, abs_tol=1e-9)


def test_shared_encoder_variants():
    world = generate_scenes(6, seed=1, image_size=32)
    tok = build_tokenizers(world)
    tokens = []
    for lang in LANGS:
        tokens.extend(tok[lang].encode(world.caption_table(lang)[0][:4]))
    torch.manual_seed(0)
    own = MultilingualAligner(torch.randn(6, 10), tok, embed_dim=8, width=16)
    shared = MultilingualAligner(torch.randn(6, 10), tok, embed_dim=8, width=16, sharing="shared")
    tagged = MultilingualAligner(torch.randn(6, 10), tok, embed_dim=8, width=16, sharing="shared_tag")
    for model in (shared, tagged):
        views = model(torch.randn(4, 10), *tokens)
        assert [tuple(v.shape) for v in views] == [(4, 8)] * 4
    # one tower for three languages: fewer parameters; the tags add three rows to the character table
    assert shared.n_parameters()["text towers"] < own.n_parameters()["text towers"]
    assert tagged.n_parameters()["text towers"] == shared.n_parameters()["text towers"] + 3 * 16
    # languages use disjoint rows of the shared character table (the scripts share no character id)
    ids, mask = tokens[2], tokens[3]  # Hindi
    shifted = torch.where(mask, ids + shared.offsets["hi"], torch.zeros_like(ids))
    assert int(shifted[mask].min()) >= len(tok["en"]) and int(shifted.max()) < len(tok["en"]) + len(tok["hi"])
    # the same ids read as another language (other rows, other tag) give another embedding
    enc = tagged.encode_text
    assert not torch.allclose(enc("en", *tokens[:2]), enc("hi", *tokens[:2]))
    import pytest
    with pytest.raises(ValueError, match="sharing must be one of"):
        MultilingualAligner(torch.randn(6, 10), tok, embed_dim=8, sharing="tagged")

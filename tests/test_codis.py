"""CODIS losses and model (mmalign.losses.codis, mmalign.models.codis) against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses import (codebook_targets, distill_contrastive_loss, ot_cost_loss, prototype_loss,
                            sample_hard_negatives)
from mmalign.losses.codis import alpha_schedule, mlm_distill_loss
from mmalign.models.codis import Codis, CodisConfig, bert_mask
from mmalign.ot import ipot


def naive_distill(q, kb, ids, queue, qids, tau, alpha, qt):
    """Loop over queries: the ALBEF target mixture and the cross-entropy, float64."""
    q, kb, queue, qt = (F.normalize(x.double(), dim=-1) for x in (q, kb, queue, qt))
    keys = torch.cat([kb, queue])
    key_ids = torch.cat([ids, qids])
    total = 0.0
    for n in range(len(q)):
        cols = [j for j in range(len(keys)) if j < len(ids) or key_ids[j] != ids[n]]
        s = torch.stack([q[n] @ keys[j] for j in cols]) / tau
        st = torch.stack([qt[n] @ keys[j] for j in cols]) / tau
        hard = torch.tensor([1.0 if (j < len(ids) and key_ids[j] == ids[n]) else 0.0 for j in cols], dtype=torch.float64)
        hard = hard / hard.sum()
        y = (1 - alpha) * hard + alpha * torch.softmax(st, 0)
        total += -(y * torch.log_softmax(s, 0)).sum()
    return total / len(q)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_distill_contrastive_matches_loop(alpha):
    g = torch.Generator().manual_seed(0)
    q, kb, qt = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    queue = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 2, 3])
    qids = torch.tensor([1, 5, 6, 0, 7, 8])  # entries 0 and 3 are copies of batch items: left out for them
    got = distill_contrastive_loss(q, kb, ids=(ids, qids), queue=queue, temperature=0.1, alpha=alpha, q_teacher=qt)
    want = naive_distill(q, kb, ids, queue, qids, 0.1, alpha, qt)
    assert float(got) == pytest.approx(float(want), rel=1e-10)


def test_alpha_zero_is_hard_label_cross_entropy():
    g = torch.Generator().manual_seed(1)
    q, kb = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    ids = torch.arange(4)
    logits = F.normalize(q, dim=-1) @ F.normalize(kb, dim=-1).T / 0.07
    want = F.cross_entropy(logits, ids)
    assert float(distill_contrastive_loss(q, kb, ids=ids, temperature=0.07)) == pytest.approx(float(want), rel=1e-12)
    # alpha = 0 ignores the teacher entirely
    other = distill_contrastive_loss(q, kb, ids=ids, temperature=0.07, alpha=0.0, q_teacher=torch.randn(4, 3, dtype=torch.float64))
    assert float(other) == pytest.approx(float(want), rel=1e-12)


def test_queue_copies_of_the_positive_are_excluded():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    kb = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([3])
    # a queue holding only a copy of the same item: it must not be a negative -> loss = 0 (one valid key)
    loss = distill_contrastive_loss(q, kb, ids=(ids, torch.tensor([3])), queue=kb.clone(), temperature=0.1)
    assert float(loss) == pytest.approx(0.0, abs=1e-12)
    # the same queue entry with another id is a negative: loss = log 2 (equal scores)
    loss = distill_contrastive_loss(q, kb, ids=(ids, torch.tensor([4])), queue=kb.clone(), temperature=0.1)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-12)


def test_distill_low_temperature_finite_and_bad_input():
    q = torch.randn(3, 4)
    loss = distill_contrastive_loss(q, q * 2, ids=(torch.arange(3), torch.arange(10, 15)), queue=torch.randn(5, 4), temperature=1e-3)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="alpha > 0 needs q_teacher"):
        distill_contrastive_loss(q, q, ids=torch.arange(3), alpha=0.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        distill_contrastive_loss(q, q, ids=torch.arange(3), alpha=1.5)
    with pytest.raises(ValueError, match="different widths"):
        distill_contrastive_loss(q, q, ids=(torch.arange(3), torch.arange(2)), queue=torch.randn(2, 5))


@pytest.mark.parametrize("batch", [1, 2, 3, 16])
def test_hard_negatives_never_positive(batch):
    g = torch.Generator().manual_seed(batch)
    for trial in range(20):
        sim = torch.randn(batch, batch, generator=g) * 5
        ids = torch.randint(0, max(1, batch // 2), (batch,), generator=g)
        neg = sample_hard_negatives(sim, ids=ids, generator=g)
        for i in range(batch):
            has = bool((ids != ids[i]).any())
            if has:
                assert neg[i] >= 0 and ids[neg[i]] != ids[i]
            else:
                assert neg[i] == -1
    assert sample_hard_negatives(torch.zeros(1, 1)).tolist() == [-1]
    assert sample_hard_negatives(torch.zeros(2, 2)).tolist() == [1, 0]


def test_hard_negatives_follow_softmax():
    sim = torch.tensor([[0.0, math.log(3.0), 0.0]])  # col 0 is the positive; cols 1, 2 with odds 3 : 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, ids=(torch.tensor([0]), torch.tensor([0, 1, 2])), generator=g)
                         for _ in range(4000)])
    assert (draws != 0).all()
    assert float((draws == 1).float().mean()) == pytest.approx(0.75, abs=0.03)


def test_prototype_loss_hand_computed():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    gamma = 0.5
    # row 0: logits (2, 0, -2); row 1: (0, 2, 0)
    lse0 = math.log(math.exp(2) + 1 + math.exp(-2))
    lse1 = math.log(1 + math.exp(2) + 1)
    want = 0.5 * ((lse0 - 2) + 0.5 * (lse1 - 0) + 0.5 * (lse1 - 2))
    assert float(prototype_loss(z, c, t, gamma=gamma)) == pytest.approx(want, rel=1e-12)


def test_codebook_loss_no_gradient_to_targets():
    g = torch.Generator().manual_seed(2)
    z_teacher = torch.randn(8, 4, generator=g, requires_grad=True)
    z = torch.randn(8, 4, generator=g, requires_grad=True)
    c = torch.randn(5, 4, generator=g, requires_grad=True)
    t = codebook_targets(z_teacher, c)
    assert not t.requires_grad and t.grad_fn is None
    assert torch.allclose(t.sum(1), torch.ones(8), atol=1e-6)
    t_conv = codebook_targets(z_teacher, c, n_iters=2000)  # converged: the columns hold too (equipartition)
    assert torch.allclose(t_conv.sum(0), torch.full((5,), 8 / 5), atol=1e-3)
    loss = prototype_loss(z, c, t) + ot_cost_loss(z_teacher.detach(), c, t / 8)
    loss.backward()
    assert z_teacher.grad is None and z.grad is not None and c.grad is not None
    # the targets are the IPOT plan of the cosine cost, times N
    cos = 1 - F.normalize(z_teacher.detach(), dim=-1) @ F.normalize(c.detach(), dim=-1).T
    plan = ipot(cos, 0.1, n_iters=20).plan
    assert torch.allclose(t, plan / plan.sum(1, keepdim=True), atol=1e-6)


def test_ot_cost_loss_is_plan_weighted_cost():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    plan = torch.tensor([[0.5, 0.0], [0.25, 0.25]], dtype=torch.float64)
    # costs 1 - cos: [[0, 2], [1, 1]]
    assert float(ot_cost_loss(z, c, plan)) == pytest.approx(0.5 * 0 + 0.25 * 1 + 0.25 * 1)


def test_codebook_bad_width():
    with pytest.raises(ValueError, match="prototypes have width 3 but features have width 4"):
        codebook_targets(torch.randn(4, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="prototypes have width"):
        prototype_loss(torch.randn(4, 4), torch.randn(5, 3), torch.full((4, 5), 0.2))


def tiny(**kw):
    base = dict(image_dim=12, text_dim=10, width=16, heads=2, embed_dim=8, max_patches=4, max_tokens=6,
                queue_size=8, momentum=0.9, vocab_size=5, n_codewords=4, intra=True, codebook=True)
    base.update(kw)
    return CodisConfig(**base)


def batch(b, g):
    patches = torch.randn(b, 4, 12, generator=g)
    tokens = torch.randn(b, 6, 10, generator=g)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[:, 4:] = False
    labels = torch.randint(0, 5, (b, 6), generator=g).masked_fill(~mask, -100)
    return patches, tokens, mask, torch.arange(b), labels


@pytest.mark.parametrize("b", [1, 2, 5])
def test_model_step_teacher_and_queues(b):
    g = torch.Generator().manual_seed(b)
    torch.manual_seed(0)
    model = Codis(tiny(mask_prob=0.9))
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.towers.state_dict().items()}
    fusion_before = {k: v.clone() for k, v in model.teacher_fusion.module.state_dict().items()}
    data = batch(b, g)
    out = model.losses(*data, generator=g, mlm_tokens=data[1] + 0.1)
    assert set(out) >= {"itc", "intra", "itm", "mlm", "code", "total"}
    assert torch.isfinite(out["total"])
    out["total"].backward()
    assert all(p.grad is None for p in model.teacher.parameters()), "the teacher received gradients"
    assert model.codebook.grad is not None
    opt.step()
    model.after_step()
    # EMA: teacher = m * old_teacher + (1 - m) * new_student
    new_student = model.towers.state_dict()
    for k, v in model.teacher.module.state_dict().items():
        want = 0.9 * before["module." + k] + 0.1 * new_student[k]
        assert torch.allclose(v, want, atol=1e-6), k
    # the MLM head's teacher (fusion + MLM head) follows the student's the same way
    for k, v in model.teacher_fusion.module.state_dict().items():
        want = 0.9 * fusion_before[k] + 0.1 * model.fusion.state_dict()[k]
        assert torch.allclose(v, want, atol=1e-6), k
    assert int(model.steps) == 1
    assert any(not torch.equal(student_before[k], new_student[k]) for k in new_student)
    assert len(model.queue_image) == b and len(model.queue_text) == b


def test_switches_select_terms_and_queue_smaller_than_batch():
    g = torch.Generator().manual_seed(0)
    model = Codis(tiny(intra=False, codebook=False, itm=False, mlm=False))
    assert set(model.losses(*batch(3, g))) == {"itc", "total"}
    with pytest.raises(ValueError, match="queue_size >= batch_size"):
        Codis(tiny(queue_size=2, mlm=False)).losses(*batch(3, g))
    with pytest.raises(ValueError, match="nothing aligns"):
        tiny(cross=False, intra=False, codebook=False)
    with pytest.raises(ValueError, match="code_source must be one of"):
        tiny(code_source="both")
    with pytest.raises(ValueError, match="vocab_size >= 2"):
        tiny(vocab_size=0)


def test_student_code_source_uses_student_features():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    a = Codis(tiny(code_source="teacher", itm=False, mlm=False))
    torch.manual_seed(0)
    s = Codis(tiny(code_source="student", itm=False, mlm=False))
    data = batch(4, g)
    # at construction teacher == student, so both sources give the same loss
    assert float(a.losses(*data)["code"]) == pytest.approx(float(s.losses(*data)["code"]), rel=1e-5)
    with torch.no_grad():  # move the student only: now they differ
        for p in s.towers.parameters():
            p.add_(0.1)
        for p in a.towers.parameters():
            p.add_(0.1)
    assert float(a.losses(*data)["code"]) != pytest.approx(float(s.losses(*data)["code"]), rel=1e-4)


def test_noisy_pairing():
    from mmalign.experiments.codis import noisy_pairing

    ids = torch.arange(50).repeat_interleave(3)
    pair = noisy_pairing(ids, 50, 0.3, seed=0)
    wrong = pair != ids
    assert int(wrong.sum()) == 45, "30% of 150 captions get another image"
    assert ((pair >= 0) & (pair < 50)).all()
    assert torch.equal(noisy_pairing(ids, 50, 0.0), ids)
    assert torch.equal(noisy_pairing(ids, 50, 0.3, seed=0), pair), "seeded"
    with pytest.raises(ValueError, match="fraction must be in"):
        noisy_pairing(ids, 50, 1.5)


def _synthetic_split(n_images=12, k=2, seed=0):
    from mmalign.experiments.codis import CodisData

    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n_images).repeat_interleave(k)
    patches = torch.randn(n_images, 4, 12, generator=g)
    tokens = patches[ids, :, :10].repeat(1, 2, 1)[:, :6] + 0.1 * torch.randn(len(ids), 6, 10, generator=g)
    mask = torch.ones(len(ids), 6, dtype=torch.bool)
    labels = torch.randint(0, 5, (len(ids), 6), generator=g)
    masked = torch.rand(2, len(ids), 6, generator=g) < 0.3  # two masked copies of every caption
    targets = labels.expand(2, -1, -1).masked_fill(~masked, -100)
    mlm_tokens = (tokens + masked[..., None] * torch.randn(2, len(ids), 6, 10, generator=g)).half()
    return CodisData(patches, tokens, mask, ids, labels, ["x"] * len(ids), [["w"] * 6] * len(ids), mlm_tokens,
                     targets, masked)


def test_train_codis_is_seeded_and_evaluates():
    from mmalign.experiments.codis import evaluate, mlm_accuracy, train_codis

    data = _synthetic_split()
    cfg = tiny(queue_size=16)
    runs = []
    for _ in range(2):
        model, history = train_codis(data, cfg, epochs=2, batch_size=8, lr=1e-2, seed=3, noise=0.25, progress=False)
        runs.append(evaluate(model, data))
    assert runs[0] == runs[1], "two runs with the same seed must give the same numbers"
    assert set(runs[0]) >= {"i2t_R@1", "t2i_R@10", "rsum"}
    assert len(history.step) == 2 * (24 // 8)
    # alpha ramps over the first epoch (3 steps): the model counted 6 steps and is at full alpha
    assert int(model.steps) == 6 and model.cfg.alpha_ramp_steps == 3 and model.alpha() == pytest.approx(0.4)
    assert 0 <= mlm_accuracy(model, data) <= 100


def test_run_groups_pool_equals_one_by_one_and_keeps_seed_order():
    """All groups in one pool of 2 workers, the longest runs first: every run's numbers equal the
    one-by-one run's, the runs stay in the order of the seeds, and the timing covers each group."""
    from mmalign.config import load_config
    from mmalign.experiments.codis import run_groups, run_rows

    data = _synthetic_split()
    cfg = load_config("ci")
    budget = {"width": 16, "layers": 1, "heads": 2, "embed_dim": 8, "queue_size": 16, "momentum": 0.9, "alpha": 0.4,
              "n_codewords": 4, "batch_size": 8, "epochs": 1, "lr": 1e-2}
    dims = {"image_dim": 12, "text_dim": 10}
    groups = {"one epoch": {"a": {**dims, "intra": False}, "b + code": {**dims, "intra": True, "codebook": True}},
              "longer": {"b, noisy": {"switches": {**dims, "intra": True}, "noise": 0.25, "epochs": 2}}}
    pooled, timing = run_groups(groups, data, data, cfg, budget, seeds=(0, 1), progress=False, workers=2)
    alone, _ = run_groups(groups, data, data, cfg, budget, seeds=(0, 1), progress=False, workers=1)
    for g in groups:
        for row in groups[g]:
            assert pooled[g][row]["runs"] == alone[g][row]["runs"], (g, row)
            assert pooled[g][row]["runs"][0] != pooled[g][row]["runs"][1], "two seeds, two different runs"
    seed1 = run_rows({"a": groups["one epoch"]["a"]}, data, data, cfg, budget, seeds=(1,), progress=False)
    assert seed1["a"]["runs"][0] == pooled["one epoch"]["a"]["runs"][1], "runs are stored in the order of the seeds"
    assert "pair_agree" in pooled["one epoch"]["b + code"]["mean"] and "pair_agree" not in pooled["one epoch"]["a"]["mean"]
    assert timing["one epoch"]["runs"] == 4 and timing["longer"]["runs"] == 2 and timing["workers"] == 2
    assert all(timing[g]["wall"] > 0 and timing[g]["cpu"] > 0 for g in groups) and timing["cpu"] > 0


def test_distill_loss_ids_with_and_without_a_queue():
    g = torch.Generator().manual_seed(5)
    q, k, queue = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(2, 3, generator=g)
    ids = torch.arange(4)
    # an empty queue needs no queue ids and changes nothing
    assert torch.equal(distill_contrastive_loss(q, k, ids=ids, queue=queue[:0]), distill_contrastive_loss(q, k, ids=ids))
    with pytest.raises(ValueError, match=r"with a queue, pass ids=\(batch ids, queue ids\)"):
        distill_contrastive_loss(q, k, ids=ids, queue=queue)
    # the queue ids matter: a queue key sharing query 0's id leaves query 0's softmax
    assert not torch.equal(distill_contrastive_loss(q, k, ids=(ids, torch.tensor([0, 9])), queue=queue),
                           distill_contrastive_loss(q, k, ids=(ids, torch.tensor([8, 9])), queue=queue))


# --------------------------------------------------------------------------------------------------
# MLM before the encoder (BERT's masking), MLM distillation, the alpha ramp, the codebook weight
# --------------------------------------------------------------------------------------------------

def test_bert_mask_proportions_and_labels():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (400, 300), generator=g)
    cand = torch.rand(400, 300, generator=g) < 0.7
    masked, labels, selected = bert_mask(ids, cand, mask_token_id=103, vocab_size=30522, generator=g)
    n_cand, n_sel = int(cand.sum()), int(selected.sum())
    # 15 % of the candidates, never a non-candidate (binomial: 4 standard errors)
    assert abs(n_sel / n_cand - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n_cand)
    assert not (selected & ~cand).any()
    assert torch.equal(masked[~selected], ids[~selected]), "unselected tokens must stay"
    assert torch.equal(labels[selected], ids[selected]) and (labels[~selected] == -100).all()
    to_mask = selected & (masked == 103)
    kept = selected & (masked == ids)
    randomised = selected & ~to_mask & ~kept
    for part, p in ((to_mask, 0.8), (randomised, 0.1), (kept, 0.1)):
        assert abs(int(part.sum()) / n_sel - p) < 4 * math.sqrt(p * (1 - p) / n_sel), (p, int(part.sum()) / n_sel)
    assert int((masked[randomised] >= 30522).sum()) == 0
    again = bert_mask(ids, cand, mask_token_id=103, vocab_size=30522, generator=torch.Generator().manual_seed(0))
    g2 = torch.Generator().manual_seed(0)
    torch.randint(1000, 2000, (400, 300), generator=g2), torch.rand(400, 300, generator=g2)
    assert all(torch.equal(x, y) for x, y in zip(bert_mask(ids, cand, mask_token_id=103, vocab_size=30522,
                                                          generator=g2), (masked, labels, selected))), "seeded"
    assert again[0].shape == ids.shape
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        bert_mask(ids.float(), cand, mask_token_id=103, vocab_size=10)


def test_bert_mask_hand_worked():
    """mask_prob 1 selects every candidate; which of 80/10/10 each gets follows the generator's draws."""
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    cand = torch.tensor([[False, True, True, True, False]])
    g = torch.Generator().manual_seed(1)
    u = torch.rand(3, 1, 5, generator=g)
    rnd = torch.randint(50, (1, 5), generator=g)
    masked, labels, _ = bert_mask(ids, cand, mask_token_id=99, vocab_size=50, mask_prob=1.0,
                                  generator=torch.Generator().manual_seed(1))
    want = ids.clone()
    for j in (1, 2, 3):
        if u[1, 0, j] < 0.8:
            want[0, j] = 99
        elif u[2, 0, j] < 0.5:
            want[0, j] = rnd[0, j]
    assert torch.equal(masked, want)
    assert labels.tolist() == [[-100, 6, 7, 8, -100]]


def test_encoder_sees_the_mask_token():
    """encode_masked feeds the *masked* ids to the frozen encoder: at a [MASK] position the state is the
    encoder's state of [MASK], not of the hidden word (a lookup-table encoder makes it checkable by hand)."""
    from mmalign.experiments.codis import encode_masked

    table = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    seen = []

    def encoder(i, m):
        seen.append(i.clone())
        return table[i]

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 30, (64, 10), generator=g)
    attn = torch.ones(64, 10, dtype=torch.bool)
    attn[:, 8:] = False
    out = encode_masked(encoder, ids, attn, attn, mask_token_id=39, vocab_size=39, versions=2, seed=0, mask_prob=0.3,
                        batch_size=16)
    assert out["features"].shape == (2, 64, 10, 3) and out["features"].dtype == torch.float16
    assert torch.equal(torch.cat(seen[:4]), out["masked_ids"][0]), "the encoder received the masked ids"
    at_mask = out["masked_ids"] == 39
    assert at_mask.any() and (out["labels"][at_mask] >= 0).all()
    assert torch.allclose(out["features"][at_mask].float(), table[39].half().float().expand(int(at_mask.sum()), 3))
    hidden = out["labels"][at_mask]
    assert not torch.allclose(out["features"][at_mask].float(), table[hidden].half().float())
    assert (out["features"][:, :, 8:] == 0).all(), "padding states are zero"
    assert not torch.equal(out["masked_ids"][0], out["masked_ids"][1]), "two different masked copies"


def test_mlm_distill_loss_hand_worked():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([3, -100, 0, 6, 2])
    keep = y >= 0
    # alpha = 0: the hard-label cross-entropy over the predicted positions
    assert float(mlm_distill_loss(s, y)) == pytest.approx(float(F.cross_entropy(s[keep], y[keep])), abs=1e-12)
    assert float(mlm_distill_loss(s, y, alpha=0.0, teacher_logits=t)) == pytest.approx(
        float(F.cross_entropy(s[keep], y[keep])), abs=1e-12)
    for alpha in (0.4, 1.0):
        total = 0.0
        rows = [i for i in range(5) if y[i] >= 0]
        for i in rows:  # a loop over positions, float64
            logp = [float(s[i, j]) - math.log(sum(math.exp(float(s[i, k])) for k in range(7))) for j in range(7)]
            pt = [math.exp(float(t[i, j])) / sum(math.exp(float(t[i, k])) for k in range(7)) for j in range(7)]
            total += (1 - alpha) * -logp[int(y[i])] + alpha * -sum(pt[j] * logp[j] for j in range(7))
        got = float(mlm_distill_loss(s, y, alpha=alpha, teacher_logits=t))
        assert got == pytest.approx(total / len(rows), abs=1e-10)
    x = s.clone().requires_grad_()
    mlm_distill_loss(x, torch.full((5,), -100)).backward()
    assert torch.equal(x.grad, torch.zeros_like(x)), "no predicted position: zero loss, zero gradient"
    with pytest.raises(ValueError, match="alpha > 0 needs teacher_logits"):
        mlm_distill_loss(s, y, alpha=0.4)
    with pytest.raises(ValueError, match="labels go up to 9"):
        mlm_distill_loss(s, torch.tensor([9, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="teacher_logits must have the shape"):
        mlm_distill_loss(s, y, alpha=0.4, teacher_logits=t[:4])


def test_alpha_ramp_values():
    assert [alpha_schedule(i, alpha=0.4, ramp_steps=4) for i in range(6)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert alpha_schedule(0, alpha=0.4, ramp_steps=0) == 0.4
    with pytest.raises(ValueError, match="step must be >= 0"):
        alpha_schedule(-1, alpha=0.4, ramp_steps=4)
    model = Codis(tiny(alpha=0.4, alpha_ramp_steps=4, mlm=False))
    seen = []
    for _ in range(6):
        seen.append(model.alpha())
        model.after_step()
    assert seen == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert "steps" in model.state_dict(), "the step count is checkpointed with the model"


def test_model_mlm_reads_the_masked_captions():
    g = torch.Generator().manual_seed(4)
    data = batch(3, g)
    labels = data[4].masked_fill(torch.rand(3, 6, generator=g) < 0.5, -100)
    labels[0, 0] = 1
    torch.manual_seed(0)
    model = Codis(tiny(itm=False, codebook=False, intra=False))
    with pytest.raises(ValueError, match="mlm_input='encoder' needs mlm_tokens"):
        model.losses(*data[:4], labels)
    with pytest.raises(ValueError, match="mlm_tokens .* must have the shape of tokens"):
        model.losses(*data[:4], labels, mlm_tokens=data[1][:, :5])
    other = torch.randn(3, 6, 10, generator=g)
    one = model.losses(*data[:4], labels, mlm_tokens=data[1])["mlm"]
    two = model.losses(*data[:4], labels, mlm_tokens=other)["mlm"]
    assert float(one) != pytest.approx(float(two)), "the MLM input is the masked captions' states"
    # at step 0 the ramp gives alpha 0: the loss is the hard-label cross-entropy of the student's logits
    ramped = Codis(tiny(itm=False, codebook=False, intra=False, alpha_ramp_steps=10))
    hv, _ = ramped.towers.image(data[0])
    logits = ramped.mlm_logits(hv, other, data[2])
    want = F.cross_entropy(logits[labels >= 0], labels[labels >= 0])
    assert float(ramped.losses(*data[:4], labels, mlm_tokens=other)["mlm"]) == pytest.approx(float(want), rel=1e-5)
    # the shortcut needs no masked captions
    after = Codis(tiny(itm=False, codebook=False, intra=False, mlm_input="after", mask_prob=0.9))
    assert torch.isfinite(after.losses(*data, generator=g)["mlm"])


def test_code_weight_scales_the_codebook_term():
    g = torch.Generator().manual_seed(6)
    data = batch(4, g)
    out = {}
    for w in (1.0, 2.0):
        torch.manual_seed(0)
        out[w] = float(Codis(tiny(itm=False, mlm=False, code_weight=w)).losses(*data[:4])["code"])
    assert out[2.0] == pytest.approx(2 * out[1.0], rel=1e-6)


def test_mutual_information_and_patch_labels():
    from types import SimpleNamespace

    from mmalign.experiments.codis import entropy_bits, mutual_information, patch_labels

    assert mutual_information([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert mutual_information([0, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(0.0)
    assert entropy_bits(["a", "a", "b", "c"]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="one length"):
        mutual_information([0], [1, 2])
    # a 110 x 110 image: the encoder's crop is the central 96 x 96, cells of 32 x 32 from pixel 7
    masks = torch.zeros(1, 110, 110, dtype=torch.uint8).numpy()
    masks[0, 7:39, 7:39] = 1  # object 0 fills the top-left cell
    masks[0, 71:103, 39:71] = 2  # object 1 the bottom-middle cell
    world = SimpleNamespace(masks=masks, graphs=[{"objects": [{"shape": "cone"}, {"shape": "cube"}]}])
    assert patch_labels(world) == [["cone", "ground", "ground", "ground", "ground", "ground", "ground", "cube", "ground"]]

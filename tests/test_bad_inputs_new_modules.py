"""Bad inputs in the modules added with chapters 7-9 (issue 22): ``ot``, ``losses.codis``, ``models.codis``,
``evaluation``, ``data.pairs`` and ``models.temperature``. Each case raises a clear error naming the
argument (pytest.raises with match= on the message), or gives the documented, exactly checked result."""

import math
import zipfile

import numpy as np
import pytest
import torch

from mmalign.data.pairs import MalformedRowError, load_glue_pairs, load_mrpc
from mmalign.evaluation import (LinearClassifier, choose_threshold, pair_classification, prompt_embeddings, spearman,
                                train_classifier)
from mmalign.losses import (codebook_targets, distill_contrastive_loss, ot_cost_loss, prototype_loss,
                            sample_hard_negatives)
from mmalign.models.codis import Codis, CodisConfig
from mmalign.models.temperature import LearnableTemperature
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


# ------------------------------------------------------------------------ losses.codis
Q, KB, QT = (torch.randn(4, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
FEAT, PROTOS = torch.randn(4, 3, generator=torch.Generator().manual_seed(4)), torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
TARGETS = codebook_targets(FEAT, PROTOS)  # rows sum to 1
CODIS_LOSS_CASES = {
    "distill q_teacher too few rows": (lambda: distill_contrastive_loss(Q, KB, alpha=0.4, q_teacher=QT[:1]), ValueError,
                                       r"^q_teacher must have one row per query \(4\), got 1"),
    "distill q_teacher width": (lambda: distill_contrastive_loss(Q, KB, alpha=0.4, q_teacher=torch.randn(4, 5)), ValueError,
                                r"^q_teacher must have 3 features per row"),
    "distill nan q_teacher": (lambda: distill_contrastive_loss(Q, KB, alpha=0.4, q_teacher=QT.clone().fill_(NAN)), ValueError,
                              r"^q_teacher holds NaN"),
    "distill nan queue": (lambda: distill_contrastive_loss(Q, KB, ids=(torch.arange(4), torch.arange(2)),
                                                           queue=torch.full((2, 3), NAN)), ValueError, r"^queue holds NaN"),
    "distill nan q": (lambda: distill_contrastive_loss(Q.clone().fill_(NAN), KB), ValueError, r"^q holds NaN"),
    "distill float ids": (lambda: distill_contrastive_loss(Q, KB, ids=torch.arange(4).float()), ValueError,
                          r"^ids must hold integer ids"),
    "distill queue without ids": (lambda: distill_contrastive_loss(Q, KB, queue=torch.randn(2, 3)), ValueError,
                                  r"with a queue, pass ids=\(batch ids, queue ids\)"),
    "distill alpha without teacher": (lambda: distill_contrastive_loss(Q, KB, alpha=0.4), ValueError, r"alpha > 0 needs q_teacher"),
    "sample_hard_negatives bad generator": (lambda: sample_hard_negatives(Q @ KB.T, generator=0), TypeError,
                                            r"^generator must be a torch.Generator or None, got int"),
    "codebook_targets epsilon 0": (lambda: codebook_targets(FEAT, PROTOS, epsilon=0.0), ValueError, r"^epsilon must be > 0"),
    "codebook_targets sinkhorn epsilon nan": (lambda: codebook_targets(FEAT, PROTOS, solver="sinkhorn", epsilon=NAN),
                                              ValueError, r"^epsilon must be finite"),
    "codebook_targets metric": (lambda: codebook_targets(FEAT, PROTOS, metric="l1"), ValueError, r"^metric must be one of"),
    "prototype_loss plan instead of targets": (lambda: prototype_loss(FEAT, PROTOS, TARGETS / 4), ValueError,
                                               r"^targets rows must sum to 1, but row 0 sums to 0.25; the rows sum to 1/N = 1/4: "
                                               r"this is a transport plan"),
    "prototype_loss rows not distributions": (lambda: prototype_loss(FEAT, PROTOS, torch.rand(4, 5) + 0.5), ValueError,
                                              r"^targets rows must sum to 1, but row 0 sums to"),
    "prototype_loss negative targets": (lambda: prototype_loss(FEAT, PROTOS, torch.tensor([[1.5, -0.5, 0, 0, 0]] * 4)),
                                        ValueError, r"^targets has negative entries"),
    "prototype_loss nan targets": (lambda: prototype_loss(FEAT, PROTOS, TARGETS.clone().fill_(NAN)), ValueError, r"^targets holds NaN"),
    "ot_cost_loss targets instead of plan": (lambda: ot_cost_loss(FEAT, PROTOS, TARGETS), ValueError,
                                             r"^plan must be a transport plan of total mass 1 .* got total mass 4; the rows sum "
                                             r"to 1: these are codebook targets, pass them divided by N \(4\)"),
    "ot_cost_loss negative plan": (lambda: ot_cost_loss(FEAT, PROTOS, TARGETS / 4 - 0.2), ValueError, r"^plan has negative entries"),
}


def test_distill_ids_none_means_the_diagonal_pairs():
    want = distill_contrastive_loss(Q, KB, ids=torch.arange(4), alpha=0.4, q_teacher=QT)
    assert torch.equal(distill_contrastive_loss(Q, KB, alpha=0.4, q_teacher=QT), want)
    assert torch.equal(distill_contrastive_loss(Q, KB, ids=None, alpha=0.4, q_teacher=QT), want)
    queue, qids = torch.randn(3, 3, generator=torch.Generator().manual_seed(9)), torch.tensor([0, 7, 8])
    assert torch.equal(distill_contrastive_loss(Q, KB, ids=(None, qids), queue=queue),
                       distill_contrastive_loss(Q, KB, ids=(torch.arange(4), qids), queue=queue))


@pytest.mark.parametrize("as_ids", [lambda t: list(t.numpy()), lambda t: tuple(t), lambda t: t.numpy(), lambda t: t.tolist()],
                         ids=["list of numpy ints", "tuple of 0-d tensors", "numpy array", "list of ints"])
def test_distill_two_ids_at_batch_two_are_batch_ids_not_a_pair(as_ids):
    q, k = Q[:2], KB[:2]
    same = torch.tensor([3, 3])  # one item twice: both keys are positives of both queries
    want = distill_contrastive_loss(q, k, ids=same)
    assert torch.equal(distill_contrastive_loss(q, k, ids=as_ids(same)), want)
    assert not torch.equal(want, distill_contrastive_loss(q, k))  # the ids matter


def test_prototype_loss_takes_the_targets_and_ot_cost_loss_the_plan():
    loss = prototype_loss(FEAT, PROTOS, TARGETS)
    assert torch.isfinite(loss)
    assert float(ot_cost_loss(FEAT, PROTOS, TARGETS / 4)) == pytest.approx(float((TARGETS / 4 * cost_matrix(FEAT, PROTOS)).sum()))


def test_value_scans_are_off_under_checks_disabled():
    """The element-wise value checks (rows sum to 1, plan mass, label range) are scans like the finiteness
    check: off under checks.disabled(), so a hot loop pays no host sync; the numbers are the formula's."""
    from mmalign import checks
    from mmalign.losses.codis import mlm_distill_loss
    plan = TARGETS / 4
    with pytest.raises(ValueError, match="rows sum to 1/N"):
        prototype_loss(FEAT, PROTOS, plan)
    with pytest.raises(ValueError, match="total mass"):
        ot_cost_loss(FEAT, PROTOS, TARGETS)
    logits, labels = rand(3, 4), torch.tensor([0, 9, -100])
    with pytest.raises(ValueError, match="labels go up to 9"):
        mlm_distill_loss(logits, labels)
    with checks.disabled():
        assert torch.allclose(prototype_loss(FEAT, PROTOS, plan), prototype_loss(FEAT, PROTOS, TARGETS) / 4)
        assert torch.allclose(ot_cost_loss(FEAT, PROTOS, TARGETS), (TARGETS * cost_matrix(FEAT, PROTOS)).sum())
        ok = torch.tensor([0, 2, -100])
        assert torch.equal(mlm_distill_loss(logits, ok), torch.nn.functional.cross_entropy(logits[:2], ok[:2]))


# ------------------------------------------------------------------------ models.codis
def tiny_codis(**kw):
    base = dict(image_dim=12, text_dim=10, width=16, heads=2, embed_dim=8, max_patches=4, max_tokens=6, queue_size=8,
                momentum=0.9, vocab_size=5, n_codewords=4, intra=True, codebook=True, mlm_input="after")
    base.update(kw)
    torch.manual_seed(0)
    return Codis(CodisConfig(**base))


MODEL = tiny_codis()


def codis_batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    patches, tokens = torch.randn(b, 4, 12, generator=g), torch.randn(b, 6, 10, generator=g)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[:, 4:] = False
    labels = torch.randint(0, 5, (b, 6), generator=g).masked_fill(~mask, -100)
    return patches, tokens, mask, torch.arange(b), labels


def losses_with(**changes):
    names = ("patches", "tokens", "token_mask", "ids", "mlm_labels")
    args = dict(zip(names, codis_batch()))
    args.update(changes)
    return MODEL.losses(**args)


P, T, M, I, L = codis_batch()
CODIS_MODEL_CASES = {
    "losses patch width": (lambda: losses_with(patches=torch.randn(3, 4, 11)), ValueError,
                           r"^patches must be \(B, P, image_dim=12\), got width 11"),
    "losses too many patches": (lambda: losses_with(patches=torch.randn(3, 5, 12)), ValueError,
                                r"^patches has 5 patches per image .* takes 1..4"),
    "losses 2-d patches": (lambda: losses_with(patches=torch.randn(3, 12)), ValueError, r"^patches must be 3-d"),
    "losses nan patches": (lambda: losses_with(patches=P.clone().fill_(NAN)), ValueError, r"^patches holds NaN"),
    "losses inf tokens": (lambda: losses_with(tokens=T.clone().fill_(INF)), ValueError, r"^tokens holds NaN or inf"),
    "losses int patches": (lambda: losses_with(patches=P.long()), ValueError, r"^patches must be a real floating-point"),
    "losses token width": (lambda: losses_with(tokens=torch.randn(3, 6, 9)), ValueError,
                           r"^tokens must be \(B, L, text_dim=10\), got width 9"),
    "losses too many tokens": (lambda: losses_with(tokens=torch.randn(3, 7, 10), token_mask=torch.ones(3, 7, dtype=torch.bool),
                                                   mlm_labels=None), ValueError, r"^tokens has 7 positions per caption .* 1..6"),
    "losses rows differ": (lambda: losses_with(tokens=T[:2], token_mask=M[:2], mlm_labels=L[:2]), ValueError,
                           r"^patches and tokens must hold one row per pair, got 3 images and 2 captions"),
    "losses mask shape": (lambda: losses_with(token_mask=M[:, :5]), ValueError, r"^token_mask must have shape \(3, 6\), got \(3, 5\)"),
    "losses float mask": (lambda: losses_with(token_mask=M.float()), ValueError,
                          r"^token_mask must be boolean .* got torch.float32; use token_mask.bool\(\)"),
    "losses mask of 2s": (lambda: losses_with(token_mask=M.long() * 2), ValueError, r"^token_mask must be boolean"),
    "losses mask None": (lambda: losses_with(token_mask=None), ValueError, r"^token_mask is None"),
    "losses ids float": (lambda: losses_with(ids=I.float()), ValueError, r"^ids must hold integer ids"),
    "losses ids short": (lambda: losses_with(ids=I[:2]), ValueError, r"^ids must be 1-d with one id per row \(3 rows\)"),
    "losses mlm labels >= vocab": (lambda: losses_with(mlm_labels=L.masked_fill(M, 5)), ValueError,
                                   r"^mlm_labels go up to 5 but the model predicts vocab_size=5 classes"),
    "losses mlm labels float": (lambda: losses_with(mlm_labels=L.float()), ValueError, r"^mlm_labels must hold integer class indices"),
    "losses mlm labels shape": (lambda: losses_with(mlm_labels=L[:, :5]), ValueError, r"^mlm_labels must be \(B, L\) = \(3, 6\)"),
    "losses bad generator": (lambda: MODEL.losses(P, T, M, I, L, generator=1), TypeError, r"^generator must be a torch.Generator"),
    "encode_images width": (lambda: MODEL.encode_images(torch.randn(2, 4, 3)), ValueError, r"^patches must be \(B, P, image_dim=12\)"),
    "encode_texts mask shape": (lambda: MODEL.encode_texts(T, M[:2]), ValueError, r"^token_mask must have shape \(3, 6\)"),
    "encode_texts batch_size 0": (lambda: MODEL.encode_texts(T, M, batch_size=0), ValueError, r"^batch_size must be >= 1"),
    "codeword_assignments width": (lambda: MODEL.codeword_assignments(torch.randn(3, 5)), ValueError,
                                   r"^emb must be \(\.\.\., embed_dim=8\)"),
}


def test_codis_losses_take_a_0_1_integer_mask_and_int32_labels_as_the_bool_mask():
    want = MODEL.losses(P, T, M, I, L, generator=torch.Generator().manual_seed(1))
    got = MODEL.losses(P, T, M.int(), I.numpy(), L.int(), generator=torch.Generator().manual_seed(1))
    MODEL._pending = None
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


# ------------------------------------------------------------------------ data.pairs
MRPC_TEXT = ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
             "1\t1\t2\tThe caf\u00e9 opened .\tA caf\u00e9 opened today .\n"
             "0\t3\t4\tIt rained .\tStocks fell .\n")


def _zip_of(path, inner_name, text):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(inner_name, text)


@pytest.mark.parametrize("kind, match", [
    ("latin-1", r"MRPC.tsv, line 2: not UTF-8 text \(byte 0xe9 at offset \d+\); GLUE's files are UTF-8.*iconv -f latin1"),
    ("latin-1 after a BOM", r"MRPC.tsv, line 2: not UTF-8 text \(byte 0xe9 at offset \d+\)"),
    ("binary garbage", r"MRPC.tsv, line \d+: (a NUL byte at offset \d+: this is a binary file|not UTF-8 text)"),
    ("glue zip", r"MRPC.tsv is a zip archive, not a TSV file; extract it first"),
    ("gzip", r"MRPC.tsv is gzip-compressed"),
    ("utf-16", r"MRPC.tsv is UTF-16 text"),
    ("directory", r"MRPC.tsv is a directory"),
])
def test_glue_loader_names_the_file_of_a_non_text_input(tmp_path, kind, match):
    import gzip

    path = tmp_path / "MRPC.tsv"
    if kind == "latin-1":
        path.write_bytes(MRPC_TEXT.encode("latin-1"))
    elif kind == "latin-1 after a BOM":
        path.write_bytes(b"\xef\xbb\xbf" + MRPC_TEXT.encode("latin-1"))
    elif kind == "binary garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "glue zip":
        _zip_of(path, "MRPC/dev.tsv", MRPC_TEXT)
    elif kind == "gzip":
        path.write_bytes(gzip.compress(MRPC_TEXT.encode()))
    elif kind == "utf-16":
        path.write_text(MRPC_TEXT, encoding="utf-16")
    else:
        path.mkdir()
    with pytest.raises(MalformedRowError, match=match):
        load_mrpc(path)
    with pytest.raises(ValueError, match=match):  # MalformedRowError is a ValueError
        load_glue_pairs(path)


def test_latin1_error_points_at_the_byte(tmp_path):
    path = tmp_path / "MRPC.tsv"
    data = b"\xef\xbb\xbf" + MRPC_TEXT.encode("latin-1")
    path.write_bytes(data)
    with pytest.raises(MalformedRowError) as e:
        load_mrpc(path)
    offset = int(str(e.value).split("at offset ")[1].split(")")[0])
    assert data[offset] == 0xE9 and data.index(b"\xe9") == offset


def test_utf8_file_still_reads_exactly(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text(MRPC_TEXT, encoding="utf-8")
    pairs = load_mrpc(path)
    assert pairs.a == ["The caf\u00e9 opened .", "It rained ."] and pairs.label.tolist() == [1, 0]


# ------------------------------------------------------------------------ models.temperature
@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_temperature_comes_back_off_its_bound(opt_cls):
    """Pushed against tau >= 0.25 for 100 steps, then asked for tau = 0.5: it leaves the bound. (Before,
    Adam carried the raw parameter past the clamp, where the gradient is zero, and tau stayed at 0.25.)"""
    a = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    temp = LearnableTemperature(0.5, max_scale=4.0)  # tau in [0.25, 1]
    opt = opt_cls(temp.parameters(), lr=0.05, **({"momentum": 0.9} if opt_cls is torch.optim.SGD else {}))
    from mmalign.losses import mms_loss

    for _ in range(100):  # aligned pairs: a lower temperature always lowers the loss
        opt.zero_grad()
        tau = temp()  # a step may have carried the raw parameter past the bound: the call projects it back
        assert temp.log_scale.item() <= math.log(4.0) + 1e-6
        mms_loss(a, a, temperature=tau, margin=0.0).backward()
        opt.step()
    assert temp().item() == pytest.approx(0.25, abs=1e-6)
    assert temp.log_scale.item() == pytest.approx(math.log(4.0), abs=1e-7)
    for _ in range(200):  # now the loss wants tau = 0.5 (Adam's momentum first has to turn: ~25 steps)
        opt.zero_grad()
        ((temp() - 0.5) ** 2).backward()
        assert float(temp.log_scale.grad) != 0.0
        opt.step()
    assert temp().item() == pytest.approx(0.5, abs=0.01), "the temperature stayed trapped at its bound"


def test_temperature_two_calls_in_one_graph_and_the_bound_gradient():
    temp = LearnableTemperature(0.25, max_scale=4.0)  # starts exactly at the bound
    with torch.no_grad():
        temp.log_scale.add_(1.0)  # an optimizer step past the bound
    tau1 = temp()  # projected back: tau = 0.25
    tau2 = temp()  # a second call (another loss of the same step) must not break the first graph
    (tau1 + 2 * tau2).backward()
    assert float(tau1.detach()) == pytest.approx(0.25)
    # d(3 tau)/ds = -3 tau at the bound: the true gradient, so a step can leave the bound
    assert float(temp.log_scale.grad) == pytest.approx(-3 * 0.25)


def test_temperature_registered_in_a_model_is_checkpointed():
    model = torch.nn.Module()
    model.temperature = LearnableTemperature(0.1)
    assert "temperature.log_scale" in model.state_dict()
    assert any(p is model.temperature.log_scale for p in model.parameters())
    with torch.no_grad():
        model.temperature.log_scale.fill_(math.log(1 / 0.2))
    fresh = torch.nn.Module()
    fresh.temperature = LearnableTemperature(0.1)
    fresh.load_state_dict(model.state_dict())
    assert fresh.temperature().item() == pytest.approx(0.2)


def test_temperature_refuses_a_diverged_state():
    temp = LearnableTemperature(0.1)
    with pytest.raises(ValueError, match=r"^log_scale in the state_dict is nan, not a finite number"):
        temp.load_state_dict({"log_scale": torch.tensor(NAN)})
    model = torch.nn.Module()
    model.temperature = LearnableTemperature(0.1)
    with pytest.raises(ValueError, match=r"^temperature.log_scale in the state_dict is inf"):
        model.load_state_dict({"temperature.log_scale": torch.tensor(INF)})
    assert temp().item() == pytest.approx(0.1)


# ------------------------------------------------------------------------ evaluation
SCORES = torch.tensor([0.91, 0.35, 0.78, 0.12])
LABELS01 = torch.tensor([1, 0, 1, 0])
FEATS = torch.randn(8, 3, generator=torch.Generator().manual_seed(6))
Y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])


def encoder_returning(rows):
    return lambda prompts: torch.randn(rows, 4, generator=torch.Generator().manual_seed(0))


def probe(train, test):
    return train_classifier(LinearClassifier(FEATS, 2), train, test, epochs=1, progress=False)


EVALUATION_CASES = {
    "spearman nan score": (lambda: spearman(torch.tensor([0.1, NAN, 0.3, 0.2]), torch.tensor([1.0, 2.0, 3.0, 4.0])), ValueError,
                           r"^x holds NaN or inf values \(1 NaN, 0 inf, of 4\)"),
    "spearman inf grade": (lambda: spearman([0.1, 0.2, 0.3], [1.0, INF, 3.0]), ValueError, r"^y holds NaN or inf values \(0 NaN, 1 inf"),
    "pair_classification cosine scores": (lambda: pair_classification(SCORES, LABELS01), ValueError,
                                          r"^predicted must hold decisions \(bool or 0/1\), got torch.float32 values such as "
                                          r"\[0.91.*threshold them first"),
    "pair_classification nan decisions": (lambda: pair_classification(torch.tensor([1.0, NAN, 0.0, 1.0]), LABELS01), ValueError,
                                          r"^predicted must hold decisions"),
    "pair_classification labels None": (lambda: pair_classification(SCORES >= 0.5, None), ValueError, r"^labels is None: this split has no labels"),
    "choose_threshold labels None": (lambda: choose_threshold(SCORES, None), ValueError,
                                     r"^labels is None: this split has no labels \(GLUE's test.tsv files have none\)"),
    "prompt_embeddings too few rows": (lambda: prompt_embeddings(encoder_returning(2), ["cat", "dog"], ["a {}.", "the {}."]),
                                       ValueError, r"^encode_texts returned shape \(2, 4\) for 4 prompts \(2 classes x 2 templates\)"),
    "prompt_embeddings too many rows": (lambda: prompt_embeddings(encoder_returning(8), ["cat", "dog"], ["a {}.", "the {}."]),
                                        ValueError, r"^encode_texts returned shape \(8, 4\) for 4 prompts"),
    "prompt_embeddings nan rows": (lambda: prompt_embeddings(lambda p: torch.full((len(p), 4), NAN), ["cat"], ["a {}."]),
                                   ValueError, r"^encode_texts\(prompts\) holds NaN"),
    "prompt_embeddings list output": (lambda: prompt_embeddings(lambda p: [[0.0] * 4] * len(p), ["cat"], ["a {}."]), TypeError,
                                      r"^encode_texts must return a torch.Tensor"),
    "prompt_embeddings one string": (lambda: prompt_embeddings(encoder_returning(3), "cat", ["a {}."]), TypeError,
                                     r"^class_names must be a sequence of strings, got one string 'cat'"),
    "train_classifier empty train": (lambda: probe((FEATS[:0], Y[:0]), (FEATS, Y)), ValueError, r"^the train split is empty"),
    "train_classifier empty test": (lambda: probe((FEATS, Y), (FEATS[:0], Y[:0])), ValueError, r"^the test split is empty"),
    "train_classifier label -1": (lambda: probe((FEATS, Y.masked_fill(Y == 1, -1)), (FEATS, Y)), ValueError,
                                  r"^train labels must be class indices >= 0, got -1"),
    "train_classifier test label -1": (lambda: probe((FEATS, Y), (FEATS, Y - 1)), ValueError, r"^test labels must be class indices >= 0"),
    "train_classifier float labels": (lambda: probe((FEATS, Y.float()), (FEATS, Y)), ValueError, r"^train labels must hold integer ids"),
    "train_classifier rows differ": (lambda: probe((FEATS[:5], Y), (FEATS, Y)), ValueError,
                                     r"^train input 0 must hold one row per label \(8\), got \(5, 3\)"),
    "train_classifier no inputs": (lambda: probe((Y,), (FEATS, Y)), TypeError, r"^train must be a tuple \(\*inputs, labels\)"),
}


def test_pair_classification_still_takes_float_decisions_exactly():
    want = pair_classification(SCORES >= 0.5, LABELS01)
    assert pair_classification((SCORES >= 0.5).double(), LABELS01) == want
    assert want["similarity"]["accuracy"] == 100.0


def test_prompt_embeddings_with_the_right_row_count():
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    out = prompt_embeddings(lambda p: z[: len(p)], ["cat", "dog"], ["a {}.", "the {}."])
    zn = torch.nn.functional.normalize(z, dim=-1)
    want = torch.nn.functional.normalize(torch.stack([zn[:2].mean(0), zn[2:].mean(0)]), dim=-1)
    assert torch.allclose(out, want, atol=1e-6)


# ------------------------------------------------------------------------ every case above
CASES = {**OT_CASES, **CODIS_LOSS_CASES, **CODIS_MODEL_CASES, **EVALUATION_CASES}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_a_clear_error(name):
    fn, exc, match = CASES[name]
    with pytest.raises(exc, match=match):
        fn()

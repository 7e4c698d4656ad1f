"""Bad inputs across the library: each raises a clear error naming the argument (pytest.raises with
match= on the message) or gives an exactly checked safe result. Issue 11's classes: non-finite
input, wrong dtype or width, unchecked numbers, numerics at the edges, unvalidated state, loaders."""

import gzip
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign import checks
from mmalign.config import choose_device, load_config
from mmalign.data import karpathy, rgbd, scenes, wit
from mmalign.losses import (AdaptiveMargin, ScheduledMargin, contrastive_loss, cosine_embedding_loss,
                            hypersphere_loss, info_nce, make_signed_pairs, mms_loss, moco_loss, multiview_loss,
                            n_loss_terms, triplet_loss, triplet_loss_embeddings)
from mmalign.memory import HardNegativeMemory, MoCoQueue, MomentumEncoder
from mmalign.miners import (anchor_negative_gaps, hardest_negatives, margin_violation_fraction, random_negatives,
                            semi_hard_negatives)
from mmalign.models.depth import DepthEncoder, colorize_depth, small_cnn
from mmalign.models.fusion import AverageFusion, ConcatFusion, EarlyFusionEncoder, depth_augmented_view_loss
from mmalign.models.heads import DualEncoder, ProjectionHead
from mmalign.models.pooling import AttentionPool, TransformerPool, masked_mean
from mmalign.models.text_scratch import CharTokenizer, TextEncoder
from mmalign.optim import LAMB, lamb_trust_ratio
from mmalign.retrieval import chance_recall, precision_at_k, recall_at_k, retrieval_report, top_k
from mmalign.retrieval import similarity
from mmalign.train import fit

B, D = 4, 6


def emb(n=B, d=D, seed=0, dtype=torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def with_value(x, value, idx=(1, 2)):
    x = x.clone()
    x[idx] = value
    return x


NAN, INF = float("nan"), float("inf")
A, Bm = emb(seed=1), emb(seed=2)
SIM = F.normalize(A, dim=-1) @ F.normalize(Bm, dim=-1).T
IDS = torch.arange(B)
NEG = torch.tensor([[1], [2], [3], [0]])


# ------------------------------------------------------------------------ losses
LOSS_CASES = {
    # non-finite embeddings and numbers
    "info_nce nan a": (lambda: info_nce(with_value(A, NAN), Bm), ValueError, r"^a holds NaN or inf values \(1 NaN"),
    "info_nce inf b": (lambda: info_nce(A, with_value(Bm, INF)), ValueError, r"^b holds NaN or inf values \(0 NaN, 1 inf"),
    "info_nce -inf b": (lambda: info_nce(A, with_value(Bm, -INF)), ValueError, r"^b holds NaN or inf"),
    "info_nce nan temperature": (lambda: info_nce(A, Bm, temperature=NAN), ValueError, r"temperature must be > 0 and finite, got nan"),
    "info_nce inf temperature": (lambda: info_nce(A, Bm, temperature=INF), ValueError, r"temperature must be > 0 and finite"),
    "info_nce zero temperature": (lambda: info_nce(A, Bm, temperature=0.0), ValueError, r"temperature must be > 0"),
    "info_nce negative temperature": (lambda: info_nce(A, Bm, temperature=-0.1), ValueError, r"temperature must be > 0"),
    "info_nce string temperature": (lambda: info_nce(A, Bm, temperature="0.07"), TypeError, r"temperature must be a real number, got str '0.07'"),
    "info_nce tensor temperature nan": (lambda: info_nce(A, Bm, temperature=torch.tensor(NAN)), ValueError, r"temperature must be > 0 and finite, got nan"),
    "info_nce vector temperature": (lambda: info_nce(A, Bm, temperature=torch.ones(2)), ValueError, r"temperature must be a number, got a tensor of shape \(2,\)"),
    # dtype / width / shape
    "info_nce int a": (lambda: info_nce(A.long(), Bm), ValueError, r"a must be a real floating-point tensor .*got torch.int64"),
    "info_nce complex b": (lambda: info_nce(A, Bm.to(torch.complex64)), ValueError, r"b must be a real floating-point tensor .*complex64"),
    "info_nce bool a": (lambda: info_nce(A > 0, Bm), ValueError, r"a must be a real floating-point tensor .*torch.bool"),
    "info_nce list a": (lambda: info_nce(A.tolist(), Bm), TypeError, r"a must be a torch.Tensor, got list"),
    "info_nce widths": (lambda: info_nce(emb(d=8), emb(d=6)), ValueError, r"embedding sizes differ: a has 8 features, b has 6"),
    "info_nce 1-d": (lambda: info_nce(A[0], Bm[0]), ValueError, r"expected 2-d \(batch, dim\) embeddings"),
    "info_nce 3-d": (lambda: info_nce(A[None], Bm[None]), ValueError, r"expected 2-d"),
    "info_nce lengths": (lambda: info_nce(emb(4), emb(3)), ValueError, r"same length, got 4 and 3"),
    "info_nce empty": (lambda: info_nce(emb(0), emb(0)), ValueError, r"empty batch"),
    "info_nce zero width": (lambda: info_nce(emb(d=0), emb(d=0)), ValueError, r"zero width"),
    "info_nce float labels": (lambda: info_nce(A, Bm, temperature=0.1, ids=IDS.float()), ValueError, r"ids of a must hold integer ids"),
    "info_nce short labels": (lambda: info_nce(A, Bm, temperature=0.1, ids=(IDS[:3], IDS)), ValueError, r"ids of a must be 1-d with one id per row"),
    "info_nce unmatched labels": (lambda: info_nce(A, Bm, temperature=0.1, ids=(IDS, IDS + 10)), ValueError, r"at least one positive"),
    "similarity widths": (lambda: similarity(emb(d=8), emb(d=6)), ValueError, r"a dim 8 != b dim 6"),
    "similarity nan": (lambda: similarity(with_value(A, NAN), Bm), ValueError, r"^a holds NaN"),
    "similarity int": (lambda: similarity(A.int(), Bm), ValueError, r"a must be a real floating-point"),
    # mms and margins
    "mms nan a": (lambda: mms_loss(with_value(A, NAN), Bm), ValueError, r"^a holds NaN"),
    "mms inf b": (lambda: mms_loss(A, with_value(Bm, INF)), ValueError, r"^b holds NaN or inf"),
    "mms nan margin": (lambda: mms_loss(A, Bm, margin=NAN), ValueError, r"margin must be finite, got nan"),
    "mms nan tensor margin": (lambda: mms_loss(A, Bm, margin=torch.full((B,), NAN)), ValueError, r"^margin holds NaN"),
    "mms string margin": (lambda: mms_loss(A, Bm, margin="0.2"), TypeError, r"margin must be a float, a \(4,\) tensor"),
    "mms margin shape": (lambda: mms_loss(A, Bm, margin=torch.zeros(3)), ValueError, r"margin must be a float, a \(4,\) tensor .* got shape \(3,\)"),
    "mms margin triple": (lambda: mms_loss(A, Bm, margin=(0.1, 0.1, 0.1)), ValueError, r"margin pair must be \(m_ab, m_ba\), got 3"),
    "mms complex margin": (lambda: mms_loss(A, Bm, margin=torch.zeros(B, dtype=torch.complex64)), ValueError, r"margin must be real"),
    "mms zero temperature": (lambda: mms_loss(A, Bm, temperature=0.0, margin=0.1), ValueError, r"temperature must be > 0"),
    "mms widths": (lambda: mms_loss(emb(d=8), emb(d=6)), ValueError, r"embedding sizes differ"),
    "mms int": (lambda: mms_loss(A.long(), Bm.long()), ValueError, r"real floating-point"),
    "scheduled negative start": (lambda: ScheduledMargin(start=-1), ValueError, r"need start >= 0"),
    "scheduled factor < 1": (lambda: ScheduledMargin(factor=0.5), ValueError, r"factor >= 1"),
    "scheduled every float": (lambda: ScheduledMargin(every=1.5), TypeError, r"every must be a whole number"),
    "scheduled nan start": (lambda: ScheduledMargin(start=NAN), ValueError, r"start must be finite"),
    "scheduled max below start": (lambda: ScheduledMargin(start=0.5, max_margin=0.1), ValueError, r"max_margin \(0.1\) is below start"),
    "scheduled load {}": (lambda: ScheduledMargin().load_state_dict({}), ValueError, r"ScheduledMargin state_dict is missing \['start', 'factor', 'every', 'max_margin', 'num_steps'\]"),
    "scheduled load list": (lambda: ScheduledMargin().load_state_dict([1, 2]), TypeError, r"expects the dict saved by state_dict\(\), got list"),
    "scheduled load negative steps": (lambda: ScheduledMargin().load_state_dict(dict(ScheduledMargin().state_dict(), num_steps=-3)), ValueError, r"num_steps'\] must be >= 0"),
    "scheduled load bad factor": (lambda: ScheduledMargin().load_state_dict(dict(ScheduledMargin().state_dict(), factor=0.1)), ValueError, r"factor >= 1"),
    "adaptive negative alpha": (lambda: AdaptiveMargin(-0.5), ValueError, r"alpha must be >= 0"),
    "adaptive nan alpha": (lambda: AdaptiveMargin(NAN), ValueError, r"alpha must be finite"),
    "adaptive load {}": (lambda: AdaptiveMargin().load_state_dict({}), ValueError, r"AdaptiveMargin state_dict is missing \['alpha'\]"),
    "adaptive load negative": (lambda: AdaptiveMargin().load_state_dict({"alpha": -1.0}), ValueError, r"alpha must be >= 0"),
    "adaptive nan input": (lambda: AdaptiveMargin()(with_value(A, NAN), Bm), ValueError, r"^a holds NaN"),
    # moco
    "moco nan q": (lambda: moco_loss(with_value(A, NAN), Bm, emb(5)), ValueError, r"^q holds NaN"),
    "moco inf key": (lambda: moco_loss(A, with_value(Bm, INF), emb(5)), ValueError, r"^k_pos holds NaN or inf"),
    "moco nan queue (even masked)": (lambda: moco_loss(A, Bm, with_value(emb(5), NAN, (0, 0)), temperature=0.07, ids=(IDS, torch.tensor([0, 9, 9, 9, 9]))), ValueError, r"^queue_keys holds NaN"),
    "moco nan temperature": (lambda: moco_loss(A, Bm, emb(5), temperature=NAN), ValueError, r"temperature must be > 0 and finite"),
    "moco int q": (lambda: moco_loss(A.long(), Bm, emb(5)), ValueError, r"q must be a real floating-point"),
    "moco queue width": (lambda: moco_loss(A, Bm, emb(5, 4)), ValueError, r"build the queue with dim=6"),
    "moco key shape": (lambda: moco_loss(A, emb(3), emb(5)), ValueError, r"q and k_pos must have the same shape"),
    "moco float ids": (lambda: moco_loss(A, Bm, emb(5), temperature=0.07, ids=(IDS.float(), torch.arange(5).float())), ValueError, r"ids of q must hold integer ids"),
    "moco one id side": (lambda: moco_loss(A, Bm, emb(5), temperature=0.07, ids=(IDS, None)), ValueError, r"ids must be a pair \(ids of q"),
    # cosine embedding
    "cosine nan a": (lambda: cosine_embedding_loss(with_value(A, NAN), Bm, torch.ones(B)), ValueError, r"^a holds NaN"),
    "cosine nan margin": (lambda: cosine_embedding_loss(A, Bm, torch.ones(B), margin=NAN), ValueError, r"margin must be finite"),
    "cosine margin > 1": (lambda: cosine_embedding_loss(A, Bm, torch.ones(B), margin=1.5), ValueError, r"margin must be in \[-1, 1\]"),
    "cosine 0/1 target": (lambda: cosine_embedding_loss(A, Bm, torch.tensor([0, 1, 0, 1])), ValueError, r"only \+1 .* and -1"),
    "cosine target shape": (lambda: cosine_embedding_loss(A, Bm, torch.ones(3)), ValueError, r"target must have shape \(4,\)"),
    "cosine complex target": (lambda: cosine_embedding_loss(A, Bm, torch.ones(B, dtype=torch.complex64)), ValueError, r"target must hold \+1 and -1"),
    "cosine widths": (lambda: cosine_embedding_loss(emb(d=8), emb(d=6), torch.ones(B)), ValueError, r"embedding sizes differ"),
    "signed pairs n=0": (lambda: make_signed_pairs(0), ValueError, r"need n > 0"),
    "signed pairs float n": (lambda: make_signed_pairs(4.0), TypeError, r"n must be a whole number"),
    "signed pairs negative k": (lambda: make_signed_pairs(4, negatives_per_positive=-1), ValueError, r"negatives_per_positive >= 0"),
    "signed pairs bad generator": (lambda: make_signed_pairs(4, negatives_per_positive=1, generator=0), TypeError, r"generator must be a torch.Generator"),
    # triplet
    "triplet nan sim": (lambda: triplet_loss(with_value(SIM, NAN), NEG, NEG), ValueError, r"^sim holds NaN"),
    "triplet int sim": (lambda: triplet_loss(SIM.long(), NEG, NEG), ValueError, r"sim must be a real floating-point"),
    "triplet non-square": (lambda: triplet_loss(SIM[:3], NEG, NEG), ValueError, r"square \(B, B\)"),
    "triplet 3-d": (lambda: triplet_loss(SIM[None], NEG, NEG), ValueError, r"square \(B, B\) similarity matrix \(2-d\)"),
    "triplet nan margin": (lambda: triplet_loss(SIM, NEG, NEG, margin=NAN), ValueError, r"margin must be finite"),
    "triplet negative margin": (lambda: triplet_loss(SIM, NEG, NEG, margin=-0.1), ValueError, r"margin must be >= 0"),
    "triplet float negatives": (lambda: triplet_loss(SIM, NEG.float(), NEG), ValueError, r"neg_for_images must hold integer indices"),
    "triplet own positive": (lambda: triplet_loss(SIM, torch.arange(B)[:, None], NEG), ValueError, r"own positive"),
    "triplet index out of range": (lambda: triplet_loss(SIM, NEG + 10, NEG), ValueError, r"out of range"),
    "triplet reduction": (lambda: triplet_loss(SIM, NEG, NEG, reduction="avg"), ValueError, r"reduction must be 'mean' or 'sum'"),
    "triplet embeddings nan": (lambda: triplet_loss_embeddings(with_value(A, NAN), Bm, NEG, NEG), ValueError, r"^img holds NaN"),
    "triplet embeddings shape": (lambda: triplet_loss_embeddings(emb(d=8), emb(d=6), NEG, NEG), ValueError, r"same shape"),
    "triplet embeddings int": (lambda: triplet_loss_embeddings(A.long(), Bm.long(), NEG, NEG), ValueError, r"img must be a real floating-point"),
    # contrastive
    "contrastive nan sim": (lambda: contrastive_loss(with_value(SIM, NAN)), ValueError, r"^sim holds NaN"),
    "contrastive not cosine": (lambda: contrastive_loss(SIM * 3), ValueError, r"cosine similarities in \[-1, 1\]"),
    "contrastive margin 0": (lambda: contrastive_loss(SIM, margin=0.0), ValueError, r"margin must be in \(0, 2\]"),
    "contrastive margin nan": (lambda: contrastive_loss(SIM, margin=NAN), ValueError, r"margin must be finite"),
    "contrastive eps 0": (lambda: contrastive_loss(SIM, eps=0.0), ValueError, r"eps must be > 0"),
    "contrastive non-square": (lambda: contrastive_loss(SIM[:, :3]), ValueError, r"square"),
    "contrastive int": (lambda: contrastive_loss(SIM.long()), ValueError, r"sim must be a real floating-point"),
    "contrastive float ids": (lambda: contrastive_loss(SIM, ids=IDS.float()), ValueError, r"must hold integer ids"),
    # hypersphere
    "hypersphere nan x": (lambda: hypersphere_loss(with_value(A, NAN), Bm), ValueError, r"^x holds NaN"),
    "hypersphere inf y": (lambda: hypersphere_loss(A, with_value(Bm, INF)), ValueError, r"^y holds NaN or inf"),
    "hypersphere alpha 0": (lambda: hypersphere_loss(A, Bm, alpha=0), ValueError, r"alpha and t must be > 0"),
    "hypersphere t nan": (lambda: hypersphere_loss(A, Bm, t=NAN), ValueError, r"t must be finite"),
    "hypersphere lambda nan": (lambda: hypersphere_loss(A, Bm, lambda_align=NAN), ValueError, r"lambda_align must be finite"),
    "hypersphere widths": (lambda: hypersphere_loss(emb(d=8), emb(d=6)), ValueError, r"embedding sizes differ: x has 8"),
    "hypersphere complex": (lambda: hypersphere_loss(A.to(torch.complex64), Bm), ValueError, r"x must be a real floating-point"),
    # multiview
    "multiview nan view": (lambda: multiview_loss([A, with_value(Bm, NAN)]), ValueError, r"^views\[1\] holds NaN"),
    "multiview int view": (lambda: multiview_loss([A, Bm.long()]), ValueError, r"same B and D|views\[1\] must be a real floating-point"),
    "multiview non-tensor": (lambda: multiview_loss([A, Bm.tolist()]), TypeError, r"views\[1\] must be a \(B, D\) torch.Tensor, got list"),
    "multiview one view": (lambda: multiview_loss([A]), ValueError, r"at least 2"),
    "multiview shapes": (lambda: multiview_loss([A, emb(d=5)]), ValueError, r"same B and D"),
    "multiview mode": (lambda: multiview_loss([A, Bm], mode="star"), ValueError, r"unknown multi-view mode 'star'"),
    "multiview nan weight": (lambda: multiview_loss([A, Bm], weights=[NAN]), ValueError, r"^weights holds NaN"),
    "multiview nan dict weight": (lambda: multiview_loss([A, Bm], weights={(0, 1): NAN}), ValueError, r"weight of term \(0, 1\) must be a finite number"),
    "multiview weights shape": (lambda: multiview_loss([A, Bm], weights=[1.0, 2.0]), ValueError, r"one entry per term"),
    "multiview pair_loss not callable": (lambda: multiview_loss([A, Bm], pair_loss="info_nce"), TypeError, r"pair_loss must be callable"),
    "n_loss_terms float V": (lambda: n_loss_terms(3.0), TypeError, r"V must be a whole number"),
    "n_loss_terms V=1": (lambda: n_loss_terms(1), ValueError, r"at least 2 views"),
}


# ------------------------------------------------------------------------ retrieval and miners
Q, G = emb(5, 3, seed=3), emb(5, 3, seed=4)
QI = torch.arange(5)
RETRIEVAL_CASES = {
    "recall nan query": (lambda: recall_at_k(with_value(Q, NAN), G, QI, QI), ValueError, r"^query holds NaN or inf"),
    "recall inf gallery": (lambda: recall_at_k(Q, with_value(G, INF), QI, QI), ValueError, r"^gallery holds NaN or inf"),
    "recall chunk_size -1": (lambda: recall_at_k(Q, G, QI, QI, chunk_size=-1), ValueError, r"chunk_size must be >= 1, got -1"),
    "recall chunk_size 0": (lambda: recall_at_k(Q, G, QI, QI, chunk_size=0), ValueError, r"chunk_size must be >= 1, got 0"),
    "recall chunk_size float": (lambda: recall_at_k(Q, G, QI, QI, chunk_size=2.5), TypeError, r"chunk_size must be a whole number"),
    "recall k float": (lambda: recall_at_k(Q, G, QI, QI, ks=(1.5,)), TypeError, r"every K in ks must be a whole number"),
    "recall k 0": (lambda: recall_at_k(Q, G, QI, QI, ks=(0,)), ValueError, r"every K must satisfy 1 <= K <= gallery size"),
    "recall k too big": (lambda: recall_at_k(Q, G, QI, QI, ks=(6,)), ValueError, r"1 <= K <= gallery size \(5\)"),
    "recall widths": (lambda: recall_at_k(emb(5, 8), emb(5, 6), QI, QI), ValueError, r"query dim 8 != gallery dim 6"),
    "recall int query": (lambda: recall_at_k(Q.long(), G, QI, QI), ValueError, r"query must be a real floating-point"),
    "recall list query": (lambda: recall_at_k(Q.tolist(), G, QI, QI), TypeError, r"query embeddings must be a torch.Tensor, got list"),
    "recall float ids": (lambda: recall_at_k(Q, G, QI.float(), QI), ValueError, r"query_ids must hold integer ids"),
    "recall short ids": (lambda: recall_at_k(Q, G, QI[:3], QI), ValueError, r"one id per row"),
    "recall no positive": (lambda: recall_at_k(Q, G, QI, QI + 1, ks=(1,)), ValueError, r"query 0 \(id 0\) has no positive in the gallery"),
    "recall empty": (lambda: recall_at_k(emb(0, 3), G, QI[:0], QI), ValueError, r"empty query or gallery"),
    "precision nan query": (lambda: precision_at_k(with_value(Q, NAN), G, QI, QI, max_k=2), ValueError, r"^query holds NaN"),
    "precision max_k float": (lambda: precision_at_k(Q, G, QI, QI, max_k=2.0), TypeError, r"max_k must be a whole number"),
    "precision max_k 0": (lambda: precision_at_k(Q, G, QI, QI, max_k=0), ValueError, r"max_k must be in 1..5"),
    "precision chunk -3": (lambda: precision_at_k(Q, G, QI, QI, max_k=2, chunk_size=-3), ValueError, r"chunk_size must be >= 1"),
    "top_k nan gallery": (lambda: top_k(Q, with_value(G, NAN), 2), ValueError, r"^gallery holds NaN"),
    "top_k k float": (lambda: top_k(Q, G, 1.0), TypeError, r"k must be a whole number"),
    "top_k k 9": (lambda: top_k(Q, G, 9), ValueError, r"k must be in 1..5"),
    "top_k chunk 0": (lambda: top_k(Q, G, 2, chunk_size=0), ValueError, r"chunk_size must be >= 1"),
    "report nan": (lambda: retrieval_report(with_value(Q, NAN), G, QI, QI, ks=(1,)), ValueError, r"^query holds NaN"),
    "chance float gallery": (lambda: chance_recall(10.5, 1, 1), TypeError, r"n_gallery must be a whole number"),
    "chance k 0": (lambda: chance_recall(10, 1, 0), ValueError, r"1 <= k <= gallery"),
    "chance positives > gallery": (lambda: chance_recall(10, 11, 1), ValueError, r"1 <= positives <= gallery"),
    # miners
    "random nan sim ok? no: nan": (lambda: random_negatives(with_value(SIM, NAN)), ValueError, r"sim holds NaN or inf .*item ids instead of masking"),
    "hardest int sim": (lambda: hardest_negatives(SIM.long()), ValueError, r"floating-point"),
    "hardest k 0": (lambda: hardest_negatives(SIM, k=0), ValueError, r"k must be a positive integer"),
    "hardest k float": (lambda: hardest_negatives(SIM, k=1.0), ValueError, r"k must be a positive integer"),
    "hardest float ids": (lambda: hardest_negatives(SIM, ids=IDS.float()), ValueError, r"ids of rows must hold integer ids"),
    "hardest one ids tensor, not square": (lambda: hardest_negatives(emb(3, 4), ids=IDS[:3]), ValueError, r"one ids tensor labels both sides"),
    "random bad generator": (lambda: random_negatives(SIM, generator=3), TypeError, r"generator must be a torch.Generator"),
    "semi-hard nan margin": (lambda: semi_hard_negatives(SIM, margin=NAN), ValueError, r"margin must be finite"),
    "semi-hard margin 0": (lambda: semi_hard_negatives(SIM, margin=0.0), ValueError, r"margin must be > 0"),
    "semi-hard fallback": (lambda: semi_hard_negatives(SIM, fallback="random"), ValueError, r"fallback must be"),
    "semi-hard pos out of range": (lambda: semi_hard_negatives(SIM, pos_for_images=IDS + 1), ValueError, r"pos_for_images must index the other side"),
    "gaps float negatives": (lambda: anchor_negative_gaps(SIM, NEG.float(), NEG), ValueError, r"neg_for_images must hold integer indices"),
    "violations nan margin": (lambda: margin_violation_fraction(SIM, NEG, NEG, margin=NAN), ValueError, r"margin must be finite"),
}


# ------------------------------------------------------------------------ memory, optim
def loaded_buffer(**changes):
    q = MoCoQueue(4, 3)
    q.enqueue(emb(2, 3), torch.tensor([7, 8]))
    state = q.state_dict()
    state.update(changes)
    return MoCoQueue(4, 3).load_state_dict(state)


P = torch.nn.Parameter(torch.ones(3))
MEMORY_OPTIM_CASES = {
    "ring ids wrong length": (lambda: loaded_buffer(item_ids=torch.tensor([1])), ValueError, r"item_ids'\] must be 1-d with one id per row \(4 rows\)"),
    "ring ids float": (lambda: loaded_buffer(item_ids=torch.zeros(4)), ValueError, r"item_ids'\] must hold integer ids"),
    "ring ptr beyond size": (lambda: loaded_buffer(ptr=9), ValueError, r"ptr'\] must be <= 3, got 9"),
    "ring count beyond size": (lambda: loaded_buffer(count=5), ValueError, r"count'\] must be <= 4, got 5"),
    "ring negative ptr": (lambda: loaded_buffer(ptr=-1), ValueError, r"ptr'\] must be >= 0"),
    "ring ptr != count": (lambda: loaded_buffer(ptr=3, count=2), ValueError, r"ptr=3 but count=2"),
    "ring float count": (lambda: loaded_buffer(count=2.0), TypeError, r"count'\] must be a whole number"),
    "ring features shape": (lambda: loaded_buffer(features=torch.zeros(4, 2)), ValueError, r"same size and dim"),
    "ring features int": (lambda: loaded_buffer(features=torch.zeros(4, 3, dtype=torch.long)), ValueError, r"features'\] must be floating point"),
    "ring features nan": (lambda: loaded_buffer(features=with_value(torch.zeros(4, 3), NAN, (0, 0))), ValueError, r"features'\]\ holds NaN"),
    "ring missing keys": (lambda: MoCoQueue(4, 3).load_state_dict({"ptr": 0}), ValueError, r"state_dict is missing \['count', 'features', 'item_ids'\]"),
    "ring not a dict": (lambda: MoCoQueue(4, 3).load_state_dict([]), TypeError, r"expects the dict saved by state_dict\(\)"),
    "queue nan keys": (lambda: MoCoQueue(4, 3).enqueue(with_value(emb(2, 3), NAN, (0, 0)), [1, 2]), ValueError, r"^features holds NaN"),
    "queue int keys": (lambda: MoCoQueue(4, 3).enqueue(torch.ones(2, 3, dtype=torch.long), [1, 2]), ValueError, r"real floating-point"),
    "queue complex ids": (lambda: MoCoQueue(4, 3).enqueue(emb(2, 3), torch.ones(2, dtype=torch.complex64)), ValueError, r"item ids must be integers"),
    "queue width": (lambda: MoCoQueue(4, 3).enqueue(emb(2, 5), [1, 2]), ValueError, r"expected \(n, 3\) features"),
    "memory size 0": (lambda: HardNegativeMemory(0, 3), ValueError, r"size must be a positive integer"),
    "memory dtype int": (lambda: HardNegativeMemory(2, 3, dtype=torch.long), ValueError, r"dtype must be a floating-point dtype"),
    "memory dtype string": (lambda: HardNegativeMemory(2, 3, dtype="float32"), ValueError, r"dtype must be a floating-point dtype"),
    "violators nan margin": (lambda: HardNegativeMemory.select_violators(SIM, margin=NAN), ValueError, r"margin must be finite"),
    "violators nan sim": (lambda: HardNegativeMemory.select_violators(with_value(SIM, NAN)), ValueError, r"sim holds NaN"),
    "momentum nan": (lambda: MomentumEncoder(torch.nn.Linear(2, 2), NAN), ValueError, r"momentum must be finite"),
    "momentum 1.5": (lambda: MomentumEncoder(torch.nn.Linear(2, 2), 1.5), ValueError, r"momentum must be in \[0, 1\]"),
    "momentum update non-module": (lambda: MomentumEncoder(torch.nn.Linear(2, 2)).update("x"), ValueError, r"online must be the torch.nn.Module"),
    "lamb single beta": (lambda: LAMB([P], betas=(0.9,)), ValueError, r"betas must be a pair \(beta1, beta2\)"),
    "lamb beta string": (lambda: LAMB([P], betas="0.9"), ValueError, r"betas must be a pair"),
    "lamb beta 1": (lambda: LAMB([P], betas=(0.9, 1.0)), ValueError, r"betas must be in \[0, 1\)"),
    "lamb nan lr": (lambda: LAMB([P], lr=NAN), ValueError, r"lr must be finite"),
    "lamb negative lr": (lambda: LAMB([P], lr=-1.0), ValueError, r"lr, eps and weight_decay must be >= 0"),
    "lamb clamp 0": (lambda: LAMB([P], clamp=0), ValueError, r"clamp must be > 0"),
    "lamb clamp nan": (lambda: LAMB([P], clamp=NAN), ValueError, r"clamp must be finite"),
    "trust ratio clamp -1": (lambda: lamb_trust_ratio(torch.ones(3), torch.ones(3), clamp=-1), ValueError, r"clamp must be > 0, got -1"),
    "trust ratio shapes": (lambda: lamb_trust_ratio(torch.ones(3), torch.ones(4)), ValueError, r"weight \(3,\) and update \(4,\) must have the same shape"),
    "trust ratio int": (lambda: lamb_trust_ratio(torch.ones(3, dtype=torch.long), torch.ones(3)), ValueError, r"weight must be a real floating-point"),
}


# ------------------------------------------------------------------------ models
X3 = emb(2, 5 * 8).reshape(2, 5, 8)
MODEL_CASES = {
    "masked_mean 2-d": (lambda: masked_mean(emb()), ValueError, r"expected \(B, L, D\) token features"),
    "masked_mean int": (lambda: masked_mean(X3.long()), ValueError, r"x must be a real floating-point"),
    "masked_mean float mask": (lambda: masked_mean(X3, torch.ones(2, 5)), ValueError, r"bool tensor of shape"),
    "masked_mean list mask": (lambda: masked_mean(X3, [[True] * 5] * 2), ValueError, r"bool tensor of shape \(B, L\) = \(2, 5\) .* got list"),
    "attention pool width": (lambda: AttentionPool(8, 2)(emb(2, 5 * 6).reshape(2, 5, 6)), ValueError, r"x has 6 features per token but this pooling was built with dim=8"),
    "attention pool int": (lambda: AttentionPool(8, 2)(X3.long()), ValueError, r"x must be a real floating-point"),
    "attention pool all padding": (lambda: AttentionPool(8, 2)(X3, torch.zeros(2, 5, dtype=torch.bool)), ValueError, r"no real token"),
    "attention pool dropout 1": (lambda: AttentionPool(8, 2, dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
    "attention pool heads 0": (lambda: AttentionPool(8, 0), ValueError, r"heads must be >= 1"),
    "attention pool divisible": (lambda: AttentionPool(8, 3), ValueError, r"divisible"),
    "transformer pool width": (lambda: TransformerPool(8, 2)(emb(2, 5 * 4).reshape(2, 5, 4)), ValueError, r"x has 4 features per token .* dim=8"),
    "transformer pool layers 0": (lambda: TransformerPool(8, 2, layers=0), ValueError, r"layers must be >= 1"),
    "head in_dim float": (lambda: ProjectionHead(3.0, 2), TypeError, r"in_dim must be a whole number"),
    "head in_dim 0": (lambda: ProjectionHead(0, 2), ValueError, r"in_dim and out_dim must be positive"),
    "head dropout 2": (lambda: ProjectionHead(3, 2, dropout=2.0), ValueError, r"dropout must be in \[0, 1\)"),
    "head width": (lambda: ProjectionHead(3, 2)(emb(4, 5)), ValueError, r"expected features of size 3, got \(4, 5\)"),
    "head int input": (lambda: ProjectionHead(3, 2)(torch.ones(4, 3, dtype=torch.long)), ValueError, r"features must be floating point"),
    "head list input": (lambda: ProjectionHead(3, 2)([[1.0, 2.0, 3.0]]), TypeError, r"x must be a \(B, 3\) torch.Tensor"),
    "head standardizer nan": (lambda: ProjectionHead(3, 2).fit_standardizer(with_value(emb(4, 3), NAN)), ValueError, r"^features holds NaN"),
    "head from nan features": (lambda: ProjectionHead.from_features(with_value(emb(4, 3), INF), 2), ValueError, r"^features holds NaN or inf"),
    "dual encoder non-module": (lambda: DualEncoder(lambda x: x, ProjectionHead(3, 2)), TypeError, r"image_head must be a torch.nn.Module"),
    "average fusion width": (lambda: AverageFusion(5, 3, 4)(emb(2, 6), emb(2, 3)), ValueError, r"rgb features have width 6 but the fusion was built with rgb_dim=5"),
    "average fusion depth width": (lambda: AverageFusion(5, 3, 4)(emb(2, 5), emb(2, 2)), ValueError, r"depth features have width 2 .* depth_dim=3"),
    "concat fusion width": (lambda: ConcatFusion(5, 3, 4)(emb(2, 4), emb(2, 4)), ValueError, r"rgb features have width 4 .* rgb_dim=5"),
    "concat fusion int": (lambda: ConcatFusion(5, 3, 4)(emb(2, 5).long(), emb(2, 3)), ValueError, r"rgb features must be floating point"),
    "fusion dims 0": (lambda: AverageFusion(0, 3, 4), ValueError, r"rgb_dim must be >= 1"),
    "fusion batch": (lambda: ConcatFusion(5, 3, 4)(emb(2, 5), emb(3, 3)), ValueError, r"same B"),
    "early fusion bool": (lambda: EarlyFusionEncoder(4)(torch.ones(2, 3, 8, 8, dtype=torch.bool), torch.ones(2, 1, 8, 8)), ValueError, r"rgb must be a real-valued image tensor"),
    "early fusion size": (lambda: EarlyFusionEncoder(4)(torch.ones(2, 3, 8, 8), torch.ones(2, 1, 4, 4)), ValueError, r"resize the depth"),
    "view loss nan weight": (lambda: depth_augmented_view_loss(A, Bm, Bm, weight=NAN), ValueError, r"weight must be finite"),
    "view loss nan depth": (lambda: depth_augmented_view_loss(A, Bm, with_value(Bm, NAN)), ValueError, r"^b holds NaN"),
    "small_cnn width 0": (lambda: small_cnn(1, 4, 0), ValueError, r"width must be >= 1"),
    "depth encoder complex": (lambda: DepthEncoder(4)(torch.ones(2, 8, 8, dtype=torch.complex64)), ValueError, r"depth must be real-valued"),
    "depth encoder list": (lambda: DepthEncoder(4)([[1.0]]), TypeError, r"depth must be a torch.Tensor"),
    "depth encoder empty": (lambda: DepthEncoder(4)(torch.ones(0, 8, 8)), ValueError, r"depth is empty"),
    "colorize 2-d": (lambda: colorize_depth(torch.ones(8, 8)), ValueError, r"depth must be \(B, H, W\)"),
    "text encoder float ids": (lambda: TextEncoder(10, 8)(torch.ones(2, 3)), ValueError, r"ids must be integer token ids"),
    "text encoder id >= vocab": (lambda: TextEncoder(10, 8)(torch.tensor([[1, 12]])), ValueError, r"token ids must be in 0..9 .* got values in \[1, 12\]"),
    "text encoder negative id": (lambda: TextEncoder(10, 8)(torch.tensor([[-1, 2]])), ValueError, r"token ids must be in 0..9"),
    "text encoder mask shape": (lambda: TextEncoder(10, 8)(torch.tensor([[1, 2]]), torch.ones(1, 3, dtype=torch.bool)), ValueError, r"mask must have shape \(1, 2\)"),
    "text encoder vocab 1": (lambda: TextEncoder(1, 8), ValueError, r"vocab_size must be >= 2"),
    "text encoder dropout": (lambda: TextEncoder(10, 8, dropout=-0.1), ValueError, r"dropout must be in \[0, 1\)"),
    "tokenizer non-string": (lambda: CharTokenizer("abc").encode(["ab", 3]), TypeError, r"texts must be strings, got a int"),
    "tokenizer max_len float": (lambda: CharTokenizer("abc").encode(["ab"], max_len=2.0), TypeError, r"max_len must be a whole number"),
}


# ------------------------------------------------------------------------ train, config
def tiny_fit(**kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    args = dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=4, progress=False,
                device="cpu")
    args.update(kwargs)
    loss_fn = args.pop("loss_fn", lambda m, b: m(b[0]).pow(2).mean())
    return fit(model, loss_fn, args.pop("data", (torch.randn(8, 3),)), **args)


TRAIN_CASES = {
    "fit grad_clip -1": (lambda: tiny_fit(grad_clip=-1), ValueError, r"grad_clip must be > 0, got -1"),
    "fit grad_clip 0": (lambda: tiny_fit(grad_clip=0), ValueError, r"grad_clip must be > 0"),
    "fit grad_clip nan": (lambda: tiny_fit(grad_clip=NAN), ValueError, r"grad_clip must be finite"),
    "fit epochs float": (lambda: tiny_fit(epochs=1.5), TypeError, r"epochs must be a whole number"),
    "fit batch_size 0": (lambda: tiny_fit(batch_size=0), ValueError, r"must be positive"),
    "fit negative seed": (lambda: tiny_fit(seed=-1), ValueError, r"seed must be >= 0"),
    "fit max_steps 0": (lambda: tiny_fit(max_steps=0), ValueError, r"max_steps must be >= 1"),
    "fit eval_every 0": (lambda: tiny_fit(eval_every=0), ValueError, r"eval_every must be >= 1"),
    "fit num_workers -1": (lambda: tiny_fit(num_workers=-1), ValueError, r"num_workers must be >= 0"),
    "fit loss (B, 1)": (lambda: tiny_fit(loss_fn=lambda m, b: m(b[0])), ValueError, r"loss_fn must return a scalar loss, got a tensor of shape \(4, 1\) at step 0; reduce it with .mean\(\)"),
    "fit loss float": (lambda: tiny_fit(loss_fn=lambda m, b: float(m(b[0]).mean().detach())), TypeError, r"loss_fn must return the loss as a torch.Tensor with gradients, got float"),
    "fit loss detached": (lambda: tiny_fit(loss_fn=lambda m, b: m(b[0]).mean().detach()), ValueError, r"does not require grad"),
    "fit loss triple": (lambda: tiny_fit(loss_fn=lambda m, b: (m(b[0]).mean(), {}, 1)), TypeError, r"a pair \(loss, \{name: float\}\)"),
    "fit logs not dict": (lambda: tiny_fit(loss_fn=lambda m, b: (m(b[0]).mean(), 3.0)), TypeError, r"a pair \(loss, \{name: float\}\)"),
    "fit model not module": (lambda: fit(lambda x: x, lambda m, b: 0, (torch.ones(4, 1),), optimizer=torch.optim.SGD([P], lr=0.1), epochs=1, batch_size=2), TypeError, r"model must be a torch.nn.Module"),
    "fit optimizer class": (lambda: tiny_fit(optimizer=torch.optim.SGD), TypeError, r"optimizer must be a torch.optim.Optimizer"),
    "fit loss_fn not callable": (lambda: tiny_fit(loss_fn="mse"), TypeError, r"loss_fn must be a callable"),
    "fit stateful without state_dict": (lambda: tiny_fit(stateful={"queue": [1, 2]}), TypeError, r"stateful\['queue'\] \(list\) needs state_dict\(\)"),
    "fit data empty tuple": (lambda: tiny_fit(data=()), ValueError, r"data is empty"),
    "fit data int": (lambda: tiny_fit(data=5), TypeError, r"data must be a tuple of tensors, a map-style torch Dataset .* or a torch IterableDataset, got int"),
    "fit nan loss": (lambda: tiny_fit(loss_fn=lambda m, b: m(b[0]).mean() * NAN), FloatingPointError, r"loss is nan at step 0"),
}


CASES = {**LOSS_CASES, **RETRIEVAL_CASES, **MEMORY_OPTIM_CASES, **MODEL_CASES, **TRAIN_CASES}


def test_there_are_at_least_150_cases():
    assert len(CASES) >= 150, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_a_clear_error(name):
    fn, exc, match = CASES[name]
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------------ config, scenes (environment)
def test_device_variable_is_named_and_cuda_without_cuda_is_rejected(monkeypatch):
    monkeypatch.setenv("MMALIGN_DEVICE", "bogus")
    with pytest.raises(ValueError, match=r"MMALIGN_DEVICE='bogus' is not a torch device name; use cpu, cuda"):
        choose_device()
    monkeypatch.setenv("MMALIGN_DEVICE", "cpu")
    assert choose_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("MMALIGN_DEVICE", "cuda")
        with pytest.raises(ValueError, match=r"MMALIGN_DEVICE='cuda' asks for CUDA but torch.cuda.is_available\(\) is False"):
            choose_device()
        with pytest.raises(ValueError, match=r"MMALIGN_DEVICE='cuda:0' asks for CUDA"):
            monkeypatch.setenv("MMALIGN_DEVICE", "cuda:0")
            load_config("ci")
    monkeypatch.delenv("MMALIGN_DEVICE")
    with pytest.raises(ValueError, match=r"device 'gpu0' is not a torch device name"):
        choose_device("gpu0")


SCENE_CASES = {
    "image_size 0": (lambda cfg: scenes.generate_scenes(2, 0, image_size=0), ValueError, r"image_size must be >= 8, got 0"),
    "captions_per_image 0": (lambda cfg: scenes.generate_scenes(2, 0, captions_per_image=0), ValueError, r"captions_per_image must be >= 1, got 0"),
    "max_objects 0": (lambda cfg: scenes.generate_scenes(2, 0, max_objects=0), ValueError, r"max_objects must be >= 1, got 0"),
    "max_objects 7": (lambda cfg: scenes.sample_graph(np.random.default_rng(0), 7), ValueError, r"max_objects must be <= 6, got 7"),
    "n float": (lambda cfg: scenes.generate_scenes(2.5, 0), TypeError, r"n must be a whole number"),
    "n 0": (lambda cfg: scenes.generate_scenes(0, 0), ValueError, r"n must be positive"),
    "world n=0": (lambda cfg: scenes.load_scene_world("val", cfg, n=0), ValueError, r"n must be positive, got 0 \(None takes the profile's size\)"),
    "world n=-5": (lambda cfg: scenes.load_scene_world("val", cfg, n=-5), ValueError, r"n must be positive, got -5"),
    "world image_size 0": (lambda cfg: scenes.load_scene_world("val", cfg, n=2, image_size=0), ValueError, r"image_size must be >= 8, got 0"),
    "world captions 0": (lambda cfg: scenes.load_scene_world("val", cfg, n=2, captions_per_image=0), ValueError, r"captions_per_image must be >= 1"),
    "world split": (lambda cfg: scenes.load_scene_world("dev", cfg), ValueError, r"split must be one of"),
    "world cfg dict": (lambda cfg: scenes.load_scene_world("val", {"n_val": 2}), TypeError, r"cfg must be a mmalign.config.Config"),
    "caption_table language": (lambda cfg: scenes.generate_scenes(1, 0, image_size=16).caption_table("fr"), ValueError, r"unknown language 'fr'; this world has captions in \('en', 'hi', 'ja'\)"),
    "graded pairs language": (lambda cfg: scenes.graded_caption_pairs(scenes.generate_scenes(1, 0, image_size=16), 2, lang="de"), ValueError, r"unknown language 'de'"),
    "dataset language": (lambda cfg: scenes.SceneCaptionDataset(scenes.generate_scenes(1, 0, image_size=16), "fr"), ValueError, r"lang must be one of"),
}


@pytest.mark.parametrize("name", sorted(SCENE_CASES))
def test_scene_world_arguments(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path))
    fn, exc, match = SCENE_CASES[name]
    with pytest.raises(exc, match=match):
        fn(load_config("ci"))
    assert not any((tmp_path / "scenes").glob("*/*")) if (tmp_path / "scenes").exists() else True


# ------------------------------------------------------------------------ loaders
def write_split(tmp_path, images):
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"images": images}))
    return path


GOOD = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a cat"}], "imgid": 0}


@pytest.mark.parametrize("entry, match", [
    ({k: v for k, v in GOOD.items() if k != "sentences"}, r"images\[0\] lacks the field\(s\) \['sentences'\]"),
    ({k: v for k, v in GOOD.items() if k != "filename"}, r"images\[0\] lacks the field\(s\) \['filename'\]"),
    ({k: v for k, v in GOOD.items() if k != "split"}, r"images\[0\] lacks the field\(s\) \['split'\]"),
    (dict(GOOD, sentences="a cat"), r"'sentences' must be a list of objects with a 'raw' caption"),
    (dict(GOOD, imgid="7"), r"'imgid' must be an integer"),
    ("a.jpg", r"images\[0\] is a str, not an object"),
])
def test_karpathy_malformed_entries(tmp_path, entry, match):
    path = write_split(tmp_path, [entry])
    with pytest.raises(ValueError, match=rf"split.json: .*{match}"):
        karpathy.load_karpathy_split(path, tmp_path / "img", check_files=False)


def test_karpathy_truncated_json_names_the_file(tmp_path):
    path = write_split(tmp_path, [GOOD])
    path.write_text(path.read_text()[:25])
    with pytest.raises(ValueError, match=r"split.json is not valid JSON .* truncated or damaged"):
        karpathy.load_karpathy_split(path, tmp_path / "img")
    with pytest.raises(TypeError, match=r"split must be a split name or a tuple"):
        karpathy.load_karpathy_split(write_split(tmp_path, [GOOD]), tmp_path / "img", split=3, check_files=False)


def test_karpathy_truncated_jpeg_names_the_path(tmp_path):
    path = write_split(tmp_path, [GOOD])
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "img" / "a.jpg")
    data = (tmp_path / "img" / "a.jpg").read_bytes()
    (tmp_path / "img" / "a.jpg").write_bytes(data[: len(data) // 3])
    ds = karpathy.KarpathyDataset(path, tmp_path / "img")
    with pytest.raises(ValueError, match=r"image .*a.jpg \(item 0\) cannot be decoded .* truncated or damaged"):
        ds[0]
    (tmp_path / "img" / "a.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"a.jpg \(item 0\) is missing"):
        ds[0]


@pytest.mark.parametrize("batch, match", [
    ([], r"non-empty list of \(image, captions, imgid\)"),
    ([("img", ["a"])], r"item 0 must be \(image, \[captions\], imgid\)"),
    ([("img", "a cat", 0)], r"item 0's captions must be a list of strings"),
    ([("img", ["a"], "0")], r"item 0's imgid must be an integer"),
    ([(torch.zeros(3, 4, 4), ["a"], 0), (torch.zeros(3, 5, 5), ["b"], 1)], r"image tensors have different shapes"),
])
def test_karpathy_collate_malformed(batch, match):
    with pytest.raises(ValueError, match=match):
        karpathy.karpathy_collate(batch)


def test_karpathy_collate_good_batch_exact():
    images, caps, ids = karpathy.karpathy_collate([(torch.zeros(3, 2, 2), ["a"], 4), (torch.ones(3, 2, 2), ["b", "c"], 5)])
    assert images.shape == (2, 3, 2, 2) and caps == [["a"], ["b", "c"]] and ids.tolist() == [4, 5]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(limit=-1), ValueError, r"limit must be >= 1, got -1"),
    (dict(limit=0), ValueError, r"limit must be >= 1, got 0"),
    (dict(limit=2.5), TypeError, r"limit must be a whole number"),
    (dict(embedding_dim=0), ValueError, r"embedding_dim must be >= 1"),
    (dict(language=5), TypeError, r"language must be a language code"),
])
def test_wit_numbers(tmp_path, kwargs, exc, match):
    path = tmp_path / "w.json.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n")
    with pytest.raises(exc, match=match):
        wit.read_wit_records(path, **kwargs)


def test_wit_dataset_rejects_foreign_records():
    with pytest.raises(TypeError, match=r"item 0 is a dict"):
        wit.WitDataset([{"caption": "x"}])


def write_png16(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint16)).save(path)


def nyu_csv_root(tmp_path, n=2, size=(6, 8)):
    root = tmp_path / "nyu"
    lines = []
    for i in range(n):
        folder = root / "data" / "nyu2_train" / "kitchen_0001"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size[1], size[0]), (i * 40, 20, 30)).save(folder / f"{i}.jpg")
        write_png16(folder / f"{i}.png", np.full(size, 1000 + i, np.uint16))
        lines.append(f"data/nyu2_train/kitchen_0001/{i}.jpg,data/nyu2_train/kitchen_0001/{i}.png")
    (root / "data" / "nyu2_train.csv").write_text("\n".join(lines) + "\n")
    return root


def test_nyu_csv_layout_reads_pairs_exactly(tmp_path):
    root = nyu_csv_root(tmp_path)
    ds = rgbd.RGBDDataset(root, "train")
    assert ds.layout == "nyu2_csv" and len(ds) == 2 and ds.stems == ["kitchen_0001/0", "kitchen_0001/1"]
    rgb, depth, stem = ds[1]
    assert rgb.shape == (3, 6, 8) and depth.shape == (1, 6, 8) and stem == "kitchen_0001/1"
    assert torch.equal(depth, torch.full((1, 6, 8), 1.001))
    # the CSVs may also be passed from inside data/
    assert len(rgbd.RGBDDataset(root / "data", "train")) == 2


def test_nyu_csv_layout_checks(tmp_path):
    root = nyu_csv_root(tmp_path)
    folder = root / "data" / "nyu2_train" / "kitchen_0001"
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*test.txt \(split files present: \['data/nyu2_train.csv'\]\); nor nyu2_test.csv"):
        rgbd.RGBDDataset(root, "test")
    csv = root / "data" / "nyu2_train.csv"
    good = csv.read_text()
    csv.write_text(good + "data/nyu2_train/kitchen_0001/9.jpg,data/nyu2_train/kitchen_0001/9.png\n")
    with pytest.raises(FileNotFoundError, match=r"nyu2_train.csv, line 3: missing file 'data/nyu2_train/kitchen_0001/9.jpg'"):
        rgbd.RGBDDataset(root, "train")
    csv.write_text(good + "only-one-field\n")
    with pytest.raises(ValueError, match=r"line 3: expected 'rgb path,depth path'"):
        rgbd.RGBDDataset(root, "train")
    csv.write_text("")
    with pytest.raises(ValueError, match=r"lists no image pairs"):
        rgbd.RGBDDataset(root, "train")
    csv.write_text(good)
    write_png16(folder / "1.png", np.zeros((5, 8)))  # size mismatch
    with pytest.raises(ValueError, match=r"size mismatch for stem 'kitchen_0001/1'"):
        rgbd.RGBDDataset(root, "train")[1]
    Image.new("L", (8, 6)).save(folder / "1.png")  # 8-bit depth
    with pytest.raises(ValueError, match=r"depth PNG must be single-channel 16-bit"):
        rgbd.RGBDDataset(root, "train")[1]
    write_png16(folder / "1.png", np.ones((6, 8)))
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(ValueError, match=r"1.png: depth PNG cannot be decoded .* truncated or damaged"):
        rgbd.RGBDDataset(root, "train")[1]
    (folder / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"0.jpg: RGB image cannot be decoded"):
        rgbd.RGBDDataset(root, "train")[0]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(depth_scale=NAN), ValueError, r"depth_scale must be finite"),
    (dict(depth_scale=0), ValueError, r"depth_scale must be > 0"),
    (dict(split=3), TypeError, r"split must be a split name"),
    (dict(transform="flip"), TypeError, r"transform must be callable"),
])
def test_rgbd_arguments(tmp_path, kwargs, exc, match):
    root = nyu_csv_root(tmp_path)
    with pytest.raises(exc, match=match):
        rgbd.RGBDDataset(root, **{"split": "train", **kwargs})


def test_disparity_to_depth_nan_focal():
    with pytest.raises(ValueError, match=r"focal must be finite"):
        rgbd.disparity_to_depth(np.ones((2, 2)), focal=NAN, baseline=0.1)


def test_tokenizer_truncated_file(tmp_path):
    path = tmp_path / "tok.json"
    CharTokenizer("abc").save(path)
    path.write_text(path.read_text()[:20], encoding="utf-8")
    with pytest.raises(ValueError, match=r"tok.json is not a CharTokenizer JSON file \(not valid JSON"):
        CharTokenizer.load(path)
    path.write_text(json.dumps({"format": "mmalign.CharTokenizer/1"}))
    with pytest.raises(ValueError, match=r"needs a 'chars' list and an 'add_cls' flag"):
        CharTokenizer.load(path)


# ------------------------------------------------------------------------ numerics at the edges: exact safe results
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0])
def test_hypersphere_identical_pairs_have_finite_gradient(dtype, alpha):
    x = emb(5, 4, dtype=dtype).requires_grad_()
    y = x.detach().clone().requires_grad_()
    loss = hypersphere_loss(x, y, alpha=alpha, lambda_uniform=0.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_hypersphere_alignment_value_unchanged_off_zero():
    x, y = emb(5, 4, seed=1, dtype=torch.float64), emb(5, 4, seed=2, dtype=torch.float64)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    for alpha in (0.5, 2.0, 3.0):
        want = (xn - yn).norm(dim=1).pow(alpha).mean()
        got = hypersphere_loss(x, y, alpha=alpha, lambda_uniform=0.0)
        torch.testing.assert_close(got, want)


def test_contrastive_loss_accepts_bf16_cosines_that_round_above_one():
    a = F.normalize(emb(6, 16, seed=5), dim=-1)
    sim = (a @ a.T).to(torch.bfloat16)
    sim.diagonal().fill_(1.0078125)  # what bf16 autocast gives for cos = 1
    got = contrastive_loss(sim)
    clipped = sim.float().clamp(max=1.0)
    want = contrastive_loss(clipped)
    assert torch.isfinite(got) and torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match=r"cosine similarities in \[-1, 1\]"):
        contrastive_loss(torch.full((2, 2), 1.05))  # float32 has no such excuse


def test_masked_mean_of_empty_sequences_is_exactly_zero():
    assert torch.equal(masked_mean(torch.zeros(2, 0, 3)), torch.zeros(2, 3))
    assert torch.equal(masked_mean(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool)), torch.zeros(2, 3))
    x = torch.full((2, 4, 3), float("nan"))
    assert torch.equal(masked_mean(x, torch.zeros(2, 4, dtype=torch.bool)), torch.zeros(2, 3))


def test_attention_pool_with_cls_takes_an_empty_sequence():
    pool = AttentionPool(8, 2, use_cls=True).eval()
    out = pool(torch.zeros(2, 0, 8))
    assert out.shape == (2, 8) and torch.isfinite(out).all()


def test_info_nce_under_bf16_autocast_stays_float32_and_finite():
    a, b = emb(8, 16, seed=1).requires_grad_(), emb(8, 16, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(a @ torch.eye(16), b, temperature=0.01)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_disabled_checks_let_nan_through_but_never_break_structure():
    with checks.disabled():
        assert torch.isnan(info_nce(with_value(A, NAN), Bm))
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            recall_at_k(Q, G, QI, QI, chunk_size=-1)


def test_fit_seed_also_seeds_numpy_and_random():
    def draws():
        seen = []

        def loss_fn(m, b):
            seen.append((float(np.random.rand()), random.random()))
            return m(b[0]).pow(2).mean()
        tiny_fit(loss_fn=loss_fn, seed=3)
        return seen

    np.random.seed(123), random.seed(456)
    first = draws()
    np.random.seed(999), random.seed(1)
    assert draws() == first and len(first) == 2


def test_fit_grad_clip_is_applied_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    before = model.weight.detach().clone()
    x = torch.full((4, 3), 100.0)
    fit(model, lambda m, b: m(b[0]).sum(), (x,), optimizer=torch.optim.SGD(model.parameters(), lr=1.0), epochs=1,
        batch_size=4, progress=False, device="cpu", grad_clip=0.5)
    assert torch.allclose((model.weight - before).norm(), torch.tensor(0.5))


# ------------------------------------------------------------------------ resume that cannot half-work
class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def ckpt_run(path, stateful=None, model=None, max_steps=1):
    torch.manual_seed(0)
    model = model or torch.nn.Linear(3, 1)
    return fit(model, lambda m, b: m(b[0]).pow(2).mean(), (torch.randn(16, 3),),
               optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, batch_size=4, progress=False,
               device="cpu", checkpoint_path=path, max_steps=max_steps, stateful=stateful)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.95])
def test_truncated_checkpoint_names_the_path_and_the_fix(tmp_path, keep):
    path = tmp_path / "run.pt"
    ckpt_run(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"checkpoint {path} cannot be read .*truncated .*delete it to start over"):
        ckpt_run(path, max_steps=3)


def test_checkpoint_that_is_not_from_fit(tmp_path):
    path = tmp_path / "run.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match=r"is not a checkpoint of mmalign.train.fit \(missing \['optimizer'"):
        ckpt_run(path)


def test_checkpoint_lacking_a_stateful_object_the_run_now_has(tmp_path):
    path = tmp_path / "run.pt"
    ckpt_run(path)  # saved without stateful objects
    with pytest.raises(ValueError, match=r"holds stateful objects \[\] but this run has \['counter'\] \(missing from "
                                         r"the checkpoint: \['counter'\]\); resume with the same stateful objects"):
        ckpt_run(path, stateful={"counter": Counter()}, max_steps=3)
    path2 = tmp_path / "run2.pt"
    ckpt_run(path2, stateful={"counter": Counter()})
    with pytest.raises(ValueError, match=r"\(not in this run: \['counter'\]\)"):
        ckpt_run(path2, max_steps=3)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "run.pt"
    ckpt_run(path)
    with pytest.raises(ValueError, match=rf"checkpoint {path} was written by a run with other settings.*model: "
                                         r"'Linear: weight \(1, 3\).*' in the checkpoint, 'Linear: weight \(1, 5\)"):
        ckpt_run(path, model=torch.nn.Linear(5, 1), max_steps=3)


def test_checkpoint_with_a_corrupt_stateful_state(tmp_path):
    path = tmp_path / "run.pt"
    queue = MoCoQueue(4, 3)
    model = torch.nn.Linear(3, 1)
    fit(model, lambda m, b: m(b[0]).pow(2).mean(), (torch.randn(8, 3),), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        epochs=2, batch_size=4, progress=False, device="cpu", checkpoint_path=path, max_steps=1, stateful={"queue": queue})
    ckpt = torch.load(path, weights_only=False)
    ckpt["stateful"]["queue"]["ptr"] = 17
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"stateful\['queue'\] cannot be restored: .*ptr'\] must be <= 3, got 17"):
        fit(model, lambda m, b: m(b[0]).pow(2).mean(), (torch.randn(8, 3),),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, batch_size=4, progress=False,
            device="cpu", checkpoint_path=path, stateful={"queue": MoCoQueue(4, 3)})


def test_scheduled_margin_after_very_many_steps():
    capped = ScheduledMargin(start=0.1, factor=2.0, every=1, max_margin=0.75)
    capped.num_steps = 5000  # 2^5000 overflows a float
    assert capped.value == 0.75
    uncapped = ScheduledMargin(start=0.1, factor=2.0, every=1, max_margin=None)
    uncapped.num_steps = 3
    assert uncapped.value == pytest.approx(0.8)
    uncapped.num_steps = 5000
    with pytest.raises(ValueError, match=r"scheduled margin overflowed after 5000 steps .*set max_margin"):
        uncapped.value
    zero = ScheduledMargin(start=0.0, factor=2.0, every=1, max_margin=None)
    zero.num_steps = 5000
    assert zero.value == 0.0


def test_contrastive_loss_on_a_real_bf16_autocast_similarity():
    x = emb(32, 64, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # embeddings of a bf16 model, normalised in bf16
        a = F.normalize(x.bfloat16(), dim=-1)
        sim = a @ a.T
    assert sim.dtype == torch.bfloat16 and float(sim.max()) > 1.0  # rounding puts cosines above 1
    loss = contrastive_loss(sim)
    assert torch.isfinite(loss) and loss.dtype == torch.float32

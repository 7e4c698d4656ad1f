r"""CODIS on frozen features: student towers, momentum teachers, queues, a fusion layer and the codebook.

CODIS (Duan et al., 2022) trains ALBEF (Li et al., 2021) with two additions: intra-modal alignment
(i2i, t2t beside the cross-modal i2t, t2i) and a multimodal codebook whose targets are optimal-transport
plans of the teacher's features. Its objective, as the seed writes it:

.. math::
    \mathcal{L}_{final} = \mathcal{L}_{mlm} + \mathcal{L}_{itm} + \mathcal{L}_{ica} + \mathcal{L}_{code},
    \qquad
    \mathcal{L}_{code} = \mathcal{L}_{ot}(Z^m_v, C) + \mathcal{L}_{ot}(Z^m_t, C)
        + \mathcal{L}_{t2p}(Z_t, C, T_{i2p}) + \mathcal{L}_{i2p}(Z_v, C, T_{t2p}),

where :math:`\mathcal{L}_{ica}` is the queued contrastive loss with momentum distillation over i2t, t2i
(cross) and i2i, t2t (intra), and :math:`T_{i2p}` is the OT plan of the image features to the codebook:
the text predicts the codes of its image and the image those of its text (Eq. 2 of the seed; its
:math:`\mathcal{L}_{code}` line swaps the subscripts, Eq. 2 is what we follow).

To run on a CPU the towers are small transformer layers over *frozen* inputs: EfficientNet-Lite0's
3 x 3 patch grid (N, 9, 1280) and MiniLM's token states (N, L, 384)
(:func:`mmalign.data.features.sequence_features`). MLM masks *before* the frozen text encoder, as BERT
and ALBEF do (``mlm_input="encoder"``): :func:`bert_mask` picks 15 % of the wordpieces (80 % become
[MASK], 10 % a random wordpiece, 10 % stay) and the masked captions are encoded by MiniLM
(:func:`mmalign.experiments.codis.masked_captions`, cached), so no state of the caption has seen the
hidden word. ``mlm_input="after"`` keeps the earlier shortcut for comparison: the unmasked caption's
token states with a learned [MASK] vector put in after encoding, where the neighbours' states still
carry the word. The MLM loss is distilled from the momentum teacher's MLM head
(:func:`mmalign.losses.codis.mlm_distill_loss`) and alpha ramps from 0 over ``alpha_ramp_steps``.

Every term is switched by :class:`CodisConfig`, so the ablation is configuration, not copies of code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..checks import (check_all_finite, check_choice, check_ids, check_int, check_mask, check_positive,
                      check_probability, check_tensor)
from ..losses.codis import (_check_generator, alpha_schedule, codebook_targets, distill_contrastive_loss,
                            mlm_distill_loss, ot_cost_loss, prototype_loss, sample_hard_negatives)
from ..memory import MoCoQueue, MomentumEncoder

__all__ = ["CodisConfig", "SequenceTower", "Towers", "FusionHead", "Codis", "bert_mask"]


@dataclass(frozen=True)
class CodisConfig:
    """Sizes and switches of :class:`Codis`.

    ``cross``/``intra``: the i2t+t2i and i2i+t2t contrastive terms; ``itm``, ``mlm``: ALBEF's fusion
    terms; ``codebook``: L_code, with plans from the ``teacher`` or ``student`` features
    (``code_source``), weighted by ``code_weight``; ``alpha``: weight of the momentum-distillation soft
    targets (0 = hard labels), reached after ``alpha_ramp_steps`` optimisation steps (ALBEF: one epoch;
    0 = from the first step); ``mlm_input``: ``"encoder"`` (the masked caption went through the frozen
    encoder) or ``"after"`` (the [MASK] vector is put in after it: the shortcut); ``mlm_distill``: soft
    MLM targets from the teacher's MLM head.
    """

    image_dim: int = 1280
    text_dim: int = 384
    width: int = 128
    layers: int = 1
    heads: int = 4
    embed_dim: int = 128
    max_patches: int = 9
    max_tokens: int = 64
    queue_size: int = 1024
    momentum: float = 0.995
    temperature: float = 0.07
    alpha: float = 0.4
    cross: bool = True
    intra: bool = False
    itm: bool = True
    mlm: bool = True
    vocab_size: int = 0  # MLM classes (needed when mlm)
    mask_prob: float = 0.15
    mlm_input: str = "encoder"
    mlm_distill: bool = True
    alpha_ramp_steps: int = 0
    codebook: bool = False
    code_weight: float = 1.0
    n_codewords: int = 64
    gamma: float = 0.1
    code_source: str = "teacher"
    ot_solver: str = "ipot"
    ot_epsilon: float = 0.1
    ot_iters: int = 20
    dropout: float = 0.0

    def replace(self, **changes) -> "CodisConfig":
        return dataclasses.replace(self, **changes)

    def __post_init__(self):
        for name in ("image_dim", "text_dim", "width", "layers", "heads", "embed_dim", "max_patches",
                     "max_tokens", "queue_size", "n_codewords", "ot_iters"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("vocab_size", self.vocab_size, minimum=0)
        check_int("alpha_ramp_steps", self.alpha_ramp_steps, minimum=0)
        check_choice("mlm_input", self.mlm_input, ("encoder", "after"))
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        for name in ("temperature", "gamma", "ot_epsilon", "code_weight"):
            check_positive(name, getattr(self, name))
        for name in ("momentum", "alpha", "mask_prob", "dropout"):
            check_probability(name, getattr(self, name))
        check_choice("code_source", self.code_source, ("teacher", "student"))
        check_choice("ot_solver", self.ot_solver, ("ipot", "sinkhorn"))
        if self.mlm and self.vocab_size < 2:
            raise ValueError("mlm=True needs vocab_size >= 2 (the number of MLM classes); or set mlm=False")
        if not (self.cross or self.intra or self.codebook):
            raise ValueError("nothing aligns the two towers: enable cross, intra or codebook")


def bert_mask(input_ids: torch.Tensor, candidates: torch.Tensor, *, mask_token_id: int, vocab_size: int,
              mask_prob: float = 0.15, generator: torch.Generator | None = None):
    """BERT's masking (Devlin et al., 2019; ALBEF's ``mask``): each candidate position is selected with
    probability ``mask_prob``; a selected position becomes ``mask_token_id`` with probability 0.8, a
    random token in ``[0, vocab_size)`` with 0.1, and stays itself with 0.1. The labels are the original
    ids at the selected positions and -100 elsewhere.

    Args:
        input_ids: (N, L) integer token ids. candidates: (N, L) bool, True where a token may be
            masked (not [CLS], [SEP] or padding).
        mask_token_id: the [MASK] id. vocab_size: the tokenizer's size (random replacements).
        mask_prob: the selection probability (0.15). generator: a torch.Generator (CPU) for the draws.

    Returns:
        ``(masked_ids (N, L), labels (N, L) with -100 where not selected, selected (N, L) bool)``.
    """
    check_tensor("input_ids", input_ids, ndim=2, floating=False)
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    candidates = check_mask("candidates", candidates, tuple(input_ids.shape), device=input_ids.device)
    check_int("mask_token_id", mask_token_id, minimum=0)
    check_int("vocab_size", vocab_size, minimum=1)
    check_probability("mask_prob", mask_prob)
    _check_generator(generator)
    shape = input_ids.shape
    u = torch.rand((3,) + tuple(shape), generator=generator).to(input_ids.device)
    selected = candidates & (u[0] < mask_prob)
    to_mask = selected & (u[1] < 0.8)
    to_random = selected & ~to_mask & (u[2] < 0.5)
    random_ids = torch.randint(vocab_size, tuple(shape), generator=generator).to(input_ids.device)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    labels = input_ids.long().masked_fill(~selected, -100)
    return masked, labels, selected


class SequenceTower(nn.Module):
    """A [CLS] token, learned positions and ``layers`` pre-norm transformer layers over projected frozen
    inputs; returns the states (B, 1 + L, width) and the projected, normalised [CLS] (B, embed_dim)."""

    def __init__(self, in_dim: int, cfg: CodisConfig, max_len: int):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, cfg.width))
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, max_len + 1, cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 2 * cfg.width, cfg.dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.embed_dim)
        self.max_len = max_len

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, masked: torch.Tensor | None = None):
        if x.shape[1] > self.max_len:
            raise ValueError(f"sequence of length {x.shape[1]} is longer than max_len={self.max_len}")
        h = self.inp(x.float())
        if masked is not None:  # MLM: replace the masked positions by a learned [MASK] vector
            h = torch.where(masked[..., None], self.mask_token.to(h.dtype).expand_as(h), h)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], 1) + self.pos[:, : h.shape[1] + 1]
        pad = None
        if mask is not None:
            pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], 1)  # True = ignore
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        return h, F.normalize(self.head(h[:, 0]), dim=-1)

    def token_embeddings(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each position's state through the projection head, normalised (B, L, embed_dim): what a
        patch or a token, rather than the [CLS], says in the shared space (for the codeword figure)."""
        h, _ = self.forward(x, mask)
        return F.normalize(self.head(h[:, 1:]), dim=-1)


class Towers(nn.Module):
    """The image and text student towers (the part the momentum teacher copies)."""

    def __init__(self, cfg: CodisConfig):
        super().__init__()
        self.image = SequenceTower(cfg.image_dim, cfg, cfg.max_patches)
        self.text = SequenceTower(cfg.text_dim, cfg, cfg.max_tokens)

    def forward(self, patches, tokens, token_mask):
        hv, zv = self.image(patches)
        ht, zt = self.text(tokens, token_mask)
        return hv, zv, ht, zt


class FusionHead(nn.Module):
    """ALBEF's multimodal encoder, reduced to one block: text states cross-attend to image states,
    then an MLP; heads for ITM (2 classes, from the [CLS]) and MLM (``vocab_size`` classes, per token)."""

    def __init__(self, cfg: CodisConfig):
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_ff = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(cfg.width, 2 * cfg.width), nn.GELU(), nn.Linear(2 * cfg.width, cfg.width))
        self.itm = nn.Linear(cfg.width, 2)
        self.mlm = nn.Linear(cfg.width, max(cfg.vocab_size, 2))

    def forward(self, text_states: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(image_states)
        h = text_states + self.attn(self.ln_q(text_states), kv, kv, need_weights=False)[0]
        return h + self.ff(self.ln_ff(h))


class Codis(nn.Module):
    """The student towers, their momentum teacher, the fusion head, the codebook and the two queues.

    ``losses(batch)`` returns the dictionary of switched-on terms; ``after_step()`` updates the teacher
    (EMA), enqueues its features and counts the step (the buffer ``steps``, which drives the alpha ramp
    and is checkpointed with the model). ``stateful()`` gives the queues for checkpoints.
    """

    def __init__(self, cfg: CodisConfig):
        super().__init__()
        self.cfg = cfg
        self.towers = Towers(cfg)
        self.teacher = MomentumEncoder(self.towers, cfg.momentum)
        self.fusion = FusionHead(cfg)
        # ALBEF's momentum model holds the fusion encoder and MLM head too: the soft MLM targets
        self.teacher_fusion = MomentumEncoder(self.fusion, cfg.momentum) if cfg.mlm and cfg.mlm_distill else None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimisation steps done (alpha ramp)
        self.codebook = nn.Parameter(F.normalize(torch.randn(cfg.n_codewords, cfg.embed_dim), dim=-1))
        self.queue_image = MoCoQueue(cfg.queue_size, cfg.embed_dim)
        self.queue_text = MoCoQueue(cfg.queue_size, cfg.embed_dim)
        self._pending = None

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def stateful(self) -> dict:
        return {"queue_image": self.queue_image, "queue_text": self.queue_text}

    def _apply(self, fn, *args, **kwargs):  # keep the queues on the model's device
        out = super()._apply(fn, *args, **kwargs)
        dev = self.codebook.device
        self.queue_image.to(dev)
        self.queue_text.to(dev)
        return out

    def _check_patches(self, patches, finite: bool = True) -> None:
        cfg = self.cfg
        check_tensor("patches", patches, ndim=3, finite=finite)
        if patches.shape[2] != cfg.image_dim:
            raise ValueError(f"patches must be (B, P, image_dim={cfg.image_dim}), got width {patches.shape[2]} "
                             f"(shape {tuple(patches.shape)}); the model was built for {cfg.image_dim}-d patch features "
                             "(CodisConfig.image_dim)")
        if not 1 <= patches.shape[1] <= cfg.max_patches:
            raise ValueError(f"patches has {patches.shape[1]} patches per image (shape {tuple(patches.shape)}); the model "
                             f"takes 1..{cfg.max_patches} (CodisConfig.max_patches)")

    def _check_tokens(self, tokens, token_mask, finite: bool = True) -> torch.Tensor:
        cfg = self.cfg
        check_tensor("tokens", tokens, ndim=3, finite=finite)
        if tokens.shape[2] != cfg.text_dim:
            raise ValueError(f"tokens must be (B, L, text_dim={cfg.text_dim}), got width {tokens.shape[2]} "
                             f"(shape {tuple(tokens.shape)}); the model was built for {cfg.text_dim}-d token states "
                             "(CodisConfig.text_dim)")
        if not 1 <= tokens.shape[1] <= cfg.max_tokens:
            raise ValueError(f"tokens has {tokens.shape[1]} positions per caption (shape {tuple(tokens.shape)}); the model "
                             f"takes 1..{cfg.max_tokens} (CodisConfig.max_tokens)")
        if token_mask is None:
            raise ValueError("token_mask is None: pass the (B, L) boolean mask of the caption tokens (True = a token, "
                             "False = padding)")
        if isinstance(token_mask, torch.Tensor) and token_mask.dtype.is_floating_point:
            raise ValueError(f"token_mask must be boolean (True = a token, False = padding), got {token_mask.dtype}; "
                             "use token_mask.bool()")
        return check_mask("token_mask", token_mask, tuple(tokens.shape[:2]), device=tokens.device)

    def _check_device(self, name: str, x: torch.Tensor) -> None:
        dev = self.codebook.device
        if x.device != dev:
            raise ValueError(f"{name} is on {x.device} but the model is on {dev}; move the batch with .to({str(dev)!r})")

    @torch.no_grad()
    def encode_images(self, patches: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Student image embeddings (N, embed_dim) of patch grids (N, P, image_dim)."""
        self._check_patches(patches)
        check_int("batch_size", batch_size, minimum=1)
        return torch.cat([self.towers.image(patches[i:i + batch_size].to(self.codebook.device))[1]
                          for i in range(0, len(patches), batch_size)])

    @torch.no_grad()
    def encode_texts(self, tokens: torch.Tensor, token_mask: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Student caption embeddings (N, embed_dim) of token states (N, L, text_dim) with their mask."""
        token_mask = self._check_tokens(tokens, token_mask)
        check_int("batch_size", batch_size, minimum=1)
        dev = self.codebook.device
        return torch.cat([self.towers.text(tokens[i:i + batch_size].to(dev), token_mask[i:i + batch_size].to(dev))[1]
                          for i in range(0, len(tokens), batch_size)])

    def _itm(self, hv, ht, zv, zt, ids, generator):
        sim = zv.detach() @ zt.detach().T / self.cfg.temperature  # (B_img, B_txt)
        neg_t = sample_hard_negatives(sim, ids=ids, generator=generator)
        neg_v = sample_hard_negatives(sim.T, ids=ids, generator=generator)
        rows_v = torch.arange(len(ids), device=ids.device)
        ok_t, ok_v = neg_t >= 0, neg_v >= 0
        img_idx = torch.cat([rows_v, rows_v[ok_t], neg_v[ok_v]])
        txt_idx = torch.cat([rows_v, neg_t[ok_t], rows_v[ok_v]])
        labels = torch.cat([torch.ones(len(ids), dtype=torch.long, device=ids.device),
                            torch.zeros(int(ok_t.sum() + ok_v.sum()), dtype=torch.long, device=ids.device)])
        fused = self.fusion(ht[txt_idx], hv[img_idx])
        logits = self.fusion.itm(fused[:, 0]).float()
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()

    def alpha(self) -> float:
        """The distillation weight of the next step: ``cfg.alpha`` ramped over ``cfg.alpha_ramp_steps``."""
        return alpha_schedule(int(self.steps), alpha=self.cfg.alpha, ramp_steps=self.cfg.alpha_ramp_steps)

    def mlm_logits(self, image_states: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                   masked: torch.Tensor | None = None, teacher: bool = False) -> torch.Tensor:
        """MLM logits (B, L, vocab) of every caption position, conditioned on the image states (B, 1 + P, width).

        ``tokens`` are the masked captions' frozen states (``mlm_input="encoder"``), or the unmasked ones
        with ``masked`` (B, L) marking where the learned [MASK] vector replaces them (``"after"``).
        ``teacher=True`` runs the momentum copies (no graph)."""
        towers = self.teacher.module if teacher else self.towers
        fusion = self.teacher_fusion.module if teacher else self.fusion
        with torch.set_grad_enabled(torch.is_grad_enabled() and not teacher):
            ht, _ = towers.text(tokens, token_mask, masked=masked)
            return fusion.mlm(fusion(ht, image_states)[:, 1:]).float()

    def _mlm(self, hv, hv_m, tokens, token_mask, mlm_labels, mlm_tokens, generator, alpha):
        cfg = self.cfg
        if cfg.mlm_input == "after":  # the shortcut: draw the masks here, insert [MASK] after encoding
            cand = mlm_labels >= 0
            u = torch.rand(cand.shape, generator=generator, device=generator.device if generator else cand.device)
            masked = cand & (u.to(cand.device) < cfg.mask_prob)
            labels, inputs = mlm_labels.masked_fill(~masked, -100), tokens
        else:
            masked, labels, inputs = None, mlm_labels, mlm_tokens
        sel = labels >= 0
        if not bool(sel.any()):
            return hv.sum() * 0.0, None
        logits = self.mlm_logits(hv, inputs, token_mask, masked)[sel]
        teacher_logits = None
        if self.teacher_fusion is not None and alpha > 0:
            with torch.no_grad():
                teacher_logits = self.mlm_logits(hv_m, inputs, token_mask, masked, teacher=True)[sel]
        loss = mlm_distill_loss(logits, labels[sel], alpha=alpha if teacher_logits is not None else 0.0,
                                teacher_logits=teacher_logits)
        return loss, (logits.detach().argmax(1) == labels[sel]).float().mean()

    def _check_batch(self, patches, tokens, token_mask, ids, mlm_labels, generator, mlm_tokens=None):
        """The inputs of :meth:`losses`, checked; returns (bool mask, LongTensor ids, LongTensor labels or None)."""
        self._check_patches(patches, finite=False)
        token_mask = self._check_tokens(tokens, token_mask, finite=False)
        b = patches.shape[0]
        if tokens.shape[0] != b:
            raise ValueError(f"patches and tokens must hold one row per pair, got {b} images and {tokens.shape[0]} "
                             "captions; pass the image of each caption (repeat it for several captions)")
        self._check_device("patches", patches)
        self._check_device("tokens", tokens)
        ids = check_ids("ids", ids, b, device=patches.device)
        if mlm_labels is not None:
            check_tensor("mlm_labels", mlm_labels, ndim=2, floating=False, finite=False)
            if mlm_labels.dtype.is_floating_point or mlm_labels.dtype.is_complex or mlm_labels.dtype == torch.bool:
                raise ValueError(f"mlm_labels must hold integer class indices (-100 where not predicted), got "
                                 f"{mlm_labels.dtype}; use mlm_labels.long()")
            if tuple(mlm_labels.shape) != tuple(tokens.shape[:2]):
                raise ValueError(f"mlm_labels must be (B, L) = {tuple(tokens.shape[:2])} like the tokens, got "
                                 f"{tuple(mlm_labels.shape)}")
            self._check_device("mlm_labels", mlm_labels)
            if self.cfg.mlm and checks.enabled():  # a value scan: off with the finiteness scans
                top = int(mlm_labels.max())
                if top >= self.cfg.vocab_size:
                    raise ValueError(f"mlm_labels go up to {top} but the model predicts vocab_size={self.cfg.vocab_size} "
                                     f"classes (0..{self.cfg.vocab_size - 1}); build it with CodisConfig(vocab_size="
                                     f"{top + 1}) or mark tokens outside the vocabulary with -100")
            mlm_labels = mlm_labels.long()
            if self.cfg.mlm and self.cfg.mlm_input == "encoder":
                if mlm_tokens is None:
                    raise ValueError("mlm_input='encoder' needs mlm_tokens, the frozen states of the masked captions "
                                     "(mmalign.experiments.codis.masked_captions), with mlm_labels at their masked "
                                     "positions; or build the model with mlm_input='after'")
                check_tensor("mlm_tokens", mlm_tokens, ndim=3, finite=False)
                if tuple(mlm_tokens.shape) != tuple(tokens.shape):
                    raise ValueError(f"mlm_tokens (the masked captions' states) must have the shape of tokens "
                                     f"{tuple(tokens.shape)}, got {tuple(mlm_tokens.shape)}")
                self._check_device("mlm_tokens", mlm_tokens)
        _check_generator(generator)
        check_all_finite(("patches", patches), ("tokens", tokens),
                         ("mlm_tokens", mlm_tokens if mlm_labels is not None else None))
        return token_mask, ids, mlm_labels

    def losses(self, patches: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor, ids: torch.Tensor,
               mlm_labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               mlm_tokens: torch.Tensor | None = None) -> dict:
        """The switched-on terms for one batch of B pairs (image patches (B, P, D_v), caption tokens
        (B, L, D_t) with mask (B, L), item ids (B,), MLM labels (B, L) with -100 where not predicted).

        MLM with ``mlm_input="encoder"``: ``mlm_tokens`` (B, L, D_t) are the frozen states of the masked
        captions (same mask) and ``mlm_labels`` the words at their masked positions (:func:`bert_mask`);
        with ``"after"``, ``mlm_labels`` holds every maskable word and the masks are drawn here.
        Distillation weights (ITC and MLM) follow :meth:`alpha` (the ramp).

        Every input is checked first (the policy of :mod:`mmalign.checks`): widths ``image_dim`` /
        ``text_dim``, at most ``max_patches`` / ``max_tokens`` positions, one row per pair in each, a
        boolean (or 0/1 integer) mask of the tokens' shape, integer ids, integer MLM labels below
        ``vocab_size`` (-100, or any negative value, where not predicted), tensors on the model's device,
        patches and tokens finite (the scan that ``mmalign.checks.disabled()`` switches off).

        Returns ``{term: scalar}`` with keys among ``itc`` (i2t + t2i)/2, ``intra`` (i2i + t2t)/2,
        ``itm``, ``mlm``, ``code`` (``code_weight`` x (L_ot + L_t2p + L_i2p)) and ``total`` (their sum);
        ``itm_acc`` and ``mlm_acc`` (accuracies, not in the total) too.
        """
        cfg = self.cfg
        token_mask, ids, mlm_labels = self._check_batch(patches, tokens, token_mask, ids, mlm_labels, generator,
                                                        mlm_tokens)
        b = len(ids)
        if b > cfg.queue_size:
            raise ValueError(
                f"the queues hold {cfg.queue_size} features but a batch has {b} pairs; a queue smaller than "
                f"the batch drops keys before they are used: set queue_size >= batch_size"
            )
        hv, zv, ht, zt = self.towers(patches, tokens, token_mask)
        with torch.no_grad():
            hv_m, kv, _, kt = self.teacher(patches, tokens, token_mask)
        qv, qv_ids, qt, qt_ids = self.queue_image.keys, self.queue_image.ids, self.queue_text.keys, self.queue_text.ids
        out = {}
        alpha = self.alpha()
        settings = {"temperature": cfg.temperature, "alpha": alpha}
        if cfg.cross:
            out["itc"] = 0.5 * (distill_contrastive_loss(zv, kt, ids=(ids, qt_ids), queue=qt, q_teacher=kv, **settings)
                                + distill_contrastive_loss(zt, kv, ids=(ids, qv_ids), queue=qv, q_teacher=kt, **settings))
        if cfg.intra:
            out["intra"] = 0.5 * (distill_contrastive_loss(zv, kv, ids=(ids, qv_ids), queue=qv, q_teacher=kv, **settings)
                                  + distill_contrastive_loss(zt, kt, ids=(ids, qt_ids), queue=qt, q_teacher=kt, **settings))
        if cfg.itm:
            out["itm"], out["itm_acc"] = self._itm(hv, ht, zv, zt, ids, generator)
        if cfg.mlm and mlm_labels is not None:
            out["mlm"], mlm_acc = self._mlm(hv, hv_m, tokens, token_mask, mlm_labels, mlm_tokens, generator, alpha)
            if mlm_acc is not None:
                out["mlm_acc"] = mlm_acc
        if cfg.codebook:
            fv, ft = (kv, kt) if cfg.code_source == "teacher" else (zv.detach(), zt.detach())
            t_v = codebook_targets(fv, self.codebook, solver=cfg.ot_solver, epsilon=cfg.ot_epsilon,
                                   n_iters=cfg.ot_iters)  # T_i2p (rows sum 1)
            t_t = codebook_targets(ft, self.codebook, solver=cfg.ot_solver, epsilon=cfg.ot_epsilon,
                                   n_iters=cfg.ot_iters)  # T_t2p
            l_ot = ot_cost_loss(fv, self.codebook, t_v / b) + ot_cost_loss(ft, self.codebook, t_t / b)
            out["code"] = cfg.code_weight * (l_ot + prototype_loss(zt, self.codebook, t_v, gamma=cfg.gamma)
                                             + prototype_loss(zv, self.codebook, t_t, gamma=cfg.gamma))
        out["total"] = sum(v for k, v in out.items() if not k.endswith("_acc"))
        self._pending = (kv.detach(), kt.detach(), ids.detach())
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA update of the teacher, then enqueue the teacher features of the last :meth:`losses` call."""
        self.teacher.update(self.towers)
        if self.teacher_fusion is not None:
            self.teacher_fusion.update(self.fusion)
        self.steps += 1
        if self._pending is not None:
            kv, kt, ids = self._pending
            self.queue_image.enqueue(kv, ids)
            self.queue_text.enqueue(kt, ids)
            self._pending = None

    @torch.no_grad()
    def codeword_assignments(self, emb: torch.Tensor) -> torch.Tensor:
        """The codeword each embedding (..., embed_dim) is closest to (cosine), (...) LongTensor."""
        check_tensor("emb", emb, ndim=None)
        if emb.dim() == 0 or emb.shape[-1] != self.cfg.embed_dim:
            raise ValueError(f"emb must be (..., embed_dim={self.cfg.embed_dim}), got shape {tuple(emb.shape)}")
        return (F.normalize(emb, dim=-1) @ F.normalize(self.codebook, dim=-1).T).argmax(-1)

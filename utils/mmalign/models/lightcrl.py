r"""LightCRL's Deep Fusion Encoder (DFE) as the seed's authors built it (course seed 003, "Lightweight
Cross-Modal Representation Learning", and its public code, whose figure "DFE framework on modality 1"
this module follows).

The pretrained encoders stay frozen; the DFE trains. For modality :math:`m` with frozen token (or patch)
states :math:`X \in \mathbb{R}^{L \times D_m}` and a mask :math:`M` (True at real tokens):

.. math::
    x_l = \mathrm{Head}_m(X_l) \in \mathbb{R}^d, \qquad
    c_m = \mathrm{ContextMLP}(\gamma_m), \qquad
    h_l = \mathrm{fuse}(x, c_m)_l,

.. math::
    y = h + \mathrm{TransformerLayer}\big(\mathrm{LayerNorm}(h)\big), \qquad
    z = \frac{\sum_l M_l\, y_l}{\sum_l M_l} \in \mathbb{R}^d .

* :math:`\mathrm{Head}_m` is a projection head **per encoder** (Linear :math:`D_m \to d`, GELU, Linear,
  Dropout, LayerNorm), applied to every token.
* :math:`\gamma_m` is a small learnable **context** per modality (3 numbers); one **shared** context MLP
  (:math:`3 \to 64 \to 128 \to d`, ReLU, LayerNorm; for concatenation :math:`3 \to 10`, LayerNorm) turns it
  into the context vector :math:`c_m`.
* the fusion acts **per token** (the six of the seed, in the table below);
* then one shared ``nn.TransformerEncoderLayer`` (``heads`` heads, post-norm, ReLU, dropout; no positional
  encoding, as in the seed) on the LayerNorm of the fused sequence, with a residual, and the mean over
  the real tokens.

The six fusions:

========  ==========================  ==========================================================================
name      seed label                  :math:`h_l = \mathrm{fuse}(x, c)_l`
========  ==========================  ==========================================================================
add       DFE-1 addition              :math:`x_l + c`
mul       DFE-2 multiplication        :math:`x_l \odot c`
concat    DFE-3 concatenation         :math:`x_l + \mathrm{MLP}([x_l; c])` (Linear, ReLU, Linear)
additive  DFE-4 additive attention    :math:`x_l + \sum_k a_k x_k`, :math:`e_k = v^\top \tanh(W_c c + W_x x_k)` (Bahdanau et al., 2015)
general   DFE-5 general attention     :math:`x_l + \sum_k a_k x_k`, :math:`e_k = c^\top W x_k` (Luong et al., 2015)
dot       DFE-6 scaled dot product    :math:`x_l + \sum_k a_k W_v x_k`, :math:`e_k = (W_q c)^\top (W_k x_k)/\sqrt d` (Vaswani et al., 2017)
========  ==========================  ==========================================================================

with :math:`a = \mathrm{softmax}(e)` over the real tokens only: in the attention fusions the context is
the **query**, the tokens are keys and values, and the attended vector is added to every token.

Loss (:attr:`DeepFusionEncoder.temperature`): the seed learns :math:`t` and scales cosines by
:math:`e^{t}`, clamped to :math:`t \in [0.01, 20]` (:class:`~mmalign.models.temperature.LearnableTemperature`
is the same parameterisation; it lives inside the DFE, so it is trained, saved and restored with it). Its
code comment says :math:`\tau` starts at "the equivalent of 0.07" (CLIP's wording), but the code sets
:math:`t = 0.07`, i.e. :math:`\tau_0 = e^{-0.07} = 0.93`; the default here is the stated
:math:`\tau_0 = 0.07` (:data:`TEMPERATURE_INIT`), and :data:`SEED_CODE_TEMPERATURE_INIT` gives the code's.

Where we differ from the seed's code, on purpose:

* **padding masks**: the seed attends over and averages padded tokens too; here padding gets weight 0 in
  the fusion's attention, in the Transformer layer (``src_key_padding_mask``) and in the mean.
* **additive attention**: the seed's code scores :math:`v^\top(W_c c + W_x x_k)` without the
  :math:`\tanh`, so the context term is the same for every token and cancels in the softmax (its DFE-4
  attention ignores the context); we use Bahdanau's :math:`\tanh`, as the seed's README names it.

What differs between modalities: the projection head and the 3 context numbers (:func:`parameter_table`);
everything else is shared.

Shapes: ``forward(x (B, L, D_m) or (B, D_m), modality, mask (B, L) bool or None) -> (B, d)``;
a 2-d input is a sequence of one token.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn

from ..checks import check_choice, check_int, check_mask, check_tensor
from .temperature import LearnableTemperature

FUSIONS = ("add", "mul", "concat", "additive", "general", "dot")
ATTENTION_FUSIONS = ("additive", "general", "dot")
DFE_NAMES = {f: f"DFE-{i + 1}" for i, f in enumerate(FUSIONS)}
FUSION_LABELS = {"add": "addition", "mul": "multiplication", "concat": "concatenation",
                 "additive": "additive attention", "general": "general attention", "dot": "scaled dot product"}
TEMPERATURE_INIT = 0.07  # the initial temperature the seed's code comment states (CLIP's, after Wu et al., 2018)
SEED_CODE_TEMPERATURE_INIT = math.exp(-0.07)  # what the seed's code sets: t = 0.07, logits * exp(t)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension restricted to ``mask`` (True = keep); masked entries get exactly 0.

    (B, L) scores, (B, L) bool mask with at least one True per row -> (B, L) weights summing to 1.
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)  # float32 or wider even under autocast


def masked_mean(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: (B, L, d), (B, L) bool -> (B, d)."""
    w = mask.to(y.dtype).unsqueeze(-1)
    return (y * w).sum(1) / w.sum(1)


def prepare_tokens(x: torch.Tensor, modality: str, mask, input_dims: Mapping[str, int]):
    """Check a modality's tokens and mask: (B, L, D_m) or (B, D_m) (a sequence of one), (B, L) bool or None
    (all real) -> (x (B, L, D_m), mask (B, L) bool with a real token in every row)."""
    check_choice("modality", modality, tuple(input_dims))
    check_tensor("x", x, ndim=(2, 3))
    if x.dim() == 2:
        x = x.unsqueeze(1)
    dim = input_dims[modality]
    if x.shape[-1] != dim:
        raise ValueError(f"x has {x.shape[-1]} features per token but modality {modality!r} was declared "
                         f"with {dim} (input_dims={dict(input_dims)}); pass that modality's features")
    if mask is None:
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    mask = check_mask("mask", mask, tuple(x.shape[:2]), device=x.device)
    if not bool(mask.any(1).all()):
        row = int((~mask.any(1)).nonzero()[0, 0])
        raise ValueError(f"mask row {row} has no real token (all False); every item needs at least one")
    return x, mask


class TokenProjectionHead(nn.Module):
    """The seed's projection head of one frozen encoder, on every token: Linear, GELU, Linear, Dropout, LayerNorm.

    (..., D_in) -> (..., d).
    """

    def __init__(self, in_dim: int, width: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width), nn.Dropout(dropout),
                                 nn.LayerNorm(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContextEncoder(nn.Module):
    """A learnable context per modality (``context_dim`` numbers) and the shared MLP that maps it to a vector.

    ``forward(modality) -> (out_dim,)``. The seed draws each raw context from N(0, s^2), s ~ U(0.1, 0.6).
    """

    def __init__(self, modalities, out_dim: int, context_dim: int = 3, hidden=(64, 128),
                 generator: torch.Generator | None = None):
        super().__init__()
        self.raw = nn.ParameterDict()
        for m in modalities:
            s = float(torch.rand(1, generator=generator)) * 0.5 + 0.1
            self.raw[m] = nn.Parameter(torch.randn(context_dim, generator=generator) * s)
        layers, width = [], context_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, out_dim), nn.LayerNorm(out_dim))

    def forward(self, modality: str) -> torch.Tensor:
        return self.mlp(self.raw[modality])


class DeepFusionEncoder(nn.Module):
    """LightCRL's Deep Fusion Encoder: per-encoder heads, a context per modality, token-level fusion,
    one shared Transformer layer and a masked mean (see the module docstring for the formulas).

    Args:
        input_dims: ``{modality: token width}``, e.g. ``{"image": 1280, "text": 384}``.
        fusion: one of :data:`FUSIONS` (``add``, ``mul``, ``concat``, ``additive``, ``general``, ``dot``).
        width: d, the DFE's width and the embedding size (the seed: 256).
        heads: attention heads of the Transformer layer (the seed: 4).
        ff_dim: the Transformer layer's feed-forward width (the seed: PyTorch's default, 2048).
        dropout: dropout of the heads and the Transformer layer (the seed: 0.1).
        context_dim: numbers in each modality's raw context (the seed: 3).
        concat_context_dim: width of the context vector for concatenation (the seed: 10).
        temperature_init: the initial temperature (default 0.07, see the module docstring).
        seed: seeds the initialisation.
    """

    def __init__(self, input_dims: Mapping[str, int], fusion: str = "add", *, width: int = 256, heads: int = 4,
                 ff_dim: int = 2048, dropout: float = 0.1, context_dim: int = 3, concat_context_dim: int = 10,
                 temperature_init: float = TEMPERATURE_INIT, seed: int | None = None):
        super().__init__()
        check_choice("fusion", fusion, FUSIONS)
        if not isinstance(input_dims, Mapping) or not input_dims:
            raise ValueError(f"input_dims must map each modality name to its token width, got {input_dims!r}")
        for name, dim in input_dims.items():
            check_int(f"input_dims[{name!r}]", dim, minimum=1)
        width, heads = check_int("width", width, minimum=1), check_int("heads", heads, minimum=1)
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads}): each head reads width/heads "
                             "numbers; change one of them")
        ff_dim, context_dim = check_int("ff_dim", ff_dim, minimum=1), check_int("context_dim", context_dim, minimum=1)
        if not 0 <= float(dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if seed is not None:
            torch.manual_seed(seed)  # nn.Linear and the Transformer layer draw from the global generator
        self.fusion, self.width = fusion, width
        self.input_dims = dict(input_dims)
        self.modalities = tuple(input_dims)
        # per modality: the projection head of its encoder (and the raw context, inside self.context)
        self.heads = nn.ModuleDict({m: TokenProjectionHead(d, width, dropout) for m, d in input_dims.items()})
        c_dim = concat_context_dim if fusion == "concat" else width
        hidden = () if fusion == "concat" else (64, 128)
        self.context = ContextEncoder(self.modalities, c_dim, context_dim, hidden, gen)
        # shared by every modality
        if fusion == "concat":
            self.concat_mlp = nn.Sequential(nn.Linear(width + c_dim, width + c_dim), nn.ReLU(),
                                            nn.Linear(width + c_dim, width))
        elif fusion == "additive":
            self.w_c, self.w_x, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 1)
        elif fusion == "general":
            self.w_g = nn.Linear(width, width)
        elif fusion == "dot":
            self.w_q, self.w_k, self.w_v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=ff_dim, dropout=dropout,
                                                batch_first=True)
        self.temperature = LearnableTemperature(temperature_init, max_scale=math.exp(20.0), min_scale=math.exp(0.01))

    # ------------------------------------------------------------------ inputs
    def _prepare(self, x: torch.Tensor, modality: str, mask) -> tuple[torch.Tensor, torch.Tensor]:
        return prepare_tokens(x, modality, mask, self.input_dims)

    def tokens(self, x: torch.Tensor, modality: str, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The modality's tokens through its projection head: (B, L, d), and the bool mask (B, L)."""
        x, mask = self._prepare(x, modality, mask)
        return self.heads[modality](x), mask

    def context_vector(self, modality: str) -> torch.Tensor:
        """The modality's context vector c_m (d,), or (concat_context_dim,) for concatenation."""
        check_choice("modality", modality, self.modalities)
        return self.context(modality)

    # ------------------------------------------------------------------ fusion
    def attention(self, x: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, L) of the context query c over the tokens x (attention fusions only)."""
        if self.fusion == "additive":
            scores = self.v(torch.tanh(self.w_c(c) + self.w_x(x))).squeeze(-1)
        elif self.fusion == "general":
            scores = self.w_g(x) @ c
        elif self.fusion == "dot":
            scores = self.w_k(x) @ self.w_q(c) / math.sqrt(self.width)
        else:
            raise ValueError(f"fusion {self.fusion!r} has no attention weights; use one of {ATTENTION_FUSIONS}")
        return masked_softmax(scores, mask)

    def fuse(self, x: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token-level fusion of projected tokens x (B, L, d) with the context vector c: the fused sequence
        h (B, L, d) and the attention weights (B, L) (None for add, mul, concat)."""
        if self.fusion == "add":
            return x + c, None
        if self.fusion == "mul":
            return x * c, None
        if self.fusion == "concat":
            return x + self.concat_mlp(torch.cat([x, c.expand(*x.shape[:-1], c.shape[-1])], dim=-1)), None
        a = self.attention(x, mask, c).to(x.dtype)
        values = self.w_v(x) if self.fusion == "dot" else x
        return x + torch.einsum("bl,bld->bd", a, values).unsqueeze(1), a

    def encode(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The shared Transformer layer with its residual: h + Layer(LayerNorm(h)), padding masked (B, L, d)."""
        return h + self.layer(self.norm(h), src_key_padding_mask=~mask)

    def sequence(self, x: torch.Tensor, modality: str, mask=None, return_attention: bool = False,
                 context: str | None = None):
        """The output sequence y (B, L, d) before pooling and the mask (and the fusion's attention weights).

        ``context`` fuses with another modality's context vector (default: ``modality``'s own), e.g. to
        measure what the context does by swapping it.
        """
        tokens, mask = self.tokens(x, modality, mask)
        h, a = self.fuse(tokens, mask, self.context_vector(context or modality))
        y = self.encode(h, mask)
        return (y, mask, a) if return_attention else (y, mask)

    def forward(self, x: torch.Tensor, modality: str, mask=None, return_attention: bool = False,
                context: str | None = None):
        """The embedding z (B, d): the masked mean of :meth:`sequence` (and the attention weights (B, L))."""
        y, mask, a = self.sequence(x, modality, mask, return_attention=True, context=context)
        z = masked_mean(y, mask)
        return (z, a) if return_attention else z

    # ------------------------------------------------------------------ parameters
    def parameter_groups(self) -> dict[str, list[str]]:
        """Names of trained parameters: ``"head: m"`` and ``"context: m"`` per modality, and ``"shared"``."""
        groups: dict[str, list[str]] = {f"{g}: {m}": [] for g in ("head", "context") for m in self.modalities}
        groups["shared"] = []
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "heads":
                groups[f"head: {parts[1]}"].append(name)
            elif parts[:2] == ["context", "raw"]:
                groups[f"context: {parts[2]}"].append(name)
            else:
                groups["shared"].append(name)
        return groups


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_table(dfe: nn.Module) -> dict[str, int]:
    """Trained parameters of a DFE by group: one entry per modality-specific group (``"head: image"``,
    ``"context: image"``, ...; each counts that modality's own parameters), ``"shared"`` and ``"total"``."""
    params = dict(dfe.named_parameters())
    out = {k: sum(params[n].numel() for n in names) for k, names in dfe.parameter_groups().items()}
    out["total"] = sum(out.values())
    return out

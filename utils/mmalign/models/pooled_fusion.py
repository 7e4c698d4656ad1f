r"""An ablation of LightCRL's Deep Fusion Encoder: fusion after pooling, then an MLP (no token-level layer).

For modality :math:`m` with frozen token features :math:`X` (mask :math:`M`):
:math:`H = A_m(\mathrm{std}_m(X))`, :math:`u = \mathrm{fuse}(\bar h \text{ or } H, c_m)`,
:math:`z = \mathrm{MLP}(u)`: ``add`` :math:`\bar h + c`, ``mul`` :math:`\bar h \odot c`, ``concat``
:math:`[\bar h; c]`, and the attention fusions pool :math:`H` with the context as the query. The context
is then only a per-modality bias or scale of the MLP's input; chapter 7 compares it with the seed's
token-level model (:class:`mmalign.models.lightcrl.DeepFusionEncoder`) at the same budget.

Shapes: ``forward(x (B, L, D_m) or (B, D_m), modality, mask (B, L) bool or None) -> (B, out_dim)``.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn

from ..checks import check_choice, check_int
from .lightcrl import ATTENTION_FUSIONS, FUSIONS, masked_softmax, prepare_tokens


class PooledFusionEncoder(nn.Module):
    """The course's earlier, pooled simplification of LightCRL's DFE: an ablation, not LightCRL.

    Add, multiply and concatenate act on the mean-pooled token vector, the attention fusions pool the
    tokens with the context as query, then an MLP; no per-token fusion and no Transformer layer (see
    :class:`~mmalign.models.lightcrl.DeepFusionEncoder` for the seed's model). Chapter 7 trains it as the
    ablation row "what the token-level layer buys".

    Args:
        input_dims: ``{modality: feature width}``, e.g. ``{"image": 1280, "text": 384}``.
        fusion: one of :data:`FUSIONS` (``add``, ``mul``, ``concat``, ``additive``, ``general``, ``dot``).
        width: d, the width the fusion works at (default: the common input width when all are equal).
        out_dim: size of the shared embedding space.
        hidden_dim: hidden size of the output MLP (default ``width``).
        seed: seeds the initialisation (the context vectors start as N(0, 1/d) draws).
    """

    def __init__(self, input_dims: Mapping[str, int], fusion: str = "add", width: int | None = None,
                 out_dim: int = 128, hidden_dim: int | None = None, seed: int | None = None):
        super().__init__()
        check_choice("fusion", fusion, FUSIONS)
        if not isinstance(input_dims, Mapping) or not input_dims:
            raise ValueError(f"input_dims must map each modality name to its feature width, got {input_dims!r}")
        for name, dim in input_dims.items():
            check_int(f"input_dims[{name!r}]", dim, minimum=1)
        if width is None:
            widths = set(input_dims.values())
            if len(widths) != 1:
                raise ValueError(f"input widths differ ({dict(input_dims)}): pass width=d, the common width the "
                                 "fusion works at (each modality then gets a linear adapter D_m -> d)")
            width = widths.pop()
        width = check_int("width", width, minimum=1)
        out_dim = check_int("out_dim", out_dim, minimum=1)
        hidden_dim = check_int("hidden_dim", hidden_dim or width, minimum=1)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if seed is not None:
            torch.manual_seed(seed)
        self.fusion, self.width, self.out_dim = fusion, width, out_dim
        self.input_dims = dict(input_dims)
        self.modalities = tuple(input_dims)
        # modality-specific: context vectors (trained), adapters (trained, only where widths differ), statistics
        self.context = nn.ParameterDict({
            m: nn.Parameter(torch.randn(width, generator=gen) / math.sqrt(width)) for m in self.modalities})
        self.adapters = nn.ModuleDict({m: nn.Linear(d, width) for m, d in input_dims.items() if d != width})
        for m, d in input_dims.items():
            self.register_buffer(f"mean_{m}", torch.zeros(d))
            self.register_buffer(f"std_{m}", torch.ones(d))
        # shared by every modality
        if fusion == "additive":
            self.w_q = nn.Linear(width, width, bias=False)
            self.w_k = nn.Linear(width, width)
            self.v = nn.Linear(width, 1, bias=False)
        elif fusion == "general":
            self.w_g = nn.Linear(width, width, bias=False)
        elif fusion == "dot":
            self.w_q = nn.Linear(width, width, bias=False)
            self.w_k = nn.Linear(width, width, bias=False)
            self.w_v = nn.Linear(width, width, bias=False)
        in_mlp = 2 * width if fusion == "concat" else width
        self.mlp = nn.Sequential(nn.Linear(in_mlp, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def fit_standardizer(self, modality: str, features: torch.Tensor, mask: torch.Tensor | None = None):
        """Set the modality's (fixed) mean and std from training features (B, L, D) or (B, D), real tokens only."""
        x, mask = self._prepare(features, modality, mask)
        rows = x[mask].float()
        std = rows.std(0) if rows.shape[0] > 1 else torch.ones_like(rows[0])
        getattr(self, f"mean_{modality}").copy_(rows.mean(0))
        getattr(self, f"std_{modality}").copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        return self

    # ------------------------------------------------------------------ forward
    def _prepare(self, x: torch.Tensor, modality: str, mask) -> tuple[torch.Tensor, torch.Tensor]:
        return prepare_tokens(x, modality, mask, self.input_dims)

    def tokens(self, x: torch.Tensor, modality: str, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised and adapted tokens H (B, L, d) and the bool mask (B, L)."""
        x, mask = self._prepare(x, modality, mask)
        mean, std = getattr(self, f"mean_{modality}"), getattr(self, f"std_{modality}")
        h = (x - mean) / std
        if modality in self.adapters:
            h = self.adapters[modality](h)
        return h * mask.unsqueeze(-1), mask

    def attention(self, h: torch.Tensor, mask: torch.Tensor, modality: str) -> torch.Tensor:
        """Attention weights (B, L) of the context query over the tokens H (attention fusions only)."""
        c = self.context[modality]
        if self.fusion == "additive":
            scores = self.v(torch.tanh(self.w_q(c) + self.w_k(h))).squeeze(-1)
        elif self.fusion == "general":
            scores = self.w_g(h) @ c
        elif self.fusion == "dot":
            scores = self.w_k(h) @ self.w_q(c) / math.sqrt(self.width)
        else:
            raise ValueError(f"fusion {self.fusion!r} has no attention weights; use one of {ATTENTION_FUSIONS}")
        return masked_softmax(scores, mask)

    def fuse(self, x: torch.Tensor, modality: str, mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused vector u (B, d or 2d) and the attention weights (B, L) (None for add, mul, concat)."""
        h, mask = self.tokens(x, modality, mask)
        c = self.context[modality]
        if self.fusion in ATTENTION_FUSIONS:
            a = self.attention(h, mask, modality).to(h.dtype)
            values = self.w_v(h) if self.fusion == "dot" else h
            return torch.einsum("bl,bld->bd", a, values), a
        pooled = h.sum(1) / mask.sum(1, keepdim=True).to(h.dtype)
        if self.fusion == "add":
            return pooled + c, None
        if self.fusion == "mul":
            return pooled * c, None
        return torch.cat([pooled, c.expand_as(pooled)], dim=-1), None

    def forward(self, x: torch.Tensor, modality: str, mask=None, return_attention: bool = False):
        u, a = self.fuse(x, modality, mask)
        z = self.mlp(u)
        return (z, a) if return_attention else z

    # ------------------------------------------------------------------ parameters
    def parameter_groups(self) -> dict[str, list[str]]:
        """Names of trained parameters: ``"context: m"`` and ``"adapter: m"`` per modality, ``"shared"``."""
        groups: dict[str, list[str]] = {f"{g}: {m}": [] for g in ("context", "adapter") for m in self.modalities}
        groups["shared"] = []
        for name, _ in self.named_parameters():
            group, _, rest = name.partition(".")
            modality = rest.split(".")[0]
            key = {"context": f"context: {modality}", "adapters": f"adapter: {modality}"}.get(group, "shared")
            groups[key].append(name)
        return {k: v for k, v in groups.items() if v or k == "shared"}

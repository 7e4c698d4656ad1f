"""Recipes the chapters share: train two projection heads on cached frozen features, and score them.

Typical use::

    model, history = train_dual_encoder(train, val, cfg)                 # InfoNCE by default
    test_report = evaluate(model, test)                                  # Recall@1/5/10 both ways

A chapter swaps the loss (``pair_loss``), the heads or the optimizer; everything else stays equal,
which is what makes its comparisons fair.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import Config
from .data.features import FeatureSplit
from .losses import info_nce
from .models.heads import DualEncoder, ProjectionHead
from .retrieval import as_percentages, retrieval_report
from .train import History, fit

PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def info_nce_pair_loss(temperature: float = 0.07) -> PairLoss:
    """``(z_img, z_txt, ids) -> InfoNCE`` with captions of the same scene as extra positives."""
    return lambda zi, zt, ids: info_nce(zi, zt, temperature=temperature, ids=ids)


def make_dual_encoder(train: FeatureSplit, embed_dim: int, hidden_dim: int | None = None) -> DualEncoder:
    """Two projection heads whose input standardisation is fitted on the training features."""
    return DualEncoder(ProjectionHead.from_features(train.image, embed_dim, hidden_dim=hidden_dim),
                       ProjectionHead.from_features(train.text, embed_dim, hidden_dim=hidden_dim))


@torch.no_grad()
def evaluate(model: DualEncoder, split: FeatureSplit, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent (for tables; :func:`mmalign.retrieval.retrieval_report` gives fractions) in both
    directions on a split: images vs all captions of the split."""
    model.eval()
    device = next(model.parameters()).device
    zi = model.encode_images(split.image.to(device))
    zt = model.encode_texts(split.text.to(device))
    return as_percentages(retrieval_report(zi, zt, split.image_ids.to(device), split.text_ids.to(device), ks))


def train_dual_encoder(train: FeatureSplit, val: FeatureSplit | None, cfg: Config,
                       pair_loss: PairLoss | None = None, *, model: DualEncoder | None = None,
                       hidden_dim: int | None = None, optimizer: str | Callable = "adam",
                       epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
                       weight_decay: float = 0.0, seed: int | None = None, progress: bool = True,
                       desc: str = "training") -> tuple[DualEncoder, History]:
    """Train projection heads on (image, caption) feature pairs, keeping the best validation rsum.

    ``pair_loss(z_img, z_txt, scene_ids)`` is the loss of one batch (default InfoNCE, tau = 0.07).
    ``optimizer`` is ``"adam"``, ``"lamb"`` or a callable ``params -> torch.optim.Optimizer``.
    """
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    model = model or make_dual_encoder(train, cfg.embed_dim, hidden_dim)
    pair_loss = pair_loss or info_nce_pair_loss()
    lr = lr or cfg.lr
    if callable(optimizer):
        opt = optimizer(model.parameters())
    elif optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "lamb":
        from .optim import LAMB
        opt = LAMB(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam', 'lamb' or a callable, got {optimizer!r}")

    def step(m, batch):
        img, txt, ids = batch
        zi, zt = m(img, txt)
        return pair_loss(zi, zt, ids)

    history = fit(model, step, train.pairs(), optimizer=opt, epochs=epochs or cfg.epochs,
                  batch_size=batch_size or cfg.batch_size, seed=seed, device=cfg.device, amp=cfg.amp,
                  eval_fn=(lambda m: evaluate(m, val)) if val is not None else None,
                  keep_best="rsum" if val is not None else None, progress=progress, desc=desc)
    return model, history

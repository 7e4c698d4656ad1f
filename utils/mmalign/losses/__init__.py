"""The loss zoo: each loss is a function of embeddings (or a similarity matrix) and a temperature or
margin, with no hidden state. Margin schedules are small objects with a state_dict."""

from .codis import codebook_targets, distill_contrastive_loss, ot_cost_loss, prototype_loss, sample_hard_negatives
from .contrastive import contrastive_loss
from .cosine_embedding import cosine_embedding_loss, make_signed_pairs
from .hypersphere import hypersphere_loss
from .info_nce import info_nce
from .mms import AdaptiveMargin, ScheduledMargin, mms_loss
from .moco import moco_loss
from .multiview import multiview_loss, n_loss_terms, term_keys
from .siglip import siglip_loss
from .triplet import triplet_loss, triplet_loss_embeddings

__all__ = ["info_nce", "siglip_loss", "triplet_loss", "triplet_loss_embeddings", "contrastive_loss",
           "cosine_embedding_loss", "make_signed_pairs", "mms_loss", "ScheduledMargin", "AdaptiveMargin",
           "hypersphere_loss", "moco_loss", "multiview_loss", "n_loss_terms", "term_keys",
           "distill_contrastive_loss", "sample_hard_negatives", "codebook_targets", "prototype_loss", "ot_cost_loss"]


def __getattr__(name: str):
    if name == "similarity":  # 0.1 exported a second copy here
        from .._deprecation import warn_deprecated
        from ..retrieval import similarity

        warn_deprecated("mmalign.losses.similarity is deprecated; use mmalign.retrieval.similarity", 2)
        return similarity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

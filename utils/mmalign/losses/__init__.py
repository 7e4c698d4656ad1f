"""The loss zoo: each loss is a function of embeddings (and a temperature or margin), no hidden state."""

from .info_nce import info_nce

__all__ = ["info_nce"]

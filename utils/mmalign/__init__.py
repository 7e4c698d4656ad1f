"""mmalign: the library behind the course on multimodal representation alignment.

``import mmalign`` is cheap: submodules load on first use, so ``mmalign.losses.info_nce`` works after a
bare ``import mmalign`` without importing plotting or notebook code (which need the ``plots`` and
``labs`` extras).
"""

import importlib

__version__ = "0.2.0"

_SUBMODULES = ("checks", "config", "data", "dist", "evaluation", "experiments", "labs", "losses", "memory",
               "miners", "models", "optim", "ot", "plots", "recipes", "retrieval", "train", "widgets")
__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mmalign' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))

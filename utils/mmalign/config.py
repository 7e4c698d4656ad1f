"""The course's one configuration object: profile, device, paths and seeding.

Notebooks read the profile once::

    from mmalign.config import load_config, seed_everything
    cfg = load_config()          # reads MMALIGN_PROFILE (ci | full | gpu), default ci
    seed_everything(cfg.seed)

``ci`` is small enough that every notebook runs in at most 90 s on 2 CPU cores, ``full`` gives a
chapter's reference table on a laptop CPU in at most 10 minutes, ``gpu`` is for a GPU box.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PROFILES = ("ci", "full", "gpu")


@dataclass(frozen=True)
class Config:
    """Sizes and budgets of one profile. Chapters read what they need and ignore the rest."""

    profile: str
    n_train: int  # scenes in the training split
    n_val: int
    n_test: int
    image_size: int  # scene world image side in pixels
    batch_size: int
    epochs: int  # epochs of the small heads trained on cached features
    lr: float
    embed_dim: int  # shared embedding space
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    num_threads: int | None = None
    extra: dict = field(default_factory=dict)

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)


_PROFILE_SIZES = {
    "ci": dict(n_train=1200, n_val=200, n_test=300, image_size=64, batch_size=128, epochs=10,
               lr=2e-3, embed_dim=128, num_threads=1),
    "full": dict(n_train=5000, n_val=800, n_test=1000, image_size=64, batch_size=256, epochs=20,
                 lr=2e-3, embed_dim=128, num_threads=1),
    "gpu": dict(n_train=60000, n_val=5000, n_test=5000, image_size=96, batch_size=1024, epochs=60,
                lr=2e-3, embed_dim=256),
}


def current_profile() -> str:
    """The profile named by ``MMALIGN_PROFILE`` (default ``ci``); an unknown name is an error."""
    name = os.environ.get("MMALIGN_PROFILE", "ci").strip().lower() or "ci"
    if name not in PROFILES:
        raise ValueError(
            f"MMALIGN_PROFILE={name!r} is not a profile; use one of {', '.join(PROFILES)} "
            "(e.g. `MMALIGN_PROFILE=full make book`)."
        )
    return name


def load_config(profile: str | None = None, **overrides) -> Config:
    """The config of ``profile`` (default: ``MMALIGN_PROFILE``), with keyword overrides.

    When the profile sets ``num_threads`` (ci: 1), torch is told to use that many threads: the CI
    profile's small matrices run faster on one thread, and a busy machine does not thrash.
    """
    name = profile or current_profile()
    if name not in PROFILES:
        raise ValueError(f"profile {name!r} is not one of {PROFILES}")
    device = choose_device("cuda" if name == "gpu" else None)
    cfg = Config(profile=name, device=str(device), amp=device.type == "cuda", **_PROFILE_SIZES[name])
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Config)]}")
    cfg = cfg.replace(**overrides) if overrides else cfg
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    return cfg


def choose_device(prefer: str | None = None) -> torch.device:
    """``prefer`` if given and available, else CUDA when present, else MPS, else CPU.

    ``MMALIGN_DEVICE`` overrides everything (e.g. ``MMALIGN_DEVICE=cpu`` on a GPU box).
    """
    forced = os.environ.get("MMALIGN_DEVICE", "").strip()
    if forced:
        return _available("MMALIGN_DEVICE", forced)
    if prefer is not None:
        try:
            dev = torch.device(prefer)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device {prefer!r} is not a torch device name (cpu, cuda, cuda:1, mps): {err}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "the gpu profile asks for CUDA but torch.cuda.is_available() is False; "
                "use MMALIGN_PROFILE=full on a CPU machine."
            )
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _available(source: str, name: str) -> torch.device:
    """``torch.device(name)`` if it names a device this machine has; else a ValueError naming ``source``."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{source}={name!r} is not a torch device name; use cpu, cuda, cuda:<index> or mps "
                         f"(or unset {source}) ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{source}={name!r} asks for CUDA but torch.cuda.is_available() is False on this machine; "
                             f"use {source}=cpu or unset it")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{source}={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{source}={name!r} asks for MPS (Apple GPU) but it is not available; use {source}=cpu")
    return dev


def repo_root() -> Path:
    """The course checkout (the folder holding pyproject.toml), or the working directory."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "utils" / "mmalign").exists():
            return parent
    return Path.cwd()


def cache_dir(*parts: str) -> Path:
    """A folder under the course's data/feature cache (``MMALIGN_CACHE``, default ``<repo>/.cache``).

    git ignores it; delete it to force regeneration.
    """
    base = Path(os.environ.get("MMALIGN_CACHE", repo_root() / ".cache" / "mmalign"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir() -> Path:
    """The committed folder of reference tables written by the full profile."""
    path = repo_root() / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (CPU and CUDA); returns a torch generator with that seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)

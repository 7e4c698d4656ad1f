"""Profiles, environment variables, overrides, the cache folder, seeding and device choice."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from mmalign import config
from mmalign.config import PROFILES, cache_dir, choose_device, current_profile, load_config, seed_everything


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("MMALIGN_PROFILE", "MMALIGN_DEVICE"):
        monkeypatch.delenv(var, raising=False)


def test_profiles_sizes():
    assert PROFILES == ("ci", "full", "gpu")
    ci = load_config("ci")
    # the CI profile the notebooks are budgeted for (see the module docstring and the chapters)
    assert (ci.profile, ci.n_train, ci.n_val, ci.n_test, ci.image_size) == ("ci", 1200, 200, 300, 64)
    assert (ci.batch_size, ci.epochs, ci.embed_dim, ci.seed, ci.num_threads) == (128, 10, 128, 0, 1)
    full = load_config("full")
    assert full.n_train > ci.n_train and full.n_test > ci.n_test and full.batch_size >= ci.batch_size
    assert load_config("full").extra == {} and load_config("full").extra is not load_config("ci").extra


def test_profile_from_environment(monkeypatch):
    assert current_profile() == "ci" and load_config().profile == "ci"
    monkeypatch.setenv("MMALIGN_PROFILE", "  FULL ")
    assert current_profile() == "full" and load_config() == load_config("full")
    assert load_config().n_train != load_config("ci").n_train
    monkeypatch.setenv("MMALIGN_PROFILE", "")
    assert current_profile() == "ci"
    monkeypatch.setenv("MMALIGN_PROFILE", "laptop")
    with pytest.raises(ValueError, match=r"MMALIGN_PROFILE='laptop' is not a profile; use one of ci, full, gpu"):
        load_config()
    assert load_config("ci").profile == "ci"  # an explicit profile does not read the variable


def test_unknown_profile_argument():
    with pytest.raises(ValueError, match="profile 'tiny' is not one of"):
        load_config("tiny")


def test_overrides_and_frozen():
    cfg = load_config("ci", epochs=3, lr=0.1, extra={"k": 1})
    assert (cfg.epochs, cfg.lr, cfg.extra) == (3, 0.1, {"k": 1})
    assert cfg.n_train == 1200 and cfg.batch_size == 128  # the rest unchanged
    again = cfg.replace(seed=7)
    assert again.seed == 7 and cfg.seed == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 5
    with pytest.raises(ValueError, match="unknown config fields .*epochz"):
        load_config("ci", epochz=3)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path / "c"))
    path = cache_dir("features", "sub")
    assert path == tmp_path / "c" / "features" / "sub" and path.is_dir()
    monkeypatch.delenv("MMALIGN_CACHE")
    assert cache_dir() == config.repo_root() / ".cache" / "mmalign"


def test_repo_root_holds_the_package():
    root = config.repo_root()
    assert (root / "pyproject.toml").exists() and (root / "utils" / "mmalign" / "config.py").exists()


def draw():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_seed_everything_reproducible():
    gen = seed_everything(123)
    a = draw()
    g1 = torch.rand(2, generator=gen)
    gen = seed_everything(123)
    b = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert torch.equal(g1, torch.rand(2, generator=gen))
    assert torch.equal(g1, torch.rand(2, generator=torch.Generator().manual_seed(123)))
    seed_everything(124)
    c = draw()
    assert c[0] != a[0] and c[1] != a[1] and not torch.equal(c[2], a[2])


def test_choose_device(monkeypatch):
    monkeypatch.setenv("MMALIGN_DEVICE", "cpu")
    assert choose_device() == torch.device("cpu")
    assert choose_device("cuda") == torch.device("cpu")  # the variable wins over any preference
    cfg = load_config("gpu")  # a CPU run of the gpu profile when forced
    assert cfg.device == "cpu" and cfg.amp is False
    monkeypatch.setenv("MMALIGN_DEVICE", "meta")
    assert choose_device().type == "meta"
    monkeypatch.delenv("MMALIGN_DEVICE")
    assert choose_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else "cpu")
    assert choose_device().type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_profile_without_cuda_says_what_to_do():
    with pytest.raises(RuntimeError, match="use MMALIGN_PROFILE=full on a CPU machine"):
        load_config("gpu")
    with pytest.raises(RuntimeError, match="torch.cuda.is_available\\(\\) is False"):
        choose_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_profile_with_cuda():
    cfg = load_config("gpu")
    assert cfg.device == "cuda" and cfg.amp is True and cfg.image_size == 96

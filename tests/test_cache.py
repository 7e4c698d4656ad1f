"""Cache corruption: every cache (pooled features, sequence features, scene world) detects a truncated
entry, an entry swapped in from other inputs and a wrong shape, and recomputes (with a CacheWarning
naming the path) instead of using it; an interrupted write leaves no entry that a later run trusts.
Stub encoders stand in for the real ones; the cache lives in a tmp folder."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from mmalign.config import load_config
from mmalign.data import cache as C
from mmalign.data import scenes
from mmalign.data.cache import CacheWarning
from mmalign.models.encoders import FrozenEncoder, encode_cached, encode_sequences_cached


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Stub:
    """A text encoder whose features are a function of the text; counts its calls."""

    def __init__(self, dim=4, preprocess="stub/len16"):
        self.calls = 0
        self.dim = dim
        self.encoder = FrozenEncoder("stub", "text", dim, preprocess, self.encode, torch.device("cpu"), None,
                                     self.encode_sequence)

    def row(self, text):
        g = torch.Generator().manual_seed(sum(map(ord, text)))
        return torch.randn(self.dim, generator=g)

    def encode(self, texts):
        self.calls += 1
        return torch.stack([self.row(t) for t in texts])

    def encode_sequence(self, texts):
        self.calls += 1
        length = max(len(t) for t in texts)
        feats = torch.zeros(len(texts), length, self.dim)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, t in enumerate(texts):
            feats[i, : len(t)] = self.row(t)
            mask[i, : len(t)] = True
        return feats, mask


TEXTS = ["a red cube", "two blue spheres", "a cone", "a green cube left of a cone"]
OTHER = ["a white cylinder", "a brown cone", "a cube", "three spheres"]


def entries(cache, kind):
    return sorted((cache / "features").glob(f"{kind}-*.pt"))


def no_temporaries(folder):
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------ pooled features
def pooled(stub, texts=TEXTS):
    return encode_cached(stub.encoder, texts, batch_size=2, progress=False)


def test_pooled_hit_then_truncated_entry_is_recomputed(tmp_cache):
    stub = Stub()
    first = pooled(stub)
    calls = stub.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(pooled(stub), first) and stub.calls == calls  # a clean hit
    (path,) = entries(tmp_cache, "pooled")
    for keep in (0.0, 0.3, 0.9):
        truncate(path, keep)
        with pytest.warns(CacheWarning, match=rf"cache entry {path} is unreadable .*; recomputing it"):
            again = pooled(stub)
        assert torch.equal(again, first) and stub.calls > calls
        calls = stub.calls
        assert torch.equal(pooled(stub), first) and stub.calls == calls  # rewritten, good again


def test_pooled_swapped_entries_are_never_used(tmp_cache):
    stub = Stub()
    a, b = pooled(stub, TEXTS), pooled(stub, OTHER)
    paths = entries(tmp_cache, "pooled")
    assert len(paths) == 2
    # swap the two files: each now holds the other's features under its name
    tmp = tmp_cache / "swap"
    shutil.copy(paths[0], tmp)
    shutil.copy(paths[1], paths[0])
    shutil.copy(tmp, paths[1])
    calls = stub.calls
    with pytest.warns(CacheWarning, match=r"computed from other inputs \(differs in data\); recomputing"):
        got_a = pooled(stub, TEXTS)
    with pytest.warns(CacheWarning, match=r"computed from other inputs"):
        got_b = pooled(stub, OTHER)
    assert torch.equal(got_a, a) and torch.equal(got_b, b) and stub.calls == calls + 2 * 2


def test_pooled_other_preprocessing_or_wrong_rows_or_nan_is_recomputed(tmp_cache):
    stub = Stub()
    feats = pooled(stub)
    (path,) = entries(tmp_cache, "pooled")
    entry = torch.load(path, weights_only=True)
    # same file name, but the meta says another max_length: never served
    C.save_entry(path, entry["payload"], dict({k: v for k, v in entry["meta"].items() if k != "cache_format"},
                                              encoder="stub|stub/len64"))
    with pytest.warns(CacheWarning, match=r"differs in encoder"):
        assert torch.equal(pooled(stub), feats)
    meta = {k: v for k, v in torch.load(path, weights_only=True)["meta"].items() if k != "cache_format"}
    C.save_entry(path, feats[:3], meta)  # a row short
    with pytest.warns(CacheWarning, match=r"of shape \(3, 4\), expected 4 rows"):
        assert torch.equal(pooled(stub), feats)
    C.save_entry(path, feats.clone().fill_(float("nan")), meta)
    with pytest.warns(CacheWarning, match=r"holding NaN or inf values"):
        assert torch.equal(pooled(stub), feats)
    torch.save(feats, path)  # an entry of the old format (a bare tensor)
    with pytest.warns(CacheWarning, match=r"not a cache entry of this version"):
        assert torch.equal(pooled(stub), feats)


def test_a_different_preprocessing_gets_its_own_entry(tmp_cache):
    short, long = Stub(preprocess="stub/len16"), Stub(preprocess="stub/len64")
    pooled(short), pooled(long)
    assert len(entries(tmp_cache, "pooled")) == 2


# ------------------------------------------------------------------ interrupted writes
class Interrupted(Exception):
    pass


def interrupt_torch_save(monkeypatch):
    """torch.save that writes half a file and then dies, as a killed `make data` would."""
    real = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        truncate(f)
        raise Interrupted("killed")

    monkeypatch.setattr(torch, "save", dying_save)


@pytest.mark.parametrize("kind", ["pooled", "sequence"])
def test_interrupted_feature_write_leaves_nothing_a_later_run_uses(tmp_cache, monkeypatch, kind):
    stub = Stub()
    run = (lambda: pooled(stub)) if kind == "pooled" else (lambda: encode_sequences_cached(stub.encoder, TEXTS, 2, False))
    interrupt_torch_save(monkeypatch)
    with pytest.raises(Interrupted):
        run()
    assert entries(tmp_cache, kind) == [] and no_temporaries(tmp_cache)
    monkeypatch.undo()
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_cache))
    calls = stub.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing half-written is found, so nothing is rejected either
        out = run()
    assert stub.calls > calls and len(entries(tmp_cache, kind)) == 1
    expected = stub.encode(TEXTS) if kind == "pooled" else None
    if expected is not None:
        assert torch.equal(out, expected)


def test_interrupted_write_keeps_the_previous_good_entry(tmp_cache, monkeypatch):
    stub = Stub()
    feats = pooled(stub)
    (path,) = entries(tmp_cache, "pooled")
    before = path.read_bytes()
    interrupt_torch_save(monkeypatch)
    with pytest.raises(Interrupted):
        C.save_entry(path, torch.zeros(4, 4), {"kind": "pooled"})
    assert path.read_bytes() == before and no_temporaries(tmp_cache)
    monkeypatch.undo()
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_cache))
    calls = stub.calls
    assert torch.equal(pooled(stub), feats) and stub.calls == calls


# ------------------------------------------------------------------ sequence features
def sequences(stub, texts=TEXTS):
    return encode_sequences_cached(stub.encoder, texts, batch_size=2, progress=False)


def test_sequence_entries_truncated_swapped_or_malformed_are_recomputed(tmp_cache):
    stub = Stub()
    feats, mask = sequences(stub)
    assert feats.shape == (4, max(map(len, TEXTS)), 4) and mask.sum(1).tolist() == [len(t) for t in TEXTS]
    (path,) = entries(tmp_cache, "sequence")
    calls = stub.calls
    assert all(torch.equal(x, y) for x, y in zip(sequences(stub), (feats, mask))) and stub.calls == calls
    truncate(path)
    with pytest.warns(CacheWarning, match=rf"cache entry {path} is unreadable"):
        got = sequences(stub)
    assert torch.equal(got[0], feats) and torch.equal(got[1], mask)
    # swap in the entry of other texts
    sequences(stub, OTHER)
    other = next(p for p in entries(tmp_cache, "sequence") if p != path)
    shutil.copy(other, path)
    with pytest.warns(CacheWarning, match=r"computed from other inputs \(differs in data\)"):
        got = sequences(stub)
    assert torch.equal(got[0], feats) and torch.equal(got[1], mask)
    # right meta, malformed payloads
    meta = {k: v for k, v in torch.load(path, weights_only=True)["meta"].items() if k != "cache_format"}
    for payload, reason in [
        ({"features": feats.half()}, r"not a \(features, mask\) entry"),
        ({"features": feats[:3].half(), "mask": mask[:3]}, r"expected 4 rows"),
        ({"features": feats.half(), "mask": mask.int()}, r"expected 4 rows"),
        ({"features": feats.half(), "mask": torch.zeros_like(mask)}, r"a row with no valid token"),
    ]:
        C.save_entry(path, payload, meta)
        with pytest.warns(CacheWarning, match=reason):
            got = sequences(stub)
        assert torch.equal(got[0], feats) and torch.equal(got[1], mask)


# ------------------------------------------------------------------ scene world
def world(cfg, n=3, px=16, seed=None):
    return scenes.load_scene_world("val", cfg, n=n, image_size=px, seed=seed)


def world_dir(cache, n=3, px=16, seed=0):
    return cache / "scenes" / f"val-n{n}-seed{seed * 1000 + 1}-px{px}-k3-v{scenes.FORMAT_VERSION}"


def same_world(a, b):
    return (np.array_equal(a.images, b.images) and np.array_equal(a.depth, b.depth)
            and np.array_equal(a.masks, b.masks) and a.captions == b.captions and a.meta == b.meta)


@pytest.fixture
def cfg():
    return load_config("ci")


def test_scene_world_records_and_checks_its_meta(tmp_cache, cfg):
    w = world(cfg)
    folder = world_dir(tmp_cache)
    assert w.meta == {"n": 3, "seed": 1, "image_size": 16, "captions_per_image": 3, "format_version": 1, "split": "val"}
    with np.load(folder / "arrays.npz") as arrays:
        assert json.loads(str(arrays["meta"])) == w.meta
    assert json.loads((folder / "scenes.json").read_text())["meta"] == w.meta
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same_world(world(cfg), w)
    assert no_temporaries(tmp_cache)


@pytest.mark.parametrize("name, keep", [("arrays.npz", 0.5), ("arrays.npz", 0.0), ("scenes.json", 0.5),
                                        ("scenes.json", 0.0)])
def test_truncated_scene_world_is_regenerated(tmp_cache, cfg, name, keep):
    w = world(cfg)
    truncate(world_dir(tmp_cache) / name, keep)
    with pytest.warns(CacheWarning, match=rf"scene world .*{name} cannot be read .*; regenerating it"):
        again = world(cfg)
    assert same_world(again, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same_world(world(cfg), w)  # the rewritten entry is good


def test_truncated_scene_world_raises_with_the_path_when_loaded_directly(tmp_cache, cfg):
    world(cfg)
    folder = world_dir(tmp_cache)
    truncate(folder / "arrays.npz")
    with pytest.raises(ValueError, match=rf"scene world {folder / 'arrays.npz'} cannot be read .*delete the folder"):
        scenes.SceneWorld.load(folder)


def test_scene_world_under_another_key_is_not_used(tmp_cache, cfg):
    small = world(cfg, px=16)
    big_dir = world_dir(tmp_cache, px=24)
    shutil.copytree(world_dir(tmp_cache, px=16), big_dir)  # a 16-px world stored under the 24-px key
    with pytest.warns(CacheWarning, match=r"was generated with other settings: image_size=16 \(expected 24\)"):
        big = world(cfg, px=24)
    assert big.images.shape == (3, 24, 24, 3) and big.meta["image_size"] == 24
    assert not np.array_equal(big.images[:, :16, :16], small.images)


def test_scene_world_with_files_of_two_worlds_is_not_used(tmp_cache, cfg):
    w0 = world(cfg, seed=0)
    w1 = world(cfg, seed=1)
    shutil.copy(world_dir(tmp_cache, seed=1) / "arrays.npz", world_dir(tmp_cache, seed=0) / "arrays.npz")
    with pytest.warns(CacheWarning, match=r"arrays.npz and scenes.json from two different worlds"):
        again = world(cfg, seed=0)
    assert same_world(again, w0) and not np.array_equal(w0.images, w1.images)


def test_scene_world_with_wrong_shapes_or_lengths_is_not_used(tmp_cache, cfg):
    w = world(cfg)
    folder = world_dir(tmp_cache)
    payload = json.loads((folder / "scenes.json").read_text())
    payload["captions"]["hi"] = payload["captions"]["hi"][:2]
    (folder / "scenes.json").write_text(json.dumps(payload, ensure_ascii=False))
    with pytest.warns(CacheWarning, match=r"holds 2 captions\['hi'\], expected 3"):
        assert same_world(world(cfg), w)
    # arrays of the legacy format (no meta inside) with a wrong shape
    np.savez_compressed(folder / "arrays.npz", images=w.images[:2], depth=w.depth, masks=w.masks)
    with pytest.warns(CacheWarning, match=r"holds images of shape \(2, 16, 16, 3\), expected \(3, 16, 16, 3\)"):
        assert same_world(world(cfg), w)


def test_legacy_scene_world_without_array_meta_is_still_used(tmp_cache, cfg):
    w = world(cfg)
    folder = world_dir(tmp_cache)
    np.savez_compressed(folder / "arrays.npz", images=w.images, depth=w.depth, masks=w.masks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same_world(world(cfg), w)


def test_interrupted_scene_world_write_leaves_nothing_a_later_run_uses(tmp_cache, cfg, monkeypatch):
    real = np.savez_compressed

    def dying(f, **arrays):
        real(f, **arrays)
        f.flush()
        f.truncate(f.tell() // 2)
        raise Interrupted("killed")

    monkeypatch.setattr(np, "savez_compressed", dying)
    with pytest.raises(Interrupted):
        world(cfg)
    folder = world_dir(tmp_cache)
    assert not (folder / "arrays.npz").exists() and not (folder / "scenes.json").exists()
    assert no_temporaries(tmp_cache)
    monkeypatch.undo()
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_cache))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = world(cfg)
    assert same_world(w, scenes.SceneWorld.load(folder))


def test_interrupted_json_write_keeps_no_half_file(tmp_cache, cfg, monkeypatch):
    w = world(cfg)
    folder = world_dir(tmp_cache)
    (folder / "scenes.json").unlink()

    def dying_write_text(self, text, *args, **kwargs):
        with open(self, "w", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
        raise Interrupted("killed")

    monkeypatch.setattr(type(folder), "write_text", dying_write_text)
    with pytest.raises(Interrupted):
        w.save(folder)
    monkeypatch.undo()
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_cache))
    assert not (folder / "scenes.json").exists() and no_temporaries(tmp_cache)
    assert same_world(world(cfg), w)

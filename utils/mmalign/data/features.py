"""Frozen features of the scene world, computed once and cached: what most chapters train on.

    train = scene_features("train", cfg)      # images (N, 1280), captions (N*K, 384), ids
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config, load_config
from ..models.encoders import encode_cached
from .scenes import SceneWorld, load_scene_world


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


def prepare(cfg: Config, progress: bool = True) -> None:
    """Generate the profile's scene world and cache every frozen feature the chapters read: images,
    English captions, colour-mapped depth (chapter 5) and multilingual e5 captions (chapter 6)."""
    import time

    from ..experiments.depth import depth_features
    from ..experiments.languages import cache_e5_features

    for split in ("train", "val", "test"):
        start = time.perf_counter()
        fs = scene_features(split, cfg, progress=progress)
        depth_features(fs.world, progress=progress)
        print(f"[{cfg.profile}] {split:5s}: {len(fs.world)} scenes, {len(fs.texts)} captions, "
              f"image {tuple(fs.image.shape)}, text {tuple(fs.text.shape)}, depth features "
              f"in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    cache_e5_features(cfg, progress=progress)
    print(f"[{cfg.profile}] e5 features in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> None:
    """``python -m mmalign.data.features``: generate the profile's scene world and cache its features."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--profile", default=None, help="ci | full | gpu (default: MMALIGN_PROFILE or ci)")
    args = parser.parse_args(argv)
    cfg = load_config(args.profile).replace(num_threads=None)
    torch.set_num_threads(os.cpu_count() or 1)  # encoding big batches uses every core
    prepare(cfg, progress=False)


if __name__ == "__main__":
    main()

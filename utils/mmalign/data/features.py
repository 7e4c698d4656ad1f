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


def main(argv: list[str] | None = None) -> None:
    """``python -m mmalign.data.features``: generate the profile's scene world and cache its features."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--profile", default=None, help="ci | full | gpu (default: MMALIGN_PROFILE or ci)")
    parser.add_argument("--langs", default="en", help="comma-separated caption languages to encode")
    args = parser.parse_args(argv)
    cfg = load_config(args.profile)
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    for split in ("train", "val", "test"):
        for lang in args.langs.split(","):
            start = time.perf_counter()
            fs = scene_features(split, cfg, lang)
            print(f"[{cfg.profile}] {split:5s} {lang}: {len(fs.world)} scenes, {len(fs.texts)} captions, "
                  f"image {tuple(fs.image.shape)}, text {tuple(fs.text.shape)} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

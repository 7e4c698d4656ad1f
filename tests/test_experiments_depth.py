"""Chapter 05's experiment pieces: the RGB-D image heads, caption groups and relation swaps."""

import numpy as np
import pytest
import torch

from mmalign.data import captions as cap
from mmalign.data.scenes import generate_scenes
from mmalign.experiments.depth import (VARIANTS, RGBDHead, caption_group, caption_groups, depth_images,
                                       relation_swaps)


def features(n=40, rgb_dim=6, depth_dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 + 2 * torch.randn(n, rgb_dim + depth_dim, generator=g, dtype=torch.float64)


def standardised(x):
    return (x - x.mean(0)) / x.std(0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_heads_match_their_formulas(variant):
    x = features()
    head = RGBDHead(x, 3, variant, rgb_dim=6).double()
    z = standardised(x)
    r, d = z[:, :6], z[:, 6:]
    out = head(x)
    if variant in ("rgb", "augmented"):
        expected = r @ head.proj_rgb.weight.T + head.proj_rgb.bias
    elif variant == "depth":
        expected = d @ head.proj_depth.weight.T + head.proj_depth.bias
    elif variant == "average":
        f = head.fusion
        expected = 0.5 * (r @ f.proj_rgb.weight.T + f.proj_rgb.bias + d @ f.proj_depth.weight.T + f.proj_depth.bias)
    else:
        expected = z @ head.fusion.proj.weight.T + head.fusion.proj.bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # the standardiser keeps float32 statistics


def test_augmented_view_ignores_depth_at_test_time_but_has_a_depth_view():
    x = features()
    head = RGBDHead(x, 3, "augmented", rgb_dim=6).double()
    y = x.clone()
    y[:, 6:] = torch.randn(len(x), 4, dtype=torch.float64)
    torch.testing.assert_close(head(x), head(y))
    assert not torch.allclose(head.encode_depth(x), head.encode_depth(y))
    with pytest.raises(ValueError, match="augmented"):
        RGBDHead(x, 3, "average", rgb_dim=6).encode_depth(x)


def test_bad_variant_and_shapes():
    with pytest.raises(ValueError, match="unknown variant"):
        RGBDHead(features(), 3, "sum", rgb_dim=6)
    with pytest.raises(ValueError, match="features"):
        RGBDHead(torch.randn(10, 6), 3, "rgb", rgb_dim=6)


def test_caption_groups_and_relation_swaps():
    world = generate_scenes(12, seed=3, image_size=32)
    groups = caption_groups(world)
    assert len(groups) == 12 * world.captions_per_image
    flat_plans = [p for plans in world.plans for p in plans]
    for g, p in zip(groups, flat_plans):
        if p["kind"] == "relation":
            assert g == ("in front / behind" if p["relation"] in ("in front of", "behind") else "left / right")
        else:
            assert g == caption_group(p) and "/" not in g
    true, swapped, ids, rel_groups = relation_swaps(world)
    n_rel = sum(p["kind"] == "relation" for p in flat_plans)
    assert len(true) == len(swapped) == len(ids) == len(rel_groups) == n_rel > 0
    for t, s, i in zip(true, swapped, ids):
        assert t in world.captions["en"][i] and s != t
        # exactly the relation words differ: swapping back gives the original
        assert any(cap._EN_REL[r][0] in s or r in s for r in cap.RELATIONS)


def test_depth_images_are_uint8_colour_images():
    depth = np.stack([np.linspace(1, 5, 64, dtype=np.float32).reshape(8, 8), np.full((8, 8), 2.0, np.float32)])
    img = depth_images(depth)
    assert img.shape == (2, 8, 8, 3) and img.dtype == np.uint8
    assert len({tuple(px) for px in img[1].reshape(-1, 3)}) == 1  # a constant map is one colour
    assert not np.array_equal(img[0, 0, 0], img[0, -1, -1])  # near and far get different colours

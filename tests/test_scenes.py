"""The scene world: rendering against analytic ray casts, masks, relations, trilingual captions, hard
negatives, graded pairs, caching and the data set."""

import functools
import math
import re
import time

import numpy as np
import pytest
import torch

import mmalign.data.scenes as scenes
from mmalign.config import load_config
from mmalign.data import captions as cap
from mmalign.data.render import SKY_DEPTH, camera_rays, render
from mmalign.data.scenes import (SceneCaptionDataset, SceneWorld, generate_scenes, graded_caption_pairs,
                                 load_scene_world, relations_of)


@pytest.fixture(scope="module")
def world():
    return generate_scenes(120, seed=1, image_size=32)


# ---------------------------------------------------------------- determinism, shapes
def test_generate_is_deterministic_per_seed():
    a, b, c = generate_scenes(15, 3, 24), generate_scenes(15, 3, 24), generate_scenes(15, 4, 24)
    for name in ("images", "depth", "masks"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.captions == b.captions and a.graphs == b.graphs and a.hard_negatives == b.hard_negatives
    assert not np.array_equal(a.images, c.images)
    assert a.captions["en"] != c.captions["en"]


def test_shapes_and_dtypes(world):
    n = len(world)
    assert n == 120 and world.captions_per_image == 3
    assert world.images.shape == (n, 32, 32, 3) and world.images.dtype == np.uint8
    assert world.depth.shape == (n, 32, 32) and world.depth.dtype == np.float32
    assert world.masks.shape == (n, 32, 32) and world.masks.dtype == np.uint8
    assert (world.depth > 0).all() and (world.depth <= SKY_DEPTH).all()
    for lang in cap.LANGUAGES:
        assert len(world.captions[lang]) == n and all(len(c) == 3 for c in world.captions[lang])
        assert len(world.hard_negatives[lang]) == n
    for i, graph in enumerate(world.graphs):
        ids = set(np.unique(world.masks[i]).tolist())
        assert ids <= set(range(len(graph["objects"]) + 1)) and max(ids) >= 1
        assert 1 <= len(graph["objects"]) <= 3
    assert world.meta["seed"] == 1 and world.meta["image_size"] == 32
    with pytest.raises(ValueError, match="n must be positive"):
        generate_scenes(0, 0)


# ---------------------------------------------------------------- rendering against analytic geometry
SIZE = 32


@functools.lru_cache(maxsize=None)
def _camera(size):
    return camera_rays(size)


def ray(row, col, size=SIZE):
    origin, dirs, forward = _camera(size)
    return origin, dirs[row * size + col], forward


def centre_on_ray(row, col, height):
    """The ground position (x, z) whose point at ``height`` lies on the ray of pixel (row, col)."""
    o, d, _ = ray(row, col)
    t = (height - o[1]) / d[1]
    return o[0] + t * d[0], o[2] + t * d[2], t


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def test_sphere_depth_matches_hand_solved_ray_sphere_intersection():
    r, row, col = 0.52, 20, 12
    cx, cz, _ = centre_on_ray(row, col, r)
    rgb, depth, mask = render([{"shape": "sphere", "x": cx, "z": cz, "radius": r, "rgb": (0.9, 0.1, 0.1)}], SIZE)
    o, d, f = ray(row, col)
    oc = [o[0] - cx, o[1] - r, o[2] - cz]
    b = dot(d, oc)
    c = dot(oc, oc) - r * r
    s = -b - math.sqrt(b * b - c)  # the near root: the front surface
    expected = s * dot(d, f)  # camera-space z of the hit point
    assert depth[row, col] == pytest.approx(expected, rel=1e-6)
    # the ray passes through the centre, so the front hit is one radius before it
    t_centre = math.sqrt(sum((ci - oi) ** 2 for ci, oi in zip((cx, r, cz), o)))
    assert s == pytest.approx(t_centre - r, rel=1e-9)
    assert mask[row, col] == 1
    assert rgb[row, col, 0] > 2 * rgb[row, col, 1]  # red object

    # ground pixels: the plane y = 0 hit at t = -o_y / d_y
    checked = 0
    for rr in range(SIZE):
        for cc in range(SIZE):
            o, d, f = ray(rr, cc)
            if mask[rr, cc] != 0 or d[1] >= 0:
                continue
            z = (-o[1] / d[1]) * dot(d, f)
            if z < SKY_DEPTH:
                assert depth[rr, cc] == pytest.approx(z, rel=1e-6), (rr, cc)
                checked += 1
            else:  # beyond the far plane: clamped
                assert depth[rr, cc] == SKY_DEPTH
    assert checked > 400
    # sky: rays going up hit nothing
    sky = [(rr, cc) for rr in range(SIZE) for cc in range(SIZE) if ray(rr, cc)[1][1] >= 0]
    assert len(sky) >= SIZE
    assert all(depth[p] == SKY_DEPTH and mask[p] == 0 for p in sky)


def test_cube_depth_matches_hand_solved_slab_intersection():
    r, row, col = 0.52, 22, 20
    cx, cz, t_centre = centre_on_ray(row, col, r)
    _, depth, mask = render([{"shape": "cube", "x": cx, "z": cz, "radius": r, "rgb": (0.1, 0.1, 0.9)}], SIZE)
    o, d, f = ray(row, col)
    centre = (cx, r, cz)
    t_enter = max(min((centre[a] - r - o[a]) / d[a], (centre[a] + r - o[a]) / d[a]) for a in range(3))
    assert mask[row, col] == 1
    assert depth[row, col] == pytest.approx(t_enter * dot(d, f), rel=1e-6)
    assert t_enter < t_centre


@pytest.mark.parametrize("shape,centre_height", [("cylinder", 1.1), ("cone", 1.25)])
def test_other_shapes_are_hit_in_front_of_their_centre(shape, centre_height):
    r, row, col = 0.52, 22, 16
    cx, cz, t_centre = centre_on_ray(row, col, centre_height * r)
    _, depth, mask = render([{"shape": shape, "x": cx, "z": cz, "radius": r, "rgb": (0.5, 0.5, 0.5)}], SIZE)
    o, d, f = ray(row, col)
    z_centre = t_centre * dot(d, f)
    assert mask[row, col] == 1
    assert z_centre - 1.2 * r < depth[row, col] < z_centre


def test_mask_ids_follow_object_order_and_size():
    r = 0.32
    x1, z1, _ = centre_on_ray(20, 8, r)
    x2, z2, _ = centre_on_ray(20, 24, r)
    a = {"shape": "sphere", "x": x1, "z": z1, "radius": r, "rgb": (1, 0, 0)}
    b = {"shape": "cube", "x": x2, "z": z2, "radius": r, "rgb": (0, 0, 1)}
    _, _, m = render([a, b], SIZE)
    assert (m[20, 8], m[20, 24]) == (1, 2)
    _, _, m_swapped = render([b, a], SIZE)
    assert (m_swapped[20, 8], m_swapped[20, 24]) == (2, 1)
    assert np.array_equal(m_swapped == 1, m == 2)
    small = render([dict(a, radius=0.32)], SIZE)[2]
    large = render([dict(a, radius=0.52)], SIZE)[2]
    assert (large == 1).sum() > 1.8 * (small == 1).sum() > 0


# ---------------------------------------------------------------- relations
def test_relations_of_hand_made():
    objs = [{"x": -1.45, "z": 0.0}, {"x": 0.0, "z": 2.3}, {"x": 1.45, "z": 0.1}]
    assert relations_of(objs) == [[0, "left of", 1], [0, "in front of", 1], [0, "left of", 2],
                                  [1, "left of", 2], [2, "in front of", 1]]
    # thresholds are strict: 0.85 apart in x or 1.1 apart in z is no relation
    assert relations_of([{"x": 0.0, "z": 0.0}, {"x": 0.85, "z": 1.1}]) == []
    assert relations_of([{"x": 0.0, "z": 0.0}]) == []


def test_graph_relations_match_object_positions(world):
    for g in world.graphs:
        assert g["relations"] == relations_of(g["objects"])


# ---------------------------------------------------------------- captions
HI_COLOR = {"red": ("लाल",), "green": ("हरा", "हरे"), "blue": ("नीला", "नीले"), "yellow": ("पीला", "पीले"),
            "purple": ("बैंगनी",), "white": ("सफ़ेद",), "orange": ("नारंगी",), "brown": ("भूरा", "भूरे")}
HI_OBLIQUE = {"green": "हरे", "blue": "नीले", "yellow": "पीले", "brown": "भूरे"}
HI_SHAPE = {"sphere": ("गोला", "गोले"), "cube": ("घन",), "cylinder": ("बेलन",), "cone": ("शंकु",)}
JA_COLOR = {"red": "赤", "green": "緑", "blue": "青", "yellow": "黄色", "purple": "紫", "white": "白",
            "orange": "オレンジ", "brown": "茶色"}
JA_SHAPE = {"sphere": "球", "cube": "立方体", "cylinder": "円柱", "cone": "円錐"}
JA_REL = {"left of": "の左に", "right of": "の右に", "in front of": "の前に", "behind": "の後ろに"}
LATIN = re.compile("[A-Za-z]")


def test_captions_mention_every_object_in_the_right_script(world):
    for i, graph in enumerate(world.graphs):
        for k, plan in enumerate(world.plans[i]):
            en, hi, ja = (world.captions[lang][i][k] for lang in ("en", "hi", "ja"))
            assert re.search("[\u0900-\u097F]", hi) and not LATIN.search(hi), hi
            assert re.search("[\u3040-\u30ff\u4e00-\u9fff]", ja) and not LATIN.search(ja), ja
            for j in plan["objects"]:
                o = graph["objects"][j]
                assert re.search(rf"\b{o['color']} {o['shape']}\b", en.lower()), en
                assert any(w in hi for w in HI_COLOR[o["color"]]) and any(w in hi for w in HI_SHAPE[o["shape"]]), hi
                assert JA_COLOR[o["color"]] in ja and JA_SHAPE[o["shape"]] in ja, ja
                if plan["with_size"]:
                    assert f"{o['size']} {o['color']}" in en.lower(), en
                    assert {"small": "小さな", "large": "大きな"}[o["size"]] in ja, ja


def test_relation_captions_grammar(world):
    seen_rel, oblique_checks, sphere_obl, sphere_direct = set(), 0, 0, 0
    for i, graph in enumerate(world.graphs):
        for k, plan in enumerate(world.plans[i]):
            if plan["kind"] != "relation":
                continue
            rel = plan["relation"]
            seen_rel.add(rel)
            en, hi, ja = (world.captions[lang][i][k] for lang in ("en", "hi", "ja"))
            assert rel in en, en
            assert JA_REL[rel] in ja, ja
            subject, reference = (graph["objects"][j] for j in plan["objects"])
            if reference["color"] in HI_OBLIQUE:
                assert HI_OBLIQUE[reference["color"]] in hi, hi
                oblique_checks += 1
            if reference["shape"] == "sphere":
                assert "गोले" in hi, hi
                sphere_obl += 1
            if subject["shape"] == "sphere":
                assert "गोला" in hi, hi
                sphere_direct += 1
    assert seen_rel == set(cap.RELATIONS)
    assert oblique_checks > 10 and sphere_obl > 3 and sphere_direct > 3


def test_realise_hand_made_relation_captions():
    graph = {"objects": [{"shape": "cube", "color": "red", "size": "large", "x": 0.0, "z": 0.0},
                         {"shape": "sphere", "color": "green", "size": "small", "x": 1.45, "z": 0.0}]}
    plan = {"kind": "relation", "objects": [0, 1], "relation": "left of", "with_size": False, "template": 0}
    assert cap.realise(plan, graph, "en") == "A red cube to the left of a green sphere."
    assert cap.realise(plan, graph, "hi") == "हरे गोले के बाईं ओर एक लाल घन है।"
    assert cap.realise(plan, graph, "ja") == "緑の球の左に赤い立方体があります。"
    plan = dict(plan, with_size=True, template=1)
    assert cap.realise(plan, graph, "en") == "There is a large red cube to the left of a small green sphere."
    assert cap.realise(plan, graph, "hi") == "एक बड़ा लाल घन छोटे हरे गोले के बाईं ओर रखा है।"
    assert cap.realise(plan, graph, "ja") == "大きな赤い立方体は小さな緑の球の左にあります。"
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        cap.realise(plan, graph, "fr")


# ---------------------------------------------------------------- hard negatives
NP = re.compile(r"\b(?:(small|large) )?(red|green|blue|yellow|purple|white|orange|brown) (sphere|cube|cylinder|cone)\b")


def english_caption_is_true(caption, graph):
    """An independent reading of an English caption: every noun phrase names an object of the graph
    and a stated relation holds for the positions (left: dx > 0.9, in front: dz > 1.2)."""
    text = caption.lower()
    found = []
    for m in NP.finditer(text):
        size, color, shape = m.groups()
        match = [o for o in graph["objects"] if o["color"] == color and o["shape"] == shape
                 and (size is None or o["size"] == size)]
        if not match:
            return False
        found.append((m, match[0]))
    assert found, caption
    if len(found) == 2:
        (m1, a), (m2, b) = found
        between = text[m1.end():m2.start()]
        rel = next(r for r in ("left of", "right of", "in front of", "behind") if r in between)
        holds = {"left of": b["x"] - a["x"] > 0.9, "right of": a["x"] - b["x"] > 0.9,
                 "in front of": b["z"] - a["z"] > 1.2, "behind": a["z"] - b["z"] > 1.2}
        return holds[rel]
    return True


def test_hard_negatives_are_false_and_differ(world):
    kinds = set()
    for i, graph in enumerate(world.graphs):
        assert all(english_caption_is_true(c, graph) for c in world.captions["en"][i])  # the checker can say yes
        assert not english_caption_is_true(world.hard_negatives["en"][i], graph), world.hard_negatives["en"][i]
        for lang in cap.LANGUAGES:
            assert world.hard_negatives[lang][i] != world.captions[lang][i][0]
        kinds.add(world.hard_negative_kinds[i])
    assert kinds == {"color", "shape", "size", "relation"}


def test_perturb_colour_swap_is_not_the_true_colour():
    graph = {"objects": [{"shape": "cube", "color": "red", "size": "large", "x": 0.0, "z": 0.0}], "relations": []}
    plan = {"kind": "single", "objects": [0], "with_size": False, "template": 0}
    rng = np.random.default_rng(0)
    for _ in range(30):
        new_plan, new_graph, kind = cap.perturb(plan, graph, rng)
        assert kind in ("color", "shape")
        o = new_graph["objects"][0]
        assert (o["color"], o["shape"]) != ("red", "cube") and (o["color"] == "red") != (o["shape"] == "cube")
        assert graph["objects"][0]["color"] == "red"  # the input graph is not modified


# ---------------------------------------------------------------- facts and graded pairs
RED_SPHERE = {"shape": "sphere", "color": "red", "size": "large", "x": -1.45, "z": 0.0}
BLUE_CUBE = {"shape": "cube", "color": "blue", "size": "small", "x": 0.0, "z": 0.0}
GREEN_CONE = {"shape": "cone", "color": "green", "size": "small", "x": 0.0, "z": 0.0}


def test_plan_facts_hand_made():
    g = {"objects": [RED_SPHERE, BLUE_CUBE], "relations": [[0, "left of", 1]]}
    left = {"kind": "relation", "objects": [0, 1], "relation": "left of", "with_size": False, "template": 0}
    right = {"kind": "relation", "objects": [1, 0], "relation": "right of", "with_size": False, "template": 3}
    single = {"kind": "single", "objects": [0], "with_size": True, "template": 0}
    assert cap.plan_facts(left, g) == {("object", "red", "sphere"), ("object", "blue", "cube"),
                                       ("relation", "red", "sphere", "left of", "blue", "cube")}
    assert cap.plan_facts(right, g) == cap.plan_facts(left, g)  # the same fact stated the other way round
    assert cap.plan_facts(single, g) == {("object", "red", "sphere"), ("size", "red", "sphere", "large")}


def test_graded_caption_pairs_hand_worked():
    g_a = {"objects": [RED_SPHERE, BLUE_CUBE], "relations": [[0, "left of", 1]]}
    g_b = {"objects": [GREEN_CONE], "relations": []}
    plans_a = [{"kind": "relation", "objects": [0, 1], "relation": "left of", "with_size": False, "template": 0},
               {"kind": "relation", "objects": [1, 0], "relation": "right of", "with_size": False, "template": 0},
               {"kind": "single", "objects": [0], "with_size": True, "template": 0}]
    plans_b = [{"kind": "single", "objects": [0], "with_size": False, "template": 0},
               {"kind": "single", "objects": [0], "with_size": True, "template": 1},
               {"kind": "single", "objects": [0], "with_size": False, "template": 2}]
    caps = [[cap.realise(p, g, "en") for p in ps] for ps, g in ((plans_a, g_a), (plans_b, g_b))]
    world = SceneWorld(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 4), np.float32),
                       np.zeros((2, 4, 4), np.uint8), [g_a, g_b], {"en": caps}, [plans_a, plans_b],
                       {"en": ["", ""]}, ["color", "color"])
    # Jaccard by hand: a0 = {O red sphere, O blue cube, R}, a1 = a0, a2 = {O red sphere, S red sphere large}
    # -> a0~a1: 3/3, a0~a2: 1/4; b0 = b2 = {O green cone}, b1 = b0 + {S green cone small} -> b0~b1: 1/2.
    jacc_a = [[1, 1, 1 / 4], [1, 1, 1 / 4], [1 / 4, 1 / 4, 1]]
    jacc_b = [[1, 1 / 2, 1], [1 / 2, 1, 1 / 2], [1, 1 / 2, 1]]
    where = {c: (s, k) for s in range(2) for k, c in enumerate(caps[s])}
    a_texts, b_texts, grades = graded_caption_pairs(world, 60, seed=0)
    assert len(a_texts) == len(b_texts) == len(grades) == 60
    for a, b, grade in zip(a_texts, b_texts, grades):
        (s1, k1), (s2, k2) = where[a], where[b]
        expected = 0.0 if s1 != s2 else 5 * (jacc_a if s1 == 0 else jacc_b)[k1][k2]
        assert grade == pytest.approx(expected), (a, b)
        if a == b:
            assert grade == 5.0
    assert {0.0, 1.25, 2.5, 5.0} <= {round(g, 4) for g in grades}


def test_graded_pairs_on_generated_world(world):
    a, b, grades = graded_caption_pairs(world, 200, seed=1, lang="ja")
    assert all(0.0 <= g <= 5.0 for g in grades)
    assert all(g == 5.0 for x, y, g in zip(a, b, grades) if x == y)
    same_scene = grades[0::2]  # even pairs come from one scene
    assert np.mean(same_scene) > np.mean(grades[1::2])


# ---------------------------------------------------------------- cache and data set
def test_load_scene_world_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path))
    cfg = load_config("ci")
    first = load_scene_world("val", cfg, n=5, image_size=16)
    folder = tmp_path / "scenes" / "val-n5-seed1-px16-k3-v1"
    assert (folder / "arrays.npz").exists() and (folder / "scenes.json").exists()

    def boom(*a, **k):
        raise AssertionError("generate_scenes called although the split is cached")

    monkeypatch.setattr(scenes, "generate_scenes", boom)
    second = load_scene_world("val", cfg, n=5, image_size=16)
    for name in ("images", "depth", "masks"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert second.captions == first.captions and second.graphs == first.graphs and second.plans == first.plans
    assert second.hard_negatives == first.hard_negatives and second.meta["split"] == "val"
    with pytest.raises(AssertionError, match="although the split is cached"):
        load_scene_world("test", cfg, n=5, image_size=16)  # another split is another key
    with pytest.raises(ValueError, match="split must be one of"):
        load_scene_world("dev", cfg)


def test_scene_world_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no scene world at .*load_scene_world\(split, cfg\)"):
        SceneWorld.load(tmp_path / "nothing")


def test_scene_caption_dataset(world):
    ds = SceneCaptionDataset(world, "hi")
    assert len(ds) == 3 * len(world)
    texts, ids = world.caption_table("hi")
    assert np.array_equal(ids, np.repeat(np.arange(len(world)), 3))
    for i in (0, 4, len(ds) - 1):
        item = ds[i]
        scene = i // 3
        assert item["item_id"] == scene and item["caption"] == world.captions["hi"][scene][i % 3]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert torch.equal(item["image"], torch.from_numpy(world.images[scene]).permute(2, 0, 1).float() / 255)
        assert torch.equal(item["depth"][0], torch.from_numpy(world.depth[scene]))
    with pytest.raises(ValueError, match="lang must be one of"):
        SceneCaptionDataset(world, "fr")


def test_ci_train_split_generates_fast():
    cfg = load_config("ci")
    start, cpu_start = time.perf_counter(), time.process_time()
    w = generate_scenes(cfg.n_train, seed=0, image_size=cfg.image_size)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert len(w) == cfg.n_train and w.images.shape[1:3] == (cfg.image_size, cfg.image_size)
    # CPU time, so that other jobs on a shared runner do not make it flaky (about 6 s on an idle 2-core box)
    assert cpu < 20, f"generating the CI train split took {cpu:.1f} s of CPU ({wall:.1f} s wall)"

"""The scene world: a synthetic, fully known multimodal data set that the course generates itself.

Each scene holds 1-3 objects (sphere, cube, cylinder, cone; 8 colours; 2 sizes) on a checkered
ground plane. For every scene we know the RGB image, the exact per-pixel depth, the instance masks,
the scene graph, several captions in English, Hindi and Japanese (parallel across languages), a hard
negative caption per language (one attribute or the relation swapped), and graded caption pairs.

Typical use::

    world = load_scene_world("train", cfg)        # generated once, then read from the cache
    world.images.shape                            # (N, H, W, 3) uint8
    world.captions["hi"][0]                       # the Hindi captions of scene 0
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checks import check_int
from ..config import Config, cache_dir, load_config
from . import captions as cap
from .cache import CacheWarning, atomic_write, atomic_write_text
from .render import render

FORMAT_VERSION = 1
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}
COLOR_RGB = {"red": (0.85, 0.12, 0.10), "green": (0.12, 0.68, 0.22), "blue": (0.14, 0.30, 0.90),
             "yellow": (0.93, 0.82, 0.10), "purple": (0.55, 0.22, 0.75), "white": (0.95, 0.95, 0.95),
             "orange": (0.96, 0.50, 0.08), "brown": (0.50, 0.30, 0.14)}
SIZE_RADIUS = {"small": 0.32, "large": 0.52}
# Object slots: three columns (left, middle, right) by two rows (front, back), with jitter.
_SLOT_X = (-1.45, 0.0, 1.45)
_SLOT_Z = (0.0, 2.3)


@dataclass
class SceneWorld:
    """One split of the scene world. Arrays are numpy; scene i (its item id) is row i of every array."""

    images: np.ndarray  # (N, H, W, 3) uint8
    depth: np.ndarray  # (N, H, W) float32, camera-space z
    masks: np.ndarray  # (N, H, W) uint8, 0 = background, i+1 = object i
    graphs: list  # N scene graphs: {"objects": [...], "relations": [[a, rel, b], ...]}
    captions: dict  # lang -> N lists of captions
    plans: list  # N lists of caption plans (language-free)
    hard_negatives: dict  # lang -> N captions that are wrong for the scene in one word
    hard_negative_kinds: list  # N kinds of swap: color | shape | size | relation
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.graphs)

    @property
    def captions_per_image(self) -> int:
        return len(self.captions["en"][0])

    def caption_table(self, lang: str = "en") -> tuple[list[str], np.ndarray]:
        """All captions of ``lang`` flattened, and their scene ids: (N*K strings, (N*K,) int64)."""
        _check_lang(lang, self.captions)
        texts = [c for per_scene in self.captions[lang] for c in per_scene]
        ids = np.repeat(np.arange(len(self)), [len(c) for c in self.captions[lang]])
        return texts, ids

    def save(self, path: Path) -> None:
        """Write ``arrays.npz`` then ``scenes.json``, each atomically (temporary file, then rename); both
        record :attr:`meta`, so a half-written or mixed-up folder is detected by :meth:`load`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(self.meta, sort_keys=True)

        def write_arrays(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez_compressed(f, images=self.images, depth=self.depth, masks=self.masks, meta=np.array(meta))

        atomic_write(path / "arrays.npz", write_arrays)
        payload = {k: getattr(self, k) for k in ("graphs", "captions", "plans", "hard_negatives",
                                                  "hard_negative_kinds", "meta")}
        atomic_write_text(path / "scenes.json", json.dumps(payload, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path, expect: dict | None = None) -> "SceneWorld":
        """Read a world written by :meth:`save`; a truncated, inconsistent or (with ``expect``, a dict of
        meta values) mismatched folder raises a ValueError naming the path and the fix."""
        path = Path(path)
        if not (path / "arrays.npz").exists() or not (path / "scenes.json").exists():
            raise FileNotFoundError(
                f"no scene world at {path} (expected arrays.npz and scenes.json there); generate it with "
                "mmalign.data.scenes.load_scene_world(split, cfg), which writes it to the cache"
            )
        fix = "delete the folder and call load_scene_world again to regenerate it"
        try:
            with np.load(path / "arrays.npz") as arrays:
                images, depth, masks = arrays["images"], arrays["depth"], arrays["masks"]
                array_meta = json.loads(str(arrays["meta"])) if "meta" in arrays.files else None
        except Exception as err:  # truncated zip, bad CRC, not an npz
            raise ValueError(f"scene world {path / 'arrays.npz'} cannot be read ({type(err).__name__}: "
                             f"{str(err)[:120]}); {fix}") from None
        try:
            payload = json.loads((path / "scenes.json").read_text(encoding="utf-8"))
            world = cls(images=images, depth=depth, masks=masks, **payload)
        except Exception as err:
            raise ValueError(f"scene world {path / 'scenes.json'} cannot be read ({type(err).__name__}: "
                             f"{str(err)[:120]}); {fix}") from None
        problem = world._inconsistency(array_meta, expect)
        if problem:
            raise ValueError(f"scene world at {path} {problem}; {fix}")
        return world

    def _inconsistency(self, array_meta: dict | None, expect: dict | None) -> str | None:
        """Why the loaded arrays and lists do not form the world their meta describes (None if they do)."""
        meta = self.meta
        if array_meta is not None and array_meta != meta:
            return "has arrays.npz and scenes.json from two different worlds (their meta differ)"
        if expect:
            diff = sorted(k for k in expect if meta.get(k) != expect[k])
            if diff:
                return "was generated with other settings: " + ", ".join(
                    f"{k}={meta.get(k)!r} (expected {expect[k]!r})" for k in diff)
        n, px = meta.get("n"), meta.get("image_size")
        if n is not None and px is not None:
            shapes = {"images": (n, px, px, 3), "depth": (n, px, px), "masks": (n, px, px)}
            for name, shape in shapes.items():
                if getattr(self, name).shape != shape:
                    return f"holds {name} of shape {getattr(self, name).shape}, expected {shape}"
        n = len(self.graphs) if n is None else n
        lists = {"graphs": self.graphs, "plans": self.plans, "hard_negative_kinds": self.hard_negative_kinds}
        lists.update({f"captions[{lang!r}]": c for lang, c in self.captions.items()})
        for name, value in lists.items():
            if len(value) != n:
                return f"holds {len(value)} {name}, expected {n}"
        return None


def sample_graph(rng: np.random.Generator, max_objects: int = 3) -> dict:
    """A random scene graph: 1..max_objects objects in distinct slots, distinct (colour, shape) pairs."""
    check_int("max_objects", max_objects, minimum=1, maximum=len(_SLOT_X) * len(_SLOT_Z))
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    n = int(rng.integers(1, max_objects + 1))
    slots = rng.choice(len(_SLOT_X) * len(_SLOT_Z), size=n, replace=False)
    combos = rng.choice(len(cap.COLORS) * len(cap.SHAPES), size=n, replace=False)
    objects = []
    for slot, combo in zip(slots, combos):
        size = cap.SIZES[int(rng.integers(2))]
        objects.append({
            "shape": cap.SHAPES[combo % len(cap.SHAPES)], "color": cap.COLORS[combo // len(cap.SHAPES)],
            "size": size,
            "x": float(_SLOT_X[slot % 3] + rng.uniform(-0.15, 0.15)),
            "z": float(_SLOT_Z[slot // 3] + rng.uniform(-0.15, 0.15)),
        })
    return {"objects": objects, "relations": relations_of(objects)}


def relations_of(objects: list[dict]) -> list:
    """Spatial relations between every ordered pair, canonical direction only ("left of", "in front of")."""
    rels = []
    for a, oa in enumerate(objects):
        for b, ob in enumerate(objects):
            if a == b:
                continue
            if ob["x"] - oa["x"] > 0.9:
                rels.append([a, "left of", b])
            if ob["z"] - oa["z"] > 1.2:
                rels.append([a, "in front of", b])
    return rels


def generate_scenes(n: int, seed: int, image_size: int = 64, captions_per_image: int = 3,
                    progress: bool = False, max_objects: int = 3) -> SceneWorld:
    """Generate ``n`` scenes deterministically from ``seed`` (images, depth, masks, graphs, captions).

    ``image_size`` >= 8 pixels, ``captions_per_image`` >= 1, ``max_objects`` in 1..6 (the slots)."""
    n = check_int("n", n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    check_int("seed", seed, minimum=0)
    check_int("image_size", image_size, minimum=8)
    check_int("captions_per_image", captions_per_image, minimum=1)
    check_int("max_objects", max_objects, minimum=1, maximum=len(_SLOT_X) * len(_SLOT_Z))
    rng = np.random.default_rng(seed)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    depth = np.empty((n, image_size, image_size), np.float32)
    masks = np.empty((n, image_size, image_size), np.uint8)
    graphs, plans = [], []
    captions = {lang: [] for lang in cap.LANGUAGES}
    hard = {lang: [] for lang in cap.LANGUAGES}
    hard_kinds = []
    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="rendering scenes", leave=False)
    for i in iterator:
        graph = sample_graph(rng, max_objects)
        light = (rng.uniform(-0.8, -0.2), 1.0, rng.uniform(-0.9, -0.3))
        objs = [dict(o, radius=SIZE_RADIUS[o["size"]],
                     rgb=tuple(np.clip(np.array(COLOR_RGB[o["color"]]) + rng.normal(0, 0.03, 3), 0, 1)))
                for o in graph["objects"]]
        images[i], depth[i], masks[i] = render(objs, image_size, light=light)
        scene_plans = _distinct_plans(graph, rng, captions_per_image)
        for lang in cap.LANGUAGES:
            captions[lang].append([cap.realise(p, graph, lang) for p in scene_plans])
        neg_plan, neg_graph, kind = cap.perturb(scene_plans[0], graph, rng)
        for lang in cap.LANGUAGES:
            hard[lang].append(cap.realise(neg_plan, neg_graph, lang))
        hard_kinds.append(kind)
        graphs.append(graph)
        plans.append(scene_plans)
    meta = {"n": n, "seed": seed, "image_size": image_size, "captions_per_image": captions_per_image,
            "format_version": FORMAT_VERSION}
    if max_objects != 3:  # recorded when not the default, so the default worlds' meta is unchanged
        meta["max_objects"] = max_objects
    return SceneWorld(images, depth, masks, graphs, captions, plans, hard, hard_kinds, meta)


def _distinct_plans(graph: dict, rng: np.random.Generator, k: int) -> list:
    """``k`` caption plans with different English captions (repeats only when a scene has too few)."""
    plans, seen = [], set()
    for _ in range(8 * k):
        plan = cap.make_plan(graph, rng)
        text = cap.realise(plan, graph, "en")
        if text not in seen:
            plans.append(plan)
            seen.add(text)
            if len(plans) == k:
                return plans
    return plans + [cap.make_plan(graph, rng) for _ in range(k - len(plans))]


def load_scene_world(split: str = "train", cfg: Config | None = None, n: int | None = None,
                     seed: int | None = None, image_size: int | None = None,
                     captions_per_image: int = 3) -> SceneWorld:
    """The ``split`` (train | val | test) of the scene world for ``cfg``'s profile, cached on disk.

    The first call renders and saves it under ``cache_dir('scenes')``; later calls read it back. The
    entry records its meta (n, seed, image size, captions per image, split, format) in both files and
    is checked on load: a truncated, mixed-up or mismatched entry is regenerated (with a
    :class:`~mmalign.data.cache.CacheWarning`), never used.
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {tuple(SPLIT_OFFSETS)}, got {split!r}")
    if cfg is not None and not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a mmalign.config.Config (load_config()), got {type(cfg).__name__}")
    cfg = cfg or load_config()
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split] if n is None else check_int("n", n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n} (None takes the profile's size)")
    seed = check_int("seed", cfg.seed if seed is None else seed, minimum=0) * 1000 + SPLIT_OFFSETS[split]
    image_size = cfg.image_size if image_size is None else check_int("image_size", image_size, minimum=8)
    check_int("captions_per_image", captions_per_image, minimum=1)
    path = cache_dir("scenes") / f"{split}-n{n}-seed{seed}-px{image_size}-k{captions_per_image}-v{FORMAT_VERSION}"
    expect = {"n": n, "seed": seed, "image_size": image_size, "captions_per_image": captions_per_image,
              "format_version": FORMAT_VERSION, "split": split}
    if (path / "scenes.json").exists():
        try:
            return SceneWorld.load(path, expect=expect)
        except ValueError as err:
            warnings.warn(f"{err}; regenerating it", CacheWarning, stacklevel=2)
    world = generate_scenes(n, seed, image_size, captions_per_image, progress=True)
    world.meta["split"] = split
    world.save(path)
    return world


def _check_lang(lang, captions: dict) -> None:
    if lang not in captions:
        raise ValueError(f"unknown language {lang!r}; this world has captions in {tuple(captions)}")


def graded_caption_pairs(world: SceneWorld, n_pairs: int, seed: int = 0, lang: str = "en"):
    """Caption pairs with a similarity grade in [0, 5] (STS-B style) from the facts they share.

    ``grade = 5 * |facts(a) & facts(b)| / |facts(a) | facts(b)|``, where a caption's facts are the
    objects it mentions (colour, shape, and size if stated) and its relation. Half the pairs are two
    captions of one scene (often high grades), half are captions of two random scenes (mostly low).

    Returns three lists: captions a, captions b, grades (float).
    """
    check_int("n_pairs", n_pairs, minimum=0)
    _check_lang(lang, world.captions)
    rng = np.random.default_rng(seed)
    a_texts, b_texts, grades = [], [], []
    k = world.captions_per_image
    for j in range(n_pairs):
        s1 = int(rng.integers(len(world)))
        s2 = s1 if j % 2 == 0 else int(rng.integers(len(world)))
        c1, c2 = int(rng.integers(k)), int(rng.integers(k))
        f1 = cap.plan_facts(world.plans[s1][c1], world.graphs[s1])
        f2 = cap.plan_facts(world.plans[s2][c2], world.graphs[s2])
        a_texts.append(world.captions[lang][s1][c1])
        b_texts.append(world.captions[lang][s2][c2])
        grades.append(5.0 * len(f1 & f2) / len(f1 | f2))
    return a_texts, b_texts, grades


class SceneCaptionDataset(Dataset):
    """(image, depth, caption, item id) for every (scene, caption) pair of one language.

    ``image`` is (3, H, W) float in [0, 1], ``depth`` is (1, H, W) float (camera-space z).
    """

    def __init__(self, world: SceneWorld, lang: str = "en"):
        if lang not in cap.LANGUAGES:
            raise ValueError(f"lang must be one of {cap.LANGUAGES}, got {lang!r}")
        self.world = world
        self.texts, self.ids = world.caption_table(lang)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        scene = int(self.ids[i])
        return {
            "image": torch.from_numpy(self.world.images[scene]).permute(2, 0, 1).float() / 255,
            "depth": torch.from_numpy(self.world.depth[scene])[None],
            "caption": self.texts[i],
            "item_id": scene,
        }


def show_scenes(world: SceneWorld, indices, langs=cap.LANGUAGES, show_depth: bool = True):
    """A figure of scenes (image above, depth below) and an HTML table of their captions.

    Captions go in HTML rather than in the figure because matplotlib's default font has no Devanagari
    or Japanese glyphs while a browser renders them. Returns (figure, html string).
    """
    import html

    import matplotlib.pyplot as plt

    indices = list(indices)
    rows = 2 if show_depth else 1
    fig, axes = plt.subplots(rows, len(indices), figsize=(2.2 * len(indices), 2.2 * rows), squeeze=False)
    for col, i in enumerate(indices):
        axes[0, col].imshow(world.images[i])
        axes[0, col].set_title(f"scene {i}", fontsize=9)
        if show_depth:
            im = axes[1, col].imshow(world.depth[i], cmap="magma_r")
            axes[1, col].set_title("depth (z)", fontsize=9)
        for r in range(rows):
            axes[r, col].axis("off")
    if show_depth:
        fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="camera z")
    cells = "".join(
        f"<tr><td>{i}</td><td>{lang}</td><td>{'<br>'.join(html.escape(c) for c in world.captions[lang][i])}</td></tr>"
        for i in indices for lang in langs)
    table = f"<table><tr><th>scene</th><th>lang</th><th>captions</th></tr>{cells}</table>"
    return fig, table

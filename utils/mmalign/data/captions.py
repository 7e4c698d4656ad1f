"""Captions for scene graphs in English, Hindi and Japanese.

A caption is made in two steps: a language-free *plan* (which objects, which attributes, which
relation) and its *realisation* in one language with one of several templates. The same plan
realised in three languages gives parallel captions, as in the trilingual data of seed 000.

Word order follows each language: English is SVO with prepositions ("a red sphere to the left of a
blue cube"); Hindi is SOV with postpositions and oblique case before them ("नीले घन के बाईं ओर एक
लाल गोला है"); Japanese is SOV with particles ("青い立方体の左に赤い球があります").
"""

from __future__ import annotations

import numpy as np

LANGUAGES = ("en", "hi", "ja")
COLORS = ("red", "green", "blue", "yellow", "purple", "white", "orange", "brown")
SHAPES = ("sphere", "cube", "cylinder", "cone")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "in front of", "behind")
INVERSE = {"left of": "right of", "right of": "left of", "in front of": "behind", "behind": "in front of"}

# --- English ---------------------------------------------------------------------------------------
_EN_REL = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
           "in front of": ("in front of",), "behind": ("behind",)}
_EN_SINGLE = ("{a}.", "There is {a} on the ground.", "A picture of {a}.", "{a} on a checkered floor.")
_EN_REL_T = ("{a} {rel} {b}.", "There is {a} {rel} {b}.", "{a} is {rel} {b}.")
_EN_LIST = ("{a}, {b} and {c}.", "Three objects: {a}, {b} and {c}.", "{a}, {b} and {c} on the ground.")

# --- Hindi: all four shape nouns are masculine; -आ adjectives and nouns take -े in the oblique -------
_HI_COLOR = {"red": "लाल", "green": "हरा", "blue": "नीला", "yellow": "पीला", "purple": "बैंगनी",
             "white": "सफ़ेद", "orange": "नारंगी", "brown": "भूरा"}
_HI_SHAPE = {"sphere": "गोला", "cube": "घन", "cylinder": "बेलन", "cone": "शंकु"}
_HI_SIZE = {"small": "छोटा", "large": "बड़ा"}
_HI_REL = {"left of": "के बाईं ओर", "right of": "के दाईं ओर", "in front of": "के सामने", "behind": "के पीछे"}
_HI_SINGLE = ("एक {a} है।", "ज़मीन पर एक {a} रखा है।", "{a_obl} की तस्वीर।", "यह एक {a} है।")
_HI_REL_T = ("{b_obl} {rel} एक {a} है।", "एक {a} {b_obl} {rel} रखा है।")
_HI_LIST = ("{a}, {b} और {c}।", "तीन वस्तुएँ: {a}, {b} और {c}।", "ज़मीन पर {a}, {b} और {c} हैं।")

# --- Japanese -------------------------------------------------------------------------------------------
_JA_COLOR = {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の",
             "white": "白い", "orange": "オレンジ色の", "brown": "茶色の"}
_JA_SHAPE = {"sphere": "球", "cube": "立方体", "cylinder": "円柱", "cone": "円錐"}
_JA_SIZE = {"small": "小さな", "large": "大きな"}
_JA_REL = {"left of": "左", "right of": "右", "in front of": "前", "behind": "後ろ"}
_JA_SINGLE = ("{a}があります。", "地面に{a}が置いてあります。", "{a}の写真。", "{a}が一つあります。")
_JA_REL_T = ("{b}の{rel}に{a}があります。", "{a}は{b}の{rel}にあります。")
_JA_LIST = ("{a}と{b}と{c}があります。", "{a}、{b}、{c}。", "地面に{a}と{b}と{c}があります。")


def _hi_oblique(word: str) -> str:
    """Oblique singular of a masculine -आ word (हरा -> हरे, गोला -> गोले); other words are unchanged."""
    return word[:-1] + "े" if word.endswith("ा") else word


def noun_phrase(obj: dict, lang: str, with_size: bool, oblique: bool = False) -> str:
    """'a large red sphere' / 'बड़ा लाल गोला' / '大きな赤い球' for one object of a scene graph."""
    if lang == "en":
        words = ([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]]
        article = "an" if words[0][0] in "aeiou" else "a"
        return f"{article} {' '.join(words)}"
    if lang == "hi":
        words = ([_HI_SIZE[obj["size"]]] if with_size else []) + [_HI_COLOR[obj["color"]], _HI_SHAPE[obj["shape"]]]
        return " ".join(_hi_oblique(w) for w in words) if oblique else " ".join(words)
    if lang == "ja":
        return (_JA_SIZE[obj["size"]] if with_size else "") + _JA_COLOR[obj["color"]] + _JA_SHAPE[obj["shape"]]
    raise ValueError(f"unknown language {lang!r}; use one of {LANGUAGES}")


def make_plan(graph: dict, rng: np.random.Generator) -> dict:
    """A language-free caption plan for a scene graph: kind, objects mentioned, relation, template index."""
    objects = graph["objects"]
    plan = {"with_size": bool(rng.random() < 0.5), "template": int(rng.integers(0, 1_000_000))}
    relations = graph["relations"]
    kinds = ["single"] if len(objects) == 1 else ["relation"] + (["list"] if len(objects) == 3 else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    plan["kind"] = kind
    if kind == "single":
        plan["objects"] = [0]
    elif kind == "list":
        plan["objects"] = [int(i) for i in rng.permutation(len(objects))]
    else:
        a, rel, b = relations[int(rng.integers(len(relations)))]
        if rng.random() < 0.5:  # state it either way round: "A left of B" or "B right of A"
            a, rel, b = b, INVERSE[rel], a
        plan["objects"], plan["relation"] = [a, b], rel
    return plan


def realise(plan: dict, graph: dict, lang: str) -> str:
    """The caption of ``plan`` in ``lang`` (one of LANGUAGES)."""
    objs = [graph["objects"][i] for i in plan["objects"]]
    size = plan["with_size"]
    pick = plan["template"]
    if lang == "en":
        if plan["kind"] == "single":
            text = _EN_SINGLE[pick % len(_EN_SINGLE)].format(a=noun_phrase(objs[0], "en", size))
        elif plan["kind"] == "list":
            a, b, c = (noun_phrase(o, "en", size) for o in objs)
            text = _EN_LIST[pick % len(_EN_LIST)].format(a=a, b=b, c=c)
        else:
            words = _EN_REL[plan["relation"]]
            text = _EN_REL_T[pick % len(_EN_REL_T)].format(
                a=noun_phrase(objs[0], "en", size), b=noun_phrase(objs[1], "en", size),
                rel=words[(pick // 7) % len(words)])
        return text[0].upper() + text[1:]
    if lang == "hi":
        if plan["kind"] == "single":
            return _HI_SINGLE[pick % len(_HI_SINGLE)].format(
                a=noun_phrase(objs[0], "hi", size), a_obl=noun_phrase(objs[0], "hi", size, oblique=True))
        if plan["kind"] == "list":
            a, b, c = (noun_phrase(o, "hi", size) for o in objs)
            return _HI_LIST[pick % len(_HI_LIST)].format(a=a, b=b, c=c)
        return _HI_REL_T[pick % len(_HI_REL_T)].format(
            a=noun_phrase(objs[0], "hi", size), b_obl=noun_phrase(objs[1], "hi", size, oblique=True),
            rel=_HI_REL[plan["relation"]])
    if lang == "ja":
        if plan["kind"] == "single":
            return _JA_SINGLE[pick % len(_JA_SINGLE)].format(a=noun_phrase(objs[0], "ja", size))
        if plan["kind"] == "list":
            a, b, c = (noun_phrase(o, "ja", size) for o in objs)
            return _JA_LIST[pick % len(_JA_LIST)].format(a=a, b=b, c=c)
        return _JA_REL_T[pick % len(_JA_REL_T)].format(
            a=noun_phrase(objs[0], "ja", size), b=noun_phrase(objs[1], "ja", size), rel=_JA_REL[plan["relation"]])
    raise ValueError(f"unknown language {lang!r}; use one of {LANGUAGES}")


def perturb(plan: dict, graph: dict, rng: np.random.Generator) -> tuple[dict, dict, str]:
    """A hard negative: the same plan on a graph with one attribute or the relation swapped.

    Returns the new plan, the changed graph and the kind of swap (``color``, ``shape``, ``size`` or
    ``relation``). The caption it gives is wrong for the image but differs from a true one in one word.
    """
    graph = {"objects": [dict(o) for o in graph["objects"]], "relations": list(graph["relations"])}
    plan = dict(plan)
    options = ["color", "shape"] + (["relation"] if plan["kind"] == "relation" else []) + (
        ["size"] if plan["with_size"] else [])
    kind = options[int(rng.integers(len(options)))]
    if kind == "relation":
        plan["relation"] = INVERSE[plan["relation"]]
        return plan, graph, kind
    target = graph["objects"][plan["objects"][int(rng.integers(len(plan["objects"])))]]
    pool = {"color": COLORS, "shape": SHAPES, "size": SIZES}[kind]
    taken = {(o["color"], o["shape"]) for o in graph["objects"]}
    choices = [v for v in pool if v != target[kind]
               and (kind == "size" or (v if kind == "color" else target["color"],
                                       v if kind == "shape" else target["shape"]) not in taken)]
    target[kind] = choices[int(rng.integers(len(choices)))]
    return plan, graph, kind


def plan_facts(plan: dict, graph: dict) -> set:
    """The facts a caption states: each mentioned object, its size if said, and the relation."""
    objs = graph["objects"]
    facts = set()
    for i in plan["objects"]:
        facts.add(("object", objs[i]["color"], objs[i]["shape"]))
        if plan["with_size"]:
            facts.add(("size", objs[i]["color"], objs[i]["shape"], objs[i]["size"]))
    if plan["kind"] == "relation":
        a, b = plan["objects"]
        rel = plan["relation"]
        if rel in ("right of", "behind"):  # one canonical direction per relation
            a, b, rel = b, a, INVERSE[rel]
        facts.add(("relation", objs[a]["color"], objs[a]["shape"], rel, objs[b]["color"], objs[b]["shape"]))
    return facts

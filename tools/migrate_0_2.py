"""Rewrite calls of the mmalign 0.1 API into the 0.2 spelling (one vocabulary, settings by keyword).

Usage: ``python tools/migrate_0_2.py FILE.py [...]`` rewrites the files in place and prints what it
changed; ``--check`` only reports (exit status 1 when something would change). Works on plain Python
and on jupytext percent notebooks; a file containing the line ``# migrate_0_2: skip`` is left alone. What it cannot see (a call through another name, ``*args`` or
``**kwargs``) it leaves alone: run your code with ``MMALIGN_DEPRECATIONS=error`` to find the rest.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Spec:
    n_positional: int  # arguments that stay positional (the tensors)
    old_order: tuple[str, ...] = ()  # 0.1 names of the arguments that followed them
    id_pairs: dict = field(default_factory=dict)  # {(first, second): new}
    renamed: dict = field(default_factory=dict)  # {old: new}


SKIP_MARKER = "# migrate_0_2: skip"
_PAIR = {("labels_a", "labels_b"): "ids"}
SPECS = {
    "info_nce": Spec(2, ("temperature", "labels_a", "labels_b", "normalize", "negatives"), _PAIR),
    "mms_loss": Spec(2, ("margin", "temperature", "item_ids", "normalize", "negatives"), renamed={"item_ids": "ids"}),
    "contrastive_loss": Spec(1, ("item_ids", "margin", "eps", "negatives"), renamed={"item_ids": "ids"}),
    "moco_loss": Spec(3, ("temperature", "q_ids", "queue_ids"), {("q_ids", "queue_ids"): "ids"}),
    "triplet_loss": Spec(3, ("margin", "reduction")),
    "triplet_loss_embeddings": Spec(4, ("margin", "reduction")),
    "hypersphere_loss": Spec(2, ("alpha", "t", "lambda_align", "lambda_uniform", "log_uniformity")),
    "multiview_loss": Spec(1, ("mode", "pair_loss", "weights", "reduction", "detach_anchor"), _PAIR),
    "cosine_embedding_loss": Spec(3, ("margin",)),
    "make_signed_pairs": Spec(1, ("negatives_per_positive", "generator", "item_ids"), renamed={"item_ids": "ids"}),
    "random_negatives": Spec(1, ("img_ids", "txt_ids", "k", "generator"), {("img_ids", "txt_ids"): "ids"}),
    "hardest_negatives": Spec(1, ("img_ids", "txt_ids", "k"), {("img_ids", "txt_ids"): "ids"}),
    "semi_hard_negatives": Spec(1, ("img_ids", "txt_ids", "margin", "k", "fallback", "pos_for_images",
                                    "pos_for_texts"), {("img_ids", "txt_ids"): "ids"}),
    "margin_violation_fraction": Spec(3, ("margin", "pos_for_images", "pos_for_texts")),
    "anchor_negative_gaps": Spec(3, ("pos_for_images", "pos_for_texts")),
    "select_violators": Spec(1, ("k", "margin", "row_ids", "col_ids", "pos_for_cols"), {("row_ids", "col_ids"): "ids"}),
    "write": Spec(99, renamed={"item_ids": "ids"}),
    "enqueue": Spec(99, renamed={"item_ids": "ids"}),
    "distill_contrastive_loss": Spec(2, ("ids", "queue", "queue_ids", "temperature", "alpha", "q_teacher"),
                                     {("ids", "queue_ids"): "ids"}),
    "sample_hard_negatives": Spec(1, ("row_ids", "col_ids", "temperature", "generator"), {("row_ids", "col_ids"): "ids"}),
    "codebook_targets": Spec(2, ("solver", "epsilon", "n_iters", "metric")),
    "prototype_loss": Spec(3, ("gamma",)),
    "ot_cost_loss": Spec(3, ("metric",)),
    "gathered_info_nce": Spec(2, ("temperature", "ids", "ids_b", "normalize"), {("ids", "ids_b"): "ids"}),
    "depth_augmented_view_loss": Spec(3, ("temperature", "weight", "pair_loss")),
}


def _signature_order(name: str) -> list[str]:
    """The 0.2 parameter order of ``name`` (keywords are written in it), or [] when mmalign is not importable."""
    import inspect

    try:
        import mmalign.dist
        import mmalign.losses
        import mmalign.memory
        import mmalign.miners
        import mmalign.models.fusion
    except ImportError:
        return []
    for owner in (mmalign.losses, mmalign.miners, mmalign.memory.HardNegativeMemory, mmalign.dist, mmalign.models.fusion):
        if hasattr(owner, name):
            return list(inspect.signature(getattr(owner, name)).parameters)
    return []


def _name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _rewrite_call(call: ast.Call, src: str) -> str | None:
    spec = SPECS.get(_name(call) or "")
    if spec is None or any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    seg = lambda node: ast.get_source_segment(src, node)  # noqa: E731
    positional = [seg(a) for a in call.args[:spec.n_positional]]
    extra = call.args[spec.n_positional:]
    if len(extra) > len(spec.old_order):
        return None
    kwargs = dict(zip(spec.old_order, (seg(a) for a in extra)))
    kwargs.update({k.arg: seg(k.value) for k in call.keywords})
    changed = bool(extra)
    for (first, second), new in spec.id_pairs.items():
        if (second in kwargs) if first == new else (first in kwargs or second in kwargs):
            a, b = kwargs.pop(first, "None"), kwargs.pop(second, "None")
            if (a, b) != ("None", "None"):
                kwargs[new] = a if a == b or (first == new and b == "None") else f"({a}, {b})"
            changed = True
    for old, new in spec.renamed.items():
        if old in kwargs:
            kwargs[new] = kwargs.pop(old)
            changed = True
    if not changed:
        return None
    order = _signature_order(_name(call))
    keys = sorted(kwargs, key=lambda k: order.index(k) if k in order else len(order))  # stable: others keep their order
    args = positional + [f"{k}={kwargs[k]}" for k in keys]
    return f"{seg(call.func)}({', '.join(args)})"


def migrate(src: str) -> tuple[str, int]:
    """``(new source, number of calls rewritten)``; outer calls first, then again for calls inside them."""
    total = 0
    while True:
        tree = ast.parse(src)
        lines = src.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        edits = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                new = _rewrite_call(node, src)
                if new is not None:
                    start = offsets[node.lineno - 1] + len(lines[node.lineno - 1].encode()[:node.col_offset].decode())
                    end = offsets[node.end_lineno - 1] + len(lines[node.end_lineno - 1].encode()[:node.end_col_offset].decode())
                    edits.append((start, end, new))
        outer = [e for e in edits if not any(o[0] <= e[0] and e[1] <= o[1] and o != e for o in edits)]
        if not outer:
            return src, total
        for start, end, new in sorted(outer, reverse=True):
            src = src[:start] + new + src[end:]
        total += len(outer)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="report only; exit 1 when a file would change")
    args = parser.parse_args(argv)
    would_change = False
    for path in args.files:
        src = path.read_text(encoding="utf-8")
        if SKIP_MARKER in src:  # a file that calls the old spellings on purpose (their tests)
            continue
        new, n = migrate(src)
        if n:
            would_change = True
            print(f"{path}: {n} call(s) {'to rewrite' if args.check else 'rewritten'}")
            if not args.check:
                path.write_text(new, encoding="utf-8")
    return 1 if args.check and would_change else 0


if __name__ == "__main__":
    sys.exit(main())

"""One vocabulary across the library (0.2): item ids are ``ids``, settings of losses and miners are keywords
(temperature before margin), one ``similarity``, metrics in fractions. The 0.1 spellings still work for one
release, give the same numbers and warn with the spelling to use; tools/migrate_0_2.py rewrites them."""
# migrate_0_2: skip  (this file calls the old spellings on purpose)

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmalign
from mmalign._deprecation import MmalignDeprecationWarning
from mmalign.losses import (AdaptiveMargin, contrastive_loss, distill_contrastive_loss, info_nce, make_signed_pairs,
                            mms_loss, moco_loss, sample_hard_negatives, triplet_loss)
from mmalign.memory import HardNegativeMemory, MoCoQueue
from mmalign.miners import hardest_negatives, random_negatives, semi_hard_negatives
from mmalign.retrieval import as_percentages, recall_at_k, retrieval_report, similarity

ROOT = Path(__file__).resolve().parents[1]
OLD_ID_NAMES = {"labels_a", "labels_b", "item_ids", "img_ids", "txt_ids", "row_ids", "col_ids", "q_ids",
                "queue_ids", "ids_b"}


@pytest.fixture
def warn_only(monkeypatch):
    """The test session turns old spellings into errors (conftest.py); these tests check the warning."""
    monkeypatch.delenv("MMALIGN_DEPRECATIONS", raising=False)


def batch(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, b, torch.tensor([0, 0, 1, 2, 2, 3])[:n]


def old_and_new(old_call, new_call, match):
    """Both results; the old call must warn (one of its warnings matching ``match``), the new one must not."""
    with pytest.warns(MmalignDeprecationWarning) as records:
        old = old_call()
    messages = [str(r.message) for r in records]
    assert any(re.search(match, m) for m in messages), messages
    with warnings.catch_warnings():
        warnings.simplefilter("error", MmalignDeprecationWarning)
        new = new_call()
    return old, new


def same(x, y):
    if isinstance(x, (tuple, list)):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            same(u, v)
    else:
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), (x, y)


def test_old_loss_spellings_give_the_same_numbers(warn_only):
    a, b, ids = batch()
    same(*old_and_new(lambda: info_nce(a, b, 0.1, ids, ids), lambda: info_nce(a, b, temperature=0.1, ids=ids),
                      r"info_nce\(\): passing temperature, labels_a, labels_b by position"))
    same(*old_and_new(lambda: info_nce(a, b, labels_a=ids, labels_b=ids), lambda: info_nce(a, b, ids=ids),
                      r"labels_a/labels_b are deprecated; pass ids=\(labels_a, labels_b\)"))
    # the 0.1 order was (margin, temperature): a positional call keeps meaning what it meant
    same(*old_and_new(lambda: mms_loss(a, b, 0.2, 0.05, ids), lambda: mms_loss(a, b, temperature=0.05, margin=0.2, ids=ids),
                      r"mms_loss\(\): passing margin, temperature, item_ids by position"))
    assert not torch.equal(mms_loss(a, b, temperature=0.2, margin=0.05), mms_loss(a, b, temperature=0.05, margin=0.2))
    same(*old_and_new(lambda: mms_loss(a, b, item_ids=ids), lambda: mms_loss(a, b, ids=ids), r"item_ids= is deprecated; write ids="))
    sim = similarity(a, b)
    same(*old_and_new(lambda: contrastive_loss(sim, ids, 0.5), lambda: contrastive_loss(sim, margin=0.5, ids=ids), "item_ids"))
    neg = hardest_negatives(sim, ids=ids)
    same(*old_and_new(lambda: triplet_loss(sim, *neg, 0.3), lambda: triplet_loss(sim, *neg, margin=0.3), "margin"))
    amm = AdaptiveMargin(0.5)
    same(*old_and_new(lambda: amm(a, b, ids), lambda: amm(a, b, ids=ids), "item_ids"))
    same(*old_and_new(lambda: make_signed_pairs(6, 2, torch.Generator().manual_seed(1), ids),
                      lambda: make_signed_pairs(6, negatives_per_positive=2, generator=torch.Generator().manual_seed(1), ids=ids),
                      "negatives_per_positive"))


def test_old_queue_spellings_give_the_same_numbers(warn_only):
    a, b, ids = batch()
    queue, queue_ids = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 7, 8, 3])
    same(*old_and_new(lambda: moco_loss(a, b, queue, 0.1, ids, queue_ids),
                      lambda: moco_loss(a, b, queue, temperature=0.1, ids=(ids, queue_ids)), "q_ids"))
    same(*old_and_new(lambda: distill_contrastive_loss(a, b, ids, queue, queue_ids, 0.1, 0.4, a + 0.1),
                      lambda: distill_contrastive_loss(a, b, ids=(ids, queue_ids), queue=queue, temperature=0.1,
                                                       alpha=0.4, q_teacher=a + 0.1), "by position"))
    same(*old_and_new(lambda: distill_contrastive_loss(a, b, ids=ids, queue=queue, queue_ids=queue_ids),
                      lambda: distill_contrastive_loss(a, b, ids=(ids, queue_ids), queue=queue), r"pass ids=\(ids, queue_ids\)"))
    memory, queue_ring = HardNegativeMemory(4, 5), MoCoQueue(4, 5)
    with pytest.warns(MmalignDeprecationWarning, match="item_ids= is deprecated"):
        memory.write(a.float(), item_ids=ids)
    with pytest.warns(MmalignDeprecationWarning, match="item_ids= is deprecated"):
        queue_ring.enqueue(b.float(), item_ids=ids)
    same(memory.read()[1].sort().values, ids[-4:])
    same(queue_ring.ids.sort().values, ids[-4:])


def test_old_miner_spellings_give_the_same_indices(warn_only):
    a, b, ids = batch()
    sim = similarity(a, b)
    same(*old_and_new(lambda: hardest_negatives(sim, ids, ids, 2), lambda: hardest_negatives(sim, ids=ids, k=2), "img_ids"))
    same(*old_and_new(lambda: hardest_negatives(sim, img_ids=ids, txt_ids=ids), lambda: hardest_negatives(sim, ids=ids),
                      r"img_ids/txt_ids are deprecated"))
    same(*old_and_new(lambda: random_negatives(sim, ids, ids, 2, torch.Generator().manual_seed(3)),
                      lambda: random_negatives(sim, ids=ids, k=2, generator=torch.Generator().manual_seed(3)), "img_ids"))
    same(*old_and_new(lambda: semi_hard_negatives(sim, ids, ids, 0.5), lambda: semi_hard_negatives(sim, margin=0.5, ids=ids),
                      "img_ids"))
    same(*old_and_new(lambda: HardNegativeMemory.select_violators(sim, 1, 0.2, ids, ids),
                      lambda: HardNegativeMemory.select_violators(sim, k=1, margin=0.2, ids=ids), "row_ids"))
    same(*old_and_new(lambda: sample_hard_negatives(sim, ids, ids, 0.5, torch.Generator().manual_seed(2)),
                      lambda: sample_hard_negatives(sim, ids=ids, temperature=0.5, generator=torch.Generator().manual_seed(2)),
                      "row_ids"))


def test_one_similarity_and_its_deprecated_aliases(warn_only):
    a, b, _ = batch()
    with pytest.warns(MmalignDeprecationWarning, match="use mmalign.retrieval.similarity"):
        from mmalign.losses import similarity as old
    assert old is similarity
    with pytest.warns(MmalignDeprecationWarning, match="use mmalign.retrieval.similarity"):
        assert importlib.import_module("mmalign.losses.info_nce").similarity is similarity
    expected = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    torch.testing.assert_close(similarity(a, b), expected)


def test_mixing_old_and_new_or_too_many_arguments_is_an_error(warn_only):
    a, b, ids = batch()
    with pytest.raises(TypeError, match="both 'ids' and the deprecated"):
        info_nce(a, b, labels_a=ids, ids=ids)
    with pytest.raises(TypeError, match="multiple values for argument 'temperature'"):
        info_nce(a, b, 0.1, temperature=0.2)
    with pytest.raises(TypeError, match="takes 2 positional arguments but 8 were given"):
        info_nce(a, b, 0.1, ids, ids, True, None, 1)


def test_deprecations_raise_when_asked(monkeypatch):
    a, b, _ = batch()
    monkeypatch.setenv("MMALIGN_DEPRECATIONS", "error")
    with pytest.raises(MmalignDeprecationWarning, match="removed in mmalign 0.3"):
        info_nce(a, b, 0.1)


def test_metrics_are_fractions_and_tables_percentages():
    a, b, _ = batch(n=4)
    ids = torch.arange(4)
    report = retrieval_report(a, b, ids, ids, ks=(1, 2))
    assert all(0 <= v <= 1 for k, v in report.items() if k != "rsum")
    assert report["i2t_R@1"] == recall_at_k(a, b, ids, ids, ks=(1,))[1]
    percent = as_percentages(report)
    assert percent["t2i_R@2"] == 100 * report["t2i_R@2"] and percent["rsum"] == pytest.approx(100 * report["rsum"])


def public_functions():
    """Every public function and method of the library's modules (labs and experiments included)."""
    seen = {}
    for info in pkgutil.walk_packages(mmalign.__path__, "mmalign."):
        if any(part.startswith("_") for part in info.name.split(".")) or info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            continue
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", "") != module.__name__:
                continue
            if inspect.isfunction(obj):
                seen[f"{module.__name__}.{name}"] = obj
            elif inspect.isclass(obj):
                for meth_name, meth in vars(obj).items():
                    fn = meth.__func__ if isinstance(meth, (staticmethod, classmethod)) else meth
                    if inspect.isfunction(fn) and (not meth_name.startswith("_") or meth_name == "__call__"):
                        seen[f"{module.__name__}.{name}.{meth_name}"] = fn
    return seen


def test_no_public_function_uses_an_old_name_for_item_ids():
    offenders = {name: sorted(set(inspect.signature(fn).parameters) & OLD_ID_NAMES)
                 for name, fn in public_functions().items()}
    assert not {k: v for k, v in offenders.items() if v}, "use ids (one tensor, or a pair) for item ids"


def test_losses_and_miners_take_settings_by_keyword_temperature_first():
    modules = [mmalign.losses, mmalign.miners]
    for module in modules:
        for name in module.__all__:
            fn = getattr(module, name)
            if not inspect.isfunction(fn) or name in ("n_loss_terms", "term_keys"):
                continue
            params = list(inspect.signature(fn).parameters.values())
            positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
            for p in params:
                if p.kind is p.POSITIONAL_OR_KEYWORD:
                    assert p.default is p.empty, f"{name}: {p.name} has a default but is positional; make it keyword-only"
            assert not {"temperature", "margin", "ids"} & set(positional), f"{name}: settings must be keyword-only"
            names = [p.name for p in params]
            if "temperature" in names and "margin" in names:
                assert names.index("temperature") < names.index("margin"), f"{name}: temperature comes before margin"


def test_migration_tool_rewrites_old_calls(tmp_path):
    source = tmp_path / "old.py"
    source.write_text(
        "import torch\n"
        "from mmalign.losses import info_nce, mms_loss\n"
        "from mmalign.miners import hardest_negatives\n"
        "a, b, ids = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 0, 1, 2])\n"
        "x = mms_loss(a, b, 0.2, 0.05, ids)\n"
        "y = info_nce(a, b, 0.1, labels_a=ids,\n"
        "             labels_b=ids)  # multi-line\n"
        "n = hardest_negatives(a @ b.T, ids, ids, 2)\n"
    )
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "migrate_0_2.py"), str(source)], capture_output=True,
                         text=True, check=True)
    assert "3 call(s) rewritten" in out.stdout
    text = source.read_text()
    assert "mms_loss(a, b, temperature=0.05, margin=0.2, ids=ids)" in text
    assert "info_nce(a, b, temperature=0.1, ids=ids)" in text
    assert "hardest_negatives(a @ b.T, ids=ids, k=2)" in text
    check = subprocess.run([sys.executable, str(ROOT / "tools" / "migrate_0_2.py"), "--check", str(source)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout == ""
    subprocess.run([sys.executable, "-W", "error::DeprecationWarning", str(source)], check=True)


def test_course_code_uses_no_old_spelling():
    """What a static rewrite can find: no chapter, solution, example, benchmark or test left to migrate
    (calls through other names are caught at run time: conftest.py turns the warnings into errors)."""
    files = [p for folder in ("notebooks", "solutions", "examples", "benchmarks", "utils/mmalign")
             for p in (ROOT / folder).rglob("*.py") if ".ipynb_checkpoints" not in p.parts]
    files += list((ROOT / "tests").glob("*.py"))
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "migrate_0_2.py"), "--check", *map(str, files)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout

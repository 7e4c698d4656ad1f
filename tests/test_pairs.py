"""Sentence-pair loaders on fixtures in the real GLUE formats (STS-B, MRPC, QQP), malformed rows included."""

import numpy as np
import pytest

from mmalign.data.pairs import (MalformedRowError, load_glue_pairs, load_mrpc, load_qqp, load_stsb,
                                scene_sentence_pairs)
from mmalign.data.scenes import generate_scenes

STSB = (
    "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
    "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a large flute.\tA man is playing a flute.\t3.800\n"
    '2\tmain-news\tMSRpar\t2012test\t0005\tnone\tnone\tHe said "no" twice.\tThe "deal" is off.\t0.000\n'
)
MRPC = (
    "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    "1\t702876\t702977\tAmrozi accused his brother , whom he called \" the witness \" , of deliberately distorting "
    "his evidence .\tReferring to him as only \" the witness \" , Amrozi accused his brother of deliberately "
    "distorting his evidence .\n"
    "0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain to Safeway in 1998 for $ 2.5 billion .\t"
    "Yucaipa bought Dominick 's in 1995 for $ 693 million and sold it to Safeway for $ 1.8 billion in 1998 .\n"
)
QQP = (
    "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    "133273\t213221\t213222\tHow is the life of a math student? Could you describe your own experiences?\t"
    "Which level of prepration is enough for the exam jlpt5?\t0\n"
    "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control your horniness?\t1\n"
    "360472\t364011\t490273\tWhat causes stool color to change to yellow?\t\t0\n"
)
# a question with an embedded newline, as in the distributed QQP train.tsv: two short rows
QQP_BROKEN = QQP + "201841\t303951\t174364\tHow can I create an Android app?\n?\tHow can I start an Android app?\t1\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_stsb_scores_and_bare_quotes(tmp_path):
    pairs = load_stsb(write(tmp_path, "dev.tsv", STSB), similar_at=2.5)
    assert pairs.a[2] == 'He said "no" twice.' and pairs.b[2] == 'The "deal" is off.'  # no quoting in GLUE TSVs
    np.testing.assert_allclose(pairs.score, [5.0, 3.8, 0.0])
    assert pairs.label.tolist() == [1, 1, 0] and len(pairs) == 3
    assert load_glue_pairs(tmp_path / "dev.tsv").name.startswith("STS-B")


def test_stsb_test_file_has_no_score(tmp_path):
    text = "\n".join("\t".join(line.split("\t")[:-1]) for line in STSB.strip().split("\n")) + "\n"
    pairs = load_glue_pairs(write(tmp_path, "test.tsv", text))
    assert pairs.score is None and pairs.label is None and len(pairs) == 3


def test_mrpc_with_bom_and_quotes(tmp_path):
    pairs = load_mrpc(write(tmp_path, "msr.tsv", MRPC))
    assert pairs.label.tolist() == [1, 0]
    assert pairs.a[0].startswith("Amrozi accused") and '" the witness "' in pairs.a[0]


def test_qqp_keeps_empty_questions_and_reports_broken_rows(tmp_path):
    pairs = load_qqp(write(tmp_path, "train.tsv", QQP))
    assert pairs.label.tolist() == [0, 1, 0] and pairs.b[2] == ""
    path = write(tmp_path, "broken.tsv", QQP_BROKEN)
    with pytest.raises(MalformedRowError, match=r"broken\.tsv, line 5: expected 6 tab-separated fields .* got 4"):
        load_qqp(path)
    skipped = load_qqp(path, errors="skip")
    assert len(skipped) == 3 and skipped.skipped == 2


def test_bad_labels_scores_headers_and_files(tmp_path):
    bad_label = QQP.replace("horniness?\t1", "horniness?\tyes")
    with pytest.raises(MalformedRowError, match=r"line 3: the label \(is_duplicate\) must be 0 or 1, got 'yes'"):
        load_qqp(write(tmp_path, "a.tsv", bad_label))
    with pytest.raises(MalformedRowError, match=r"line 3: the score must be a number in \[0, 5\], got '7.5'"):
        load_stsb(write(tmp_path, "b.tsv", STSB.replace("3.800", "7.5")))
    with pytest.raises(MalformedRowError, match=r"c\.tsv, line 1: the header .* is not that of a GLUE"):
        load_glue_pairs(write(tmp_path, "c.tsv", "s1,s2,label\na,b,1\n"))
    with pytest.raises(MalformedRowError, match="not 'mrpc'"):
        load_mrpc(tmp_path / "b.tsv")
    with pytest.raises(MalformedRowError, match="empty"):
        load_glue_pairs(write(tmp_path, "d.tsv", ""))
    with pytest.raises(FileNotFoundError, match="download"):
        load_glue_pairs(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="errors must be one of"):
        load_qqp(tmp_path / "a.tsv", errors="ignore")


def test_scene_pairs_drop_identical_strings_and_label_by_grade():
    world = generate_scenes(30, seed=1, image_size=16)
    pairs = scene_sentence_pairs(world, 50, seed=0, similar_at=2.5)
    assert len(pairs) == 50 and all(x != y for x, y in zip(pairs.a, pairs.b))
    assert ((pairs.score >= 2.5) == (pairs.label == 1)).all()
    assert 0 < pairs.label.mean() < 1 and pairs.score.min() >= 0 and pairs.score.max() <= 5
    sub = pairs.subset([3, 1])
    assert sub.a == [pairs.a[3], pairs.a[1]] and sub.score.tolist() == [pairs.score[3], pairs.score[1]]
    assert set(pairs.texts()) == set(pairs.a) | set(pairs.b)

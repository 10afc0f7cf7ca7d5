"""E2E metrics on hand-checked examples and against independent implementations."""

from __future__ import annotations

import math
import random

import pytest

import metrics

HYPS = ["the cat sat on the mat .", "a small dog barks loudly", "it rains"]
REFS = [
    ["the cat sat on the mat .", "a cat is sitting on the mat ."],
    ["a small dog is barking", "the little dog barks loudly", "a dog barks"],
    ["it is raining today"],
]


def test_identical_hypotheses_score_perfectly():
    refs = [[h] for h in HYPS]
    assert metrics.bleu(HYPS, refs) == pytest.approx(100.0)
    assert metrics.rouge_l(HYPS, refs) == pytest.approx(100.0)


def test_nist_by_hand():
    # reference "a b a": info(a)=log2(3/2), info(b)=log2(3), info(a b)=log2(2/1)=1
    # hyp "a b": 1-grams (log2 1.5 + log2 3)/2, 2-grams 1/1; length ratio 2/3 -> penalty 0.5
    expected = 0.5 * ((math.log2(1.5) + math.log2(3)) / 2 + 1.0)
    assert metrics.nist(["a b"], [["a b a"]]) == pytest.approx(expected)


def test_cider_d_by_hand():
    # every n-gram of a segment is unique to it, so idf = log 2 everywhere and cos = 1 -> 10
    hyps = ["a b c d", "w x y z"]
    assert metrics.cider_d(hyps, [[h] for h in hyps]) == pytest.approx(10.0)
    # unigrams only: segment 1 shares "a" of {a, b} vs {a, c}: cos = ln2^2 / (2 ln2^2) = 1/2
    got = metrics.cider_d(["a b", "d e"], [["a c"], ["d e"]], max_n=1)
    assert got == pytest.approx((5.0 + 10.0) / 2)


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e") = 3 -> P = R = F = 3/4
    assert metrics.rouge_l(["a b c d"], [["a c d e"]]) == pytest.approx(75.0)


def _random_corpus(seed: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    words = "the a cat dog sat on mat is near river pub food cheap".split()
    sent = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))  # noqa: E731
    hyps = [sent() for _ in range(12)]
    return hyps, [[sent() for _ in range(rng.randint(1, 4))] for _ in hyps]


@pytest.mark.parametrize("seed", range(3))
def test_cider_matches_pycocoevalcap(seed):
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    hyps, refs = _random_corpus(seed)
    want, _ = cider.Cider().compute_score(
        {i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}
    )
    assert metrics.cider_d(hyps, refs) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_nist_matches_nltk_with_one_reference(seed):
    """NLTK scores each segment against its single best reference (mteval clips n-gram counts
    by their maximum over all references); with one reference per segment both agree."""
    nist_score = pytest.importorskip("nltk.translate.nist_score")
    hyps, refs = _random_corpus(seed)
    refs = [rs[:1] for rs in refs]
    want = nist_score.corpus_nist(
        [[r.split() for r in rs] for rs in refs], [h.split() for h in hyps]
    )
    assert metrics.nist(hyps, refs) == pytest.approx(want, rel=1e-9)


def test_nist_clips_by_max_count_over_references():
    # "a a" against refs {"a", "a a b"}: both "a" count (max count 2 in the second ref);
    # "a" is 3 of the 4 reference words; mean reference length 2 = hypothesis length
    one = metrics.nist(["a a"], [["a", "a a b"]], max_n=1)
    assert one == pytest.approx(math.log2(4 / 3))


def test_bleu_accepts_ragged_references_and_penalises_errors():
    score = metrics.bleu(HYPS, REFS)
    assert 0.0 < score < 100.0
    assert metrics.bleu(["completely different words here"], [["the cat sat"]]) < 5.0


def test_e2e_metrics_keys_and_meteor_degrades():
    got = metrics.e2e_metrics(HYPS, REFS, use_meteor=False)
    assert set(got) == {"BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"}
    assert got["METEOR"] is None
    with pytest.raises(ValueError, match="reference sets"):
        metrics.e2e_metrics(HYPS, REFS[:2])


@pytest.mark.skipif(not metrics.meteor_available(), reason="needs java and pycocoevalcap")
def test_meteor_identical_is_near_one_and_ordered():
    perfect = metrics.meteor(["the cat sat on the mat"], [["the cat sat on the mat"]])
    worse = metrics.meteor(["mat the on cat sat the"], [["the cat sat on the mat"]])
    assert perfect > 95.0
    assert worse < perfect

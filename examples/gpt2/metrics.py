"""Offline corpus metrics of the E2E challenge: BLEU, NIST, METEOR, ROUGE-L, CIDEr.

Every metric takes one hypothesis per segment and a list of references per segment (the
number of references may vary).

* **BLEU**: ``sacrebleu.corpus_bleu`` (13a tokenisation, 0-100).
* **NIST**: written here from Doddington (2002) as in ``mteval-v13a``: information weights
  ``log2(count(w1..wn-1) / count(w1..wn))`` from the reference corpus, hypothesis n-gram
  counts clipped by their maximum count in one reference, n <= 5, brevity penalty
  ``exp(beta * log(min(1, Lhyp/Lref))**2)`` with ``Lref`` the mean reference length and beta
  such that the penalty is 0.5 at ``Lhyp/Lref = 2/3``.
* **METEOR**: METEOR 1.5 (``-l en -norm``) through ``pycocoevalcap``, which runs its bundled
  jar with ``java``; when either is missing the score is ``None`` (reported as ``n/a``).
* **ROUGE-L**: ``rouge_score`` F-measure, best reference per segment, averaged (0-100).
* **CIDEr**: CIDEr-D as in the COCO caption code used by the E2E scripts (``pycocoevalcap``'s
  ``Cider``), written here: TF-IDF n-gram vectors (n <= 4, document frequency over the
  segments' reference sets), clipped cosine with a Gaussian length penalty (sigma 6), times 10.

Texts are lowercased and split into words and punctuation (:func:`tokenize`) for NIST, METEOR
and CIDEr; BLEU and ROUGE-L use their own tokenisers.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence

import numpy as np

Refs = Sequence[Sequence[str]]
_WORD = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercased words and punctuation marks."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(hyps: Sequence[str], refs: Refs) -> float:
    """Corpus BLEU (sacrebleu, 0-100); missing references are padded with ``None``."""
    import sacrebleu

    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(hyps), streams).score)


def nist(hyps: Sequence[str], refs: Refs, max_n: int = 5) -> float:
    """Corpus NIST score (mteval-v13a definition, see the module docstring)."""
    hyp_toks = [tokenize(h) for h in hyps]
    ref_toks = [[tokenize(r) for r in rs] for rs in refs]
    counts: Counter = Counter()
    n_words = 0
    for rs in ref_toks:
        for r in rs:
            n_words += len(r)
            for n in range(1, max_n + 1):
                counts.update(_ngrams(r, n))

    def info(gram: tuple[str, ...]) -> float:
        prefix = counts[gram[:-1]] if len(gram) > 1 else n_words
        return math.log2(prefix / counts[gram])

    gained, total = np.zeros(max_n), np.zeros(max_n)
    for hyp, rs in zip(hyp_toks, ref_toks, strict=True):
        for n in range(1, max_n + 1):
            grams = _ngrams(hyp, n)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, n)
            gained[n - 1] += sum(info(g) * min(c, best[g]) for g, c in grams.items() if g in best)
            total[n - 1] += max(len(hyp) - n + 1, 0)
    score = sum(g / t for g, t in zip(gained, total, strict=True) if t > 0)
    hyp_len = sum(len(h) for h in hyp_toks)
    ref_len = sum(np.mean([len(r) for r in rs]) for rs in ref_toks)
    beta = math.log(0.5) / math.log(1.5) ** 2
    ratio = min(hyp_len / ref_len, 1.0) if hyp_len else 0.0
    return float(score * math.exp(beta * math.log(ratio) ** 2)) if ratio > 0 else 0.0


def rouge_l(hyps: Sequence[str], refs: Refs) -> float:
    """ROUGE-L F-measure (rouge_score), max over references, mean over segments (0-100)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score_multi(list(rs), h)["rougeL"].fmeasure for h, rs in zip(hyps, refs)]
    return 100.0 * float(np.mean(scores))


def cider_d(hyps: Sequence[str], refs: Refs, max_n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as in the COCO caption evaluation code (see the module docstring)."""
    hyp_grams = [[_ngrams(tokenize(h), n) for n in range(1, max_n + 1)] for h in hyps]
    ref_grams = [
        [[_ngrams(tokenize(r), n) for n in range(1, max_n + 1)] for r in rs] for rs in refs
    ]
    df: Counter = Counter()
    for rs in ref_grams:
        df.update({g for r in rs for grams in r for g in grams})
    log_docs = math.log(float(len(refs)))

    def vectors(grams: list[Counter]) -> tuple[list[dict], list[float], int]:
        vecs = [
            {g: tf * (log_docs - math.log(max(1.0, df[g]))) for g, tf in c.items()} for c in grams
        ]
        norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
        return vecs, norms, sum(grams[0].values())

    scores = []
    for hg, rgs in zip(hyp_grams, ref_grams, strict=True):
        h_vec, h_norm, h_len = vectors(hg)
        total = np.zeros(max_n)
        for rg in rgs:
            r_vec, r_norm, r_len = vectors(rg)
            for n in range(max_n):
                dot = sum(
                    min(v, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, v in h_vec[n].items()
                )
                if h_norm[n] and r_norm[n]:
                    dot /= h_norm[n] * r_norm[n]
                total[n] += dot * math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
        scores.append(10.0 * total.mean() / len(rgs))
    return float(np.mean(scores))


@functools.cache
def _meteor_scorer():
    """One METEOR java process per Python process (it takes seconds to start)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def meteor_available() -> bool:
    """Whether :func:`meteor` can run (java on PATH and pycocoevalcap importable)."""
    return (
        shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None
    )


def meteor(hyps: Sequence[str], refs: Refs) -> float | None:
    """METEOR 1.5 via pycocoevalcap and java (0-100), or ``None`` if unavailable."""
    if not meteor_available():
        return None
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(tokenize(h)) or "."] for i, h in enumerate(hyps)}
    score, _ = _meteor_scorer().compute_score(gts, res)
    return 100.0 * float(score)


def e2e_metrics(hyps: Sequence[str], refs: Refs, *, use_meteor: bool = True) -> dict:
    """All five metrics as a dict (METEOR may be ``None``)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference sets")
    return {
        "BLEU": bleu(hyps, refs),
        "NIST": nist(hyps, refs),
        "METEOR": meteor(hyps, refs) if use_meteor else None,
        "ROUGE-L": rouge_l(hyps, refs),
        "CIDEr": cider_d(hyps, refs),
    }

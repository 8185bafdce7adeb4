"""Text-generation metrics: exact match, ROUGE-1/2/L and BLEU-4, with no extra dependencies.

- Exact match compares SQuAD-normalised strings (lower case, no punctuation, no articles, single
  spaces).
- ROUGE-N / ROUGE-L are F1 scores averaged over examples, as `rouge-score` computes them without
  stemming: tokens are lower-cased word characters; CJK characters are single tokens (as
  LlamaFactory's Chinese evaluation tokenizes), ROUGE-L uses the longest common subsequence.
- BLEU-4 is corpus BLEU as sacreBLEU computes it (clipped n-gram counts summed over the corpus,
  geometric mean of the four precisions, brevity penalty, `exp` smoothing of zero counts), on
  tokens split into words and single punctuation marks.
All scores are percentages (0-100).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_ROUGE_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)
_BLEU_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]", re.UNICODE)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def bleu_tokens(text: str) -> list[str]:
    return _BLEU_TOKEN.findall(text)


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: int, predicted: int, expected: int) -> float:
    if overlap == 0 or predicted == 0 or expected == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / expected
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: Sequence[str], reference: Sequence[str], n: int) -> float:
    pred, ref = ngrams(prediction, n), ngrams(reference, n)
    overlap = sum((pred & ref).values())
    return _f1(overlap, sum(pred.values()), sum(ref.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: Sequence[str], reference: Sequence[str]) -> float:
    return _f1(lcs_length(prediction, reference), len(prediction), len(reference))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """sacreBLEU-style corpus BLEU (one reference per prediction), 0-100."""
    matches = [0] * max_order
    totals = [0] * max_order
    hyp_len = ref_len = 0
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = bleu_tokens(prediction), bleu_tokens(reference)
        hyp_len += len(hyp)
        ref_len += len(ref)
        for n in range(1, max_order + 1):
            h, r = ngrams(hyp, n), ngrams(ref, n)
            matches[n - 1] += sum((h & r).values())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_precision = 0.0
    smooth = 1.0
    for n in range(max_order):
        if totals[n] == 0:
            precision = 0.0
        elif matches[n] == 0:
            smooth *= 2
            precision = 1.0 / (smooth * totals[n])
        else:
            precision = matches[n] / totals[n]
        if precision == 0.0:
            return 0.0
        log_precision += math.log(precision) / max_order
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def generation_scores(predictions: Iterable[str], references: Iterable[str]) -> dict[str, float]:
    """exact_match, rouge1, rouge2, rougeL (mean F1) and bleu4 (corpus), as percentages."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return {"exact_match": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu4": 0.0}
    r1 = r2 = rl = em = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        p, r = rouge_tokens(prediction), rouge_tokens(reference)
        r1 += rouge_n(p, r, 1)
        r2 += rouge_n(p, r, 2)
        rl += rouge_l(p, r)
        em += exact_match(prediction, reference)
    count = len(predictions)
    return {
        "exact_match": 100.0 * em / count,
        "rouge1": 100.0 * r1 / count,
        "rouge2": 100.0 * r2 / count,
        "rougeL": 100.0 * rl / count,
        "bleu4": corpus_bleu(predictions, references),
    }

"""Text-generation metrics: exact match (SQuAD), ROUGE-1/2/L (`rouge-score`) and BLEU-4 (`sacrebleu`).

The ROUGE and BLEU numbers come from the reference implementations, so they are comparable with
scores published elsewhere:

- Exact match compares SQuAD-normalised strings (lower case, no punctuation, no articles, single
  spaces).
- ROUGE-1/2/L are `rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"],
  use_stemmer=False)` F-measures, averaged over examples. Its tokenizer (lower case, runs of
  `[a-z0-9]`) is used unchanged for text without CJK characters; it would drop CJK characters
  altogether, so those count as one token each (as LlamaFactory's Chinese evaluation tokenizes),
  the rest of such a text going through rouge-score's own tokenizer.
- BLEU-4 is `sacrebleu.corpus_bleu` (one reference per prediction; sacreBLEU's defaults: `exp`
  smoothing, tokenizer `13a`), or tokenizer `zh` (Chinese characters split one per token) when
  any prediction or reference has CJK characters.
All scores are percentages (0-100).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from functools import cache

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_CHAR = re.compile(rf"([{_CJK}])")
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
    """rouge-score's default tokens (no stemming), each CJK character one token besides."""
    from rouge_score import tokenize

    tokens: list[str] = []
    for i, part in enumerate(_CJK_CHAR.split(text)):
        if i % 2:  # a captured CJK character
            tokens.append(part)
        elif part:
            tokens += tokenize.tokenize(part, None)
    return tokens


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer, tokenizers

    class _Tokenizer(tokenizers.Tokenizer):
        def tokenize(self, text: str) -> list[str]:
            return rouge_tokens(text)

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=_Tokenizer())


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (0-1) of one prediction against its reference."""
    scores = _rouge_scorer().score(reference, prediction)  # rouge-score's order: target, prediction
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU's corpus BLEU-4 (one reference per prediction), 0-100."""
    import sacrebleu

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    cjk = any(_CJK_CHAR.search(text) for text in (*predictions, *references))
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize="zh" if cjk else "13a").score)


def generation_scores(predictions: Iterable[str], references: Iterable[str]) -> dict[str, float]:
    """exact_match, rouge1, rouge2, rougeL (mean F-measure) and bleu4 (corpus), as percentages."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return {"exact_match": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu4": 0.0}
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    em = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        for name, value in rouge_scores(prediction, reference).items():
            totals[name] += value
        em += exact_match(prediction, reference)
    count = len(predictions)
    return {
        "exact_match": 100.0 * em / count,
        **{name: 100.0 * total / count for name, total in totals.items()},
        "bleu4": corpus_bleu(predictions, references),
    }

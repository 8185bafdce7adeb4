"""Ready-made verifiable rewards for `reward.function` (`kubetune.trainer.train.reward_functions:NAME`).

Each compares the completion with the dataset's answer for the prompt (`reference`, the last
assistant turn of the row), so a dataset of questions with known answers is all that RL with
verifiable rewards needs. They double as examples of the signature a custom function must have.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

WORD = re.compile(r"\w+")


def _words(text: str | None) -> list[str]:
    return WORD.findall((text or "").lower())


def exact_match(prompts: list[str], completions: list[str], reference: list[str | None], **kwargs: Any) -> list[float]:
    """1.0 when the completion equals the reference (case and surrounding space ignored)."""
    return [float(ref is not None and c.strip().lower() == ref.strip().lower()) for c, ref in zip(completions, reference, strict=True)]


def contains_reference(prompts: list[str], completions: list[str], reference: list[str | None], **kwargs: Any) -> list[float]:
    """1.0 when the reference appears in the completion (a final answer inside reasoning)."""
    return [float(ref is not None and ref.strip().lower() in c.lower()) for c, ref in zip(completions, reference, strict=True)]


def word_f1(prompts: list[str], completions: list[str], reference: list[str | None], **kwargs: Any) -> list[float]:
    """SQuAD-style word-overlap F1 between completion and reference: partial credit, so the
    reward is informative even while answers are mostly wrong."""
    scores = []
    for completion, ref in zip(completions, reference, strict=True):
        got, want = Counter(_words(completion)), Counter(_words(ref))
        common = sum((got & want).values())
        if not common:
            scores.append(0.0)
            continue
        precision, recall = common / sum(got.values()), common / sum(want.values())
        scores.append(2 * precision * recall / (precision + recall))
    return scores

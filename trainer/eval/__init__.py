"""Evaluation of trained models: perplexity, generation metrics (exact match, ROUGE, BLEU) and
multiple-choice accuracy, as JSON and a Markdown table (`kubetune eval`, `run_evaluation`)."""

from kubetune.trainer.eval.metrics import corpus_bleu, exact_match, generation_scores, normalize_answer
from kubetune.trainer.eval.run import TASKS, EvalReport, EvalResult, run_evaluation

__all__ = [
    "TASKS",
    "EvalReport",
    "EvalResult",
    "corpus_bleu",
    "exact_match",
    "generation_scores",
    "normalize_answer",
    "run_evaluation",
]

""""Did it learn?": the check a run with an eval split ends with.

A falling training loss does not say the model can do the task: a run can fit a wrapper it will
never be prompted with, or learn only the answers' first words. So the run ends by answering
held-out prompts greedily and reporting the share of exact answers next to the eval loss, and
warns when the eval loss has not fallen below the level of guessing (ln(vocabulary size), the
loss of a uniform guess, or the loss the run started from). Prompts and answers come from the
tokenized eval rows themselves (the tokens before the first labelled one, and that labelled run),
so they are rendered exactly as training rendered them, whatever the template.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_EXAMPLES = 100
"""Held-out examples answered at most (greedy generation costs time on large models)."""
MAX_NEW_TOKENS = 128
BATCH = 16
MIN_IMPROVEMENT = 0.05
"""The eval loss must end at least this share below the guessing level to count as learning."""


def heldout_examples(eval_rows: Any, count: int = MAX_EXAMPLES) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of up to `count` unpacked eval rows: the tokens before the first
    labelled one, and the run of labelled tokens that follows (the first answer, eos included)."""
    return [(prompt, answer) for _, prompt, answer in indexed_examples(eval_rows, count)]


def indexed_examples(eval_rows: Any, count: int = MAX_EXAMPLES) -> list[tuple[int, list[int], list[int]]]:
    """`heldout_examples` with each example's row index (where its other inputs, a picture, are)."""
    examples: list[tuple[int, list[int], list[int]]] = []
    if eval_rows is None or "labels" not in getattr(eval_rows, "column_names", ()) or "position_ids" in eval_rows.column_names:
        return examples  # preference/prompt rows, or packed rows holding several examples
    for index, row in enumerate(eval_rows.select_columns(["input_ids", "labels"]).select(range(min(len(eval_rows), 4 * count)))):
        labels = row["labels"]
        first = next((i for i, label in enumerate(labels) if label != -100), None)
        if not first:
            continue  # no prompt (a document): nothing to answer
        end = first
        while end < len(labels) and labels[end] != -100:
            end += 1
        examples.append((index, list(row["input_ids"][:first]), list(row["input_ids"][first:end])))
        if len(examples) >= count:
            break
    return examples


def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new: list[int],
                   extra: Callable[[int, int], dict] | None = None) -> list[list[int]]:
    """Greedy continuations of `prompts` (left-padded batches), each cut at its eos; `extra(start,
    end)` gives further `generate` inputs for prompts[start:end] (a vision model's pixels; a value
    that is a function is called with the batch's padded ids)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(prompts), BATCH):
            chunk = prompts[start:start + BATCH]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            more = extra(start, start + len(chunk)) if extra else {}
            # An input computed from the padded ids (Qwen2-VL's token types) comes as a function of them.
            more = {k: (v(ids) if callable(v) else v).to(device) for k, v in more.items()}
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad, **more,
                                 eos_token_id=tokenizer.eos_token_id, max_new_tokens=max(max_new[start:start + BATCH]))
            for row in out[:, width:].tolist():
                cut = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
                answers.append(row[:cut])
    if was_training:
        model.train()
    return answers


def exact_match(model: Any, tokenizer: Any, examples: list[tuple[list[int], list[int]]],
                extra: Callable[[int, int], dict] | None = None) -> tuple[float, dict[str, str]]:
    """Percent of held-out answers reproduced exactly (decoded text, surrounding spaces ignored),
    and the first example as {prompt, expected, answer} for the log."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    budgets = [min(len(answer) + 8, MAX_NEW_TOKENS) for _, answer in examples]
    answers = greedy_answers(model, tokenizer, [prompt for prompt, _ in examples], budgets, extra)
    hits = sum(text(got) == text(want) for got, (_, want) in zip(answers, examples, strict=True))
    prompt, want = examples[0]
    first = {"prompt": tokenizer.decode(prompt)[-200:], "expected": text(want), "answer": text(answers[0])}
    return 100.0 * hits / len(examples), first


def eval_losses(metrics_path: Path) -> list[float]:
    """The eval losses of the run so far, in order (metrics.jsonl, rewound on resume)."""
    losses = []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("eval_loss"), int | float):
                losses.append(float(record["eval_loss"]))
    return losses


def loss_verdict(losses: list[float], vocab_size: int) -> dict[str, Any]:
    """Whether the final eval loss fell below the guessing level: the lower of ln(vocab) (a
    uniform guess) and the starting eval loss, by at least `MIN_IMPROVEMENT` of it."""
    guess = math.log(vocab_size)
    start, final = losses[0], losses[-1]
    level = min(guess, start)
    # not `eval_loss`: readers of metrics.jsonl take each record with one for an evaluation
    return {"final_eval_loss": final, "start_eval_loss": start, "guess_loss": round(guess, 4),
            "learned": final < (1 - MIN_IMPROVEMENT) * level}


def _by_rows(indexed: list[tuple[int, list[int], list[int]]], row_inputs: Callable[[list[int]], dict]) -> Callable[[int, int], dict]:
    """`extra(start, end)` for `greedy_answers` from inputs looked up by eval-row index."""
    def extra(start: int, end: int) -> dict:
        return row_inputs([index for index, _, _ in indexed[start:end]])
    return extra


def learning_check(model: Any, tokenizer: Any, eval_rows: Any, metrics_path: Path, *, vocab_size: int,
                   generate: bool = True, row_inputs: Callable[[list[int]], dict] | None = None) -> dict[str, Any] | None:
    """The end-of-run report of a run with an eval split (None without one): held-out exact match
    of greedy answers (when the rows have prompts and `generate`), next to the eval loss and its
    verdict against the guessing level. Logged, with a warning when nothing was learned.
    `row_inputs(row indices)` gives the further `generate` inputs of those eval rows (pictures)."""
    losses = eval_losses(metrics_path)
    indexed = indexed_examples(eval_rows) if generate else []
    examples = [(prompt, answer) for _, prompt, answer in indexed]
    extra = _by_rows(indexed, row_inputs) if row_inputs is not None else None
    if not losses and not examples:
        return None
    report: dict[str, Any] = {"event": "heldout"}
    if losses:
        report.update(loss_verdict(losses, vocab_size))
    if examples:
        score, first = exact_match(model, tokenizer, examples, extra)
        report.update(exact_match=round(score, 2), examples=len(examples), firstAnswer=first)
        log.info("did it learn? held-out exact match: %.1f%% of %d greedy answers (e.g. %r -> %r, expected %r)",
                 score, len(examples), first["prompt"][-60:], first["answer"], first["expected"])
    if losses:
        log.info("did it learn? eval loss %.4g (started at %.4g; a uniform guess scores ln(vocab) = %.4g)",
                 report["final_eval_loss"], report["start_eval_loss"], report["guess_loss"])
        if not report["learned"]:
            log.warning("the eval loss (%.4g) has not fallen below the level of guessing (start %.4g, ln(vocab) %.4g): "
                        "the model has not learned from this data. Check the template and the first example logged "
                        "at the start, the learning rate and the number of steps.",
                        report["final_eval_loss"], report["start_eval_loss"], report["guess_loss"])
    return report

"""A few greedy generations on held-out prompts, before and after training.

They make "is it learning?" visible in the log and in `samples.jsonl` without a separate eval
run. Prompts are recovered from tokenized eval rows: the tokens before the first labelled one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


def prompt_column_prompts(eval_rows, count: int) -> list[list[int]]:
    """For stages whose rows carry their prompt as `prompt_ids` (dpo, kto, ppo, raft, grpo)."""
    if eval_rows is None or count <= 0:
        return []
    return [list(row["prompt_ids"]) for row in eval_rows.select(range(min(count, len(eval_rows))))]


def sample_prompts(eval_rows, count: int) -> list[list[int]]:
    """Prompt token ids of the first `count` eval rows that have a masked prompt."""
    prompts: list[list[int]] = []
    if eval_rows is None or count <= 0:
        return prompts
    for row in eval_rows:
        if "position_ids" in row:
            break  # packed rows hold several examples; no single prompt to show
        labels = row["labels"]
        first = next((i for i, label in enumerate(labels) if label != -100), None)
        if first:
            prompts.append(list(row["input_ids"][:first]))
        if len(prompts) >= count:
            break
    return prompts


def generate_samples(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 32) -> list[dict[str, Any]]:
    import torch

    if not prompts:
        return []
    was_training = model.training
    model.eval()
    results = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([ids], device=device)
            output = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            completion = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
            results.append({"prompt": tokenizer.decode(ids, skip_special_tokens=True), "completion": completion.strip()})
    if was_training:
        model.train()
    return results


def greedy_completions(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to token-id prompts, `batch_size` at a time (left-padded, as `generate`
    expects): an evaluation that answers dozens of held-out prompts each time stays cheap."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
                answers.extend(tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out)
    finally:
        model.train(was_training)
    return answers


def record_samples(path: Path, when: str, step: int, samples: list[dict[str, Any]]) -> None:
    if not samples:
        return
    with Path(path).open("a") as handle:
        for sample in samples:
            handle.write(json.dumps({"when": when, "step": step, **sample}) + "\n")
    for sample in samples:
        log.info("sample (%s, step %d): %r -> %r", when, step, sample["prompt"][-80:], sample["completion"])

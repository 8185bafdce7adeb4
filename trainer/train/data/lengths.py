"""Length-grouped batches where padding remains.

Padding-free batches (`pt`/`sft`, the default) carry no pad tokens. Where batches are still padded
(preference pairs for `rm`/`dpo`, whose TRL collator pads chosen and rejected to the longest of
the batch; `pt`/`sft` with `data.paddingFree: false` or a remote-code model) a random batch pads
every row to its longest, and with lengths spread from 5 to 500 tokens most of the compute goes
to pad tokens. `data.groupByLength` turns on transformers' `group_by_length` sampling, as
LlamaFactory and TRL users do: mega-batches of 50 batches drawn at random (seeded by `train.seed`), sorted by length
inside, so each batch holds similar lengths while the order across batches stays random; the
evaluation sampler groups the same way, seeded. The sampler reads a `length` column, added here
(the tokens one example puts in a padded row) so it never decodes rows one by one.

It is not the default: grouped batches hold similar examples, and on the demo reward-model task
(300 steps from the same start, seeds 42/1/2) held-out accuracy ended at 0.81/0.92/0.69 grouped
against 0.94/1.0/0.94 with random batches, for 6x fewer pad tokens. It pays off on large datasets
whose lengths spread widely, where padding dominates the step time.
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.api.spec import TrainingSpec

LENGTH_COLUMN = "length"
PAIRED_STAGES = ("rm", "dpo")


def length_grouped(spec: TrainingSpec) -> bool:
    """Whether this run's batches are grouped by length: asked for (`data.groupByLength`) and
    padded. `kto` keeps its data order (its KL answers pair with batch neighbours); the generating
    stages batch prompts themselves."""
    if not spec.data.groupByLength:
        return False
    if spec.stage in PAIRED_STAGES:
        return True
    return spec.stage in ("pt", "sft") and not spec.padding_free_enabled and not spec.packing_enabled


def _row_lengths(batch: dict[str, list]) -> list[int]:
    if "chosen_ids" in batch:  # a pair: the padded row holds the prompt and the longer answer
        return [len(p) + max(len(c), len(r)) for p, c, r in
                zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], strict=True)]
    return [len(ids) for ids in batch["input_ids"]]


def with_length_column(dataset: Any) -> Any:
    """The dataset with a `length` column (a no-op when it has one or is not a map-style dataset)."""
    if dataset is None or not hasattr(dataset, "column_names") or LENGTH_COLUMN in dataset.column_names:
        return dataset
    return dataset.map(lambda batch: {LENGTH_COLUMN: _row_lengths(batch)}, batched=True, desc="lengths")


def sampling_settings(spec: TrainingSpec) -> dict[str, Any]:
    """TrainingArguments for the training and evaluation samplers."""
    if not length_grouped(spec):
        return {}
    return {"train_sampling_strategy": "group_by_length", "length_column_name": LENGTH_COLUMN}

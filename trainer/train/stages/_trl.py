"""Glue between the runner's `TrainingArguments` and TRL's trainers (shared by rm and dpo)."""

from __future__ import annotations

import dataclasses
from typing import Any

from kubetune.trainer.train.context import RunContext


def trl_config(config_cls: type, args: Any, **extra: Any) -> Any:
    """A TRL config (`RewardConfig`, `DPOConfig`, ...) carrying every TrainingArguments value the
    runner decided, so TRL's own defaults (bf16, gradient checkpointing, lr) never leak in."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and hasattr(args, f.name)}
    # __post_init__ turns these into richer objects; hand back what the user-facing field takes.
    values["lr_scheduler_type"] = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    values["optim"] = getattr(args.optim, "value", args.optim)
    for name in ("eval_strategy", "save_strategy", "logging_strategy"):
        values[name] = getattr(values[name], "value", values[name])
    values.pop("hub_strategy", None)
    values.update(extra)
    return config_cls(**values)


def count_tokens_with(ctx: RunContext, collator: Any) -> Any:
    """Route the stage's own collator through the runner's token counter (tokens/s in metrics)."""
    counter = ctx.data_collator
    if hasattr(counter, "collate"):
        counter.collate = collator
        return counter
    return collator


"""What the runner hands to a stage: everything loaded and decided, nothing left to parse."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.trainer.api.spec import TrainingSpec


@dataclass
class RunContext:
    spec: TrainingSpec
    model: Any
    tokenizer: Any
    data: Any
    """A `kubetune.trainer.train.data.DataBundle` (train, eval, stats)."""
    training_args: Any
    data_collator: Any
    """Batches rows (and counts tokens for throughput); the stage passes it to its Trainer."""
    callbacks: list[Any] = field(default_factory=list)
    optimizers: tuple[Any, Any] = (None, None)
    """(optimizer, scheduler) when the method builds its own (LoRA+); None lets Trainer build them."""

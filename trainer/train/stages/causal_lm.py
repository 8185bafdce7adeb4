"""`pt` and `sft`: next-token prediction with transformers' Trainer.

The two stages differ only in their data (plain text packed into full sequences, or chat turns
with the prompt masked), which `kubetune.trainer.train.data` prepares; the loss is the same.
"""

from __future__ import annotations

from transformers import Trainer

from kubetune.trainer.train.context import RunContext


def build_trainer(ctx: RunContext) -> Trainer:
    return Trainer(
        model=ctx.model,
        args=ctx.training_args,
        train_dataset=ctx.data.train,
        eval_dataset=ctx.data.eval,
        data_collator=ctx.data_collator,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        optimizers=ctx.optimizers,
    )

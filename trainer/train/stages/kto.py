"""`kto`: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired judgements (TRL's
KTOTrainer): each row is one answer with a boolean `label` (desirable or not), no pairs needed.

The loss compares each answer's log-ratio to the reference against a batch-level estimate of the
KL between policy and reference, built from mismatched prompt/answer pairs in the same batch (so
`train.batchSize` must be at least 2). Rows are tokenized by kubetune (`UnpairedProcessor`) with the
run's chat template; TRL's own tokenization is skipped. As for `dpo`, the reference is the model as
training starts: the base with adapters disabled under LoRA, else a frozen copy.
"""

from __future__ import annotations

import copy
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.context import RunContext
from kubetune.trainer.train.samples import prompt_column_prompts

sample_prompts = prompt_column_prompts
"""The runner's hook: prompts for the before/after samples come from the rows' `prompt_ids`."""


def preflight(spec: TrainingSpec) -> TrainingSpec:
    if spec.kto.lossType == "kto" and spec.train.batchSize < 2:
        raise SpecError("train.batchSize", "KTO estimates its KL term from the other answers of the batch, so a batch needs at least 2 rows.",
                        "set train.batchSize to 2 or more (or kto.lossType: apo_zero_unpaired).")
    return spec


def _trainer_class():
    from trl import KTOTrainer

    class UnpairedTrainer(KTOTrainer):
        """KTOTrainer on kubetune-tokenized rows."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not self.calculate_KL:
                return dataset

            def mismatched(batch: dict[str, list]) -> dict[str, list]:
                # TRL's construction: rotate the answers by one within each batch, so each prompt is
                # paired with another row's answer for the KL estimate.
                batch["KL_completion_ids"] = [batch["completion_ids"][-1], *batch["completion_ids"][:-1]]
                return batch

            return dataset.map(mismatched, batched=True, batch_size=args.per_device_train_batch_size, keep_in_memory=True)

    return UnpairedTrainer


def build_trainer(ctx: RunContext):
    from peft import PeftModel
    from trl import KTOConfig
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from kubetune.trainer.train.stages._trl import count_tokens_with, trl_config

    k = ctx.spec.kto
    args = trl_config(KTOConfig, ctx.training_args, beta=k.beta, loss_type=k.lossType, desirable_weight=k.desirableWeight,
                      undesirable_weight=k.undesirableWeight, max_length=None, disable_dropout=True,
                      # KL answers are paired with their batch neighbours, so batches keep the data's order
                      # (already shuffled, with the run's seed, by the data pipeline).
                      train_sampling_strategy="sequential")
    reference: Any = None
    if not isinstance(ctx.model, PeftModel):
        reference = copy.deepcopy(ctx.model).eval().requires_grad_(False)
    trainer = _trainer_class()(
        model=ctx.model,
        ref_model=reference,
        args=args,
        data_collator=count_tokens_with(ctx, DataCollatorForUnpairedPreference(pad_token_id=ctx.tokenizer.pad_token_id)),
        train_dataset=ctx.data.train,
        eval_dataset=ctx.data.eval,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        optimizers=ctx.optimizers,
    )
    if isinstance(trainer.model, PeftModel) and "ref" in trainer.model.peft_config:
        # A fresh adapter (B = 0) disabled is the same policy as a copy of it, at no memory cost.
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    return trainer

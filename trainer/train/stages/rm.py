"""`rm`: a reward model. A sequence-classification head (one score) on the base LM, trained on
preference pairs with the pairwise (Bradley-Terry) loss -log sigmoid(r_chosen - r_rejected)
(TRL's RewardTrainer). Evaluation reports `eval_accuracy`, the held-out rate at which the chosen
answer scores higher, and `eval_margin`. The output directory is a regular
`AutoModelForSequenceClassification` checkpoint (or a LoRA adapter on one) with its tokenizer and
chat template, loadable by path or `s3://` URI (`AutoModelForSequenceClassification.from_pretrained`)
by the reward-driven stages.
"""

from __future__ import annotations

import logging

from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.context import RunContext

log = logging.getLogger(__name__)

SCORE_HEAD = "score"
"""The classification head's module name in transformers' *ForSequenceClassification models."""


def preflight(spec: TrainingSpec) -> TrainingSpec:
    """With adapters, the new score head must train in full and be saved with the adapter."""
    if spec.uses_lora and SCORE_HEAD not in spec.lora.modulesToSave:
        lora = spec.lora.model_copy(update={"modulesToSave": [*spec.lora.modulesToSave, SCORE_HEAD]})
        spec = spec.model_copy(update={"lora": lora})
    return spec


def load_model(spec: TrainingSpec, precision: str, tokenizer):
    """The base LM with a one-output sequence-classification head (randomly initialised), loaded
    the way `models.loader.load_model` loads the causal LM (location, dtype, kernel, qlora)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from kubetune.trainer.api.errors import SpecError
    from kubetune.trainer.train.models import loader

    dtype_name = loader.DTYPES.get(spec.model.dtype) or loader.PRECISION_DTYPE[precision]
    if precision in ("bf16", "fp16") and spec.method in ("full", "freeze", "galore") and spec.model.dtype == "auto":
        dtype_name = "float32"  # fp32 master weights under mixed precision
    location = loader.resolve_model_location(spec.model.path, spec.storage, "model.path")
    config = loader.load_config(spec, location)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    kwargs = {
        "config": config,
        "dtype": getattr(torch, dtype_name),
        "attn_implementation": loader.pick_attn_implementation(spec.model.attnImplementation),
        "revision": spec.model.revision,
        "trust_remote_code": spec.model.trustRemoteCode,
    }
    if spec.method == "qlora":
        kwargs["quantization_config"] = loader.quantization_config(spec, loader.PRECISION_DTYPE[precision])
    try:
        model = AutoModelForSequenceClassification.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise SpecError("model.path", f"no model with a sequence-classification head could be built from {location!r} "
                        f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}).",
                        "use a decoder LM that transformers supports for sequence classification.") from None
    log.info("loaded %s as a reward model (%s)", location, dtype_name)
    return model


def sample_prompts(eval_rows, count: int) -> list:
    return []  # a reward model scores, it does not generate


def build_trainer(ctx: RunContext):
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from kubetune.trainer.train.stages._trl import count_tokens_with, trl_config

    def whole_sequences(ds):
        if ds is None:
            return None
        return ds.map(
            lambda row: {"chosen_ids": row["prompt_ids"] + row["chosen_ids"], "rejected_ids": row["prompt_ids"] + row["rejected_ids"]},
            remove_columns=["prompt_ids"], keep_in_memory=True,
        )

    args = trl_config(RewardConfig, ctx.training_args, max_length=None, disable_dropout=True, center_rewards_coefficient=None)
    collator = DataCollatorForPreference(pad_token_id=ctx.tokenizer.pad_token_id)
    model = ctx.model
    return RewardTrainer(
        model=model,
        args=args,
        data_collator=count_tokens_with(ctx, collator),
        train_dataset=whole_sequences(ctx.data.train),
        eval_dataset=whole_sequences(ctx.data.eval),
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        optimizers=ctx.optimizers,
    )

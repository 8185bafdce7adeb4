"""`dpo`: direct preference optimisation and its variants (TRL's DPOTrainer).

The policy learns to prefer `chosen` over `rejected` relative to a frozen reference policy:

- `sigmoid` (DPO), `ipo`, `hinge` (SLiC), `robust` (robust DPO, with `labelSmoothing` the assumed
  label-flip rate) are TRL's losses of the same names, on the summed log-ratio
  log pi(y|x) - log pi_ref(y|x) of each answer, scaled by `beta`;
- `simpo` is reference-free (SimPO, Meng et al. 2024): -log sigmoid(beta * (mean log pi(chosen) -
  mean log pi(rejected)) - gamma), the length-normalised log-likelihood margin minus a target
  margin `simpoGamma`. It runs on TRL's `sigmoid_norm` loss with the reference log-probs fixed
  instead of computed (zero for rejected, gamma/beta per token for chosen), so no reference model is
  loaded or run.

- `orpo` (ORPO, Hong et al. 2024) is reference-free and needs no SFT stage first: the chosen
  answer's NLL plus `beta` x -log sigmoid(log odds(chosen) - log odds(rejected)), with length-
  normalised log-probabilities. TRL keeps it in `trl.experimental.orpo`; kubetune feeds it its own
  tokenized pairs (the experimental API may change with TRL: the version is pinned).

The reference is the model as training starts: a frozen copy for `full`/`freeze`, and for LoRA
the same base with the adapters disabled (no second copy in memory). `dpo.referenceModel` loads
another one instead. Pairs are tokenized by kubetune (`PairwiseProcessor`) with the run's chat
template, so TRL's own tokenization is skipped.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from kubetune.trainer.context import RunContext
from kubetune.trainer.errors import SpecError
from kubetune.trainer.samples import prompt_column_prompts
from kubetune.trainer.spec import TrainingSpec

sample_prompts = prompt_column_prompts
"""The runner's hook: prompts for the before/after samples come from the rows' `prompt_ids`."""

log = logging.getLogger(__name__)

TRL_LOSS = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "simpo": "sigmoid_norm"}
REFERENCE_FREE = ("simpo", "orpo")


def preflight(spec: TrainingSpec) -> TrainingSpec:
    reference = spec.dpo.referenceModel
    if reference and spec.dpo.lossType in REFERENCE_FREE:
        raise SpecError("dpo.referenceModel", f"lossType {spec.dpo.lossType} is reference-free and uses no reference model.",
                        "remove dpo.referenceModel, or pick a loss that uses one (sigmoid, ipo, hinge, robust).")
    if reference:
        from kubetune.trainer.models.loader import resolve_location

        resolve_location(reference, spec.storage, "dpo.referenceModel")
    if spec.dpo.lossType == "robust" and spec.dpo.labelSmoothing == 0:
        log.info("dpo.lossType robust with labelSmoothing 0 is plain DPO")
    return spec


def _trainer_class():
    from trl import DPOTrainer

    class PreferenceTrainer(DPOTrainer):
        """DPOTrainer on kubetune-tokenized pairs, with fixed reference log-probs for SimPO."""

        def __init__(self, *args: Any, reference_free_margin: float | None = None, **kwargs: Any):
            self.reference_free_margin = reference_free_margin
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset  # already tokenized with the run's template
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            margin = self.reference_free_margin
            if margin is None:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            # sigmoid_norm divides each answer's log-ratio by its length: a chosen "reference" of
            # margin x length turns beta x delta into SimPO's beta x delta - gamma.
            return dataset.map(
                lambda row: {"ref_chosen_logps": margin * len(row["chosen_ids"]), "ref_rejected_logps": 0.0},
                keep_in_memory=True,
            )

    return PreferenceTrainer


def load_reference(spec: TrainingSpec, model) -> Any:
    """The frozen reference policy, or None when TRL derives it (LoRA: adapters off; SimPO: none)."""
    from peft import PeftModel

    if spec.dpo.lossType in REFERENCE_FREE:
        return None
    if spec.dpo.referenceModel:
        from kubetune.trainer.models.loader import load_model

        reference = load_model(spec.model_copy(update={"model": spec.model.model_copy(update={"path": spec.dpo.referenceModel}),
                                                       "method": "full"}), "fp32" if model.dtype.is_floating_point and model.dtype.itemsize == 4 else "bf16")
    elif isinstance(model, PeftModel):
        return None
    else:
        reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def _orpo_trainer_class():
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOTrainer

    from kubetune.trainer.data.processors import IGNORE_INDEX

    class OddsRatioTrainer(ORPOTrainer):
        """ORPOTrainer on kubetune-tokenized pairs (prompt_ids, chosen_ids, rejected_ids)."""

        def tokenize_row(self, feature, model=None) -> dict:
            if "prompt_ids" not in feature:
                return super().tokenize_row(feature, model)
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for name in ("chosen", "rejected"):
                answer = list(feature[f"{name}_ids"])
                row[f"{name}_input_ids"] = prompt + answer
                row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
            return row

    return OddsRatioTrainer


def build_orpo_trainer(ctx: RunContext):
    from trl.experimental.orpo import ORPOConfig

    from kubetune.trainer.stages._trl import trl_config

    d = ctx.spec.dpo
    args = trl_config(ORPOConfig, ctx.training_args, beta=d.beta, max_length=ctx.spec.data.maxLength * 2,
                      max_completion_length=None, disable_dropout=True)

    def drop_text(ds):
        return None if ds is None else ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])

    return _orpo_trainer_class()(
        model=ctx.model,
        args=args,
        train_dataset=drop_text(ctx.data.train),
        eval_dataset=drop_text(ctx.data.eval),
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        optimizers=ctx.optimizers,
    )


def build_trainer(ctx: RunContext):
    from peft import PeftModel
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from kubetune.trainer.stages._trl import count_tokens_with, trl_config

    spec = ctx.spec
    d = spec.dpo
    if d.lossType == "orpo":
        return build_orpo_trainer(ctx)
    reference_free = d.lossType in REFERENCE_FREE
    args = trl_config(
        DPOConfig, ctx.training_args,
        beta=d.beta, loss_type=[TRL_LOSS[d.lossType]], label_smoothing=d.labelSmoothing, max_length=None,
        precompute_ref_log_probs=reference_free, disable_dropout=True,
    )
    collator = DataCollatorForPreference(pad_token_id=ctx.tokenizer.pad_token_id)
    reference = load_reference(spec, ctx.model)
    trainer = _trainer_class()(
        model=ctx.model,
        ref_model=reference,
        args=args,
        data_collator=count_tokens_with(ctx, collator),
        train_dataset=ctx.data.train,
        eval_dataset=ctx.data.eval,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        optimizers=ctx.optimizers,
        reference_free_margin=d.simpoGamma / d.beta if reference_free else None,
    )
    if isinstance(trainer.model, PeftModel) and "ref" in trainer.model.peft_config:
        # TRL copies a pre-existing adapter as the reference; ours is fresh (B = 0), so the base
        # with adapters disabled is the same policy at no memory cost.
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    return trainer

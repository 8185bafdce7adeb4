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

Reported per log (train and eval): `logps/chosen|rejected` (summed log-probabilities) and the
rewards of the loss being trained, `rewards/chosen|rejected|margins|accuracies`: beta x log-ratio
to the reference for the reference-based losses, beta x mean token log-probability for SimPO (its
own reward, not the fixed placeholder reference). A pair whose two rewards tie counts half in
`accuracies` (at step 0 every DPO reward is 0: 0.5, not a misleading 0.0). With an eval split,
`eval_chosen_exact_match` is the share of held-out prompts (the first 64) whose greedy answer is
the chosen one: the generation a preference metric cannot see. `dpo.rpoAlpha` (default 1) adds the chosen
answer's NLL to the loss, and a warning says when the chosen answers' log-probability collapses
(the policy moving away from the answers it should prefer).

The reference is the model as training starts: a frozen copy for `full`/`freeze`, and for LoRA
the same base with the adapters disabled (no second copy in memory). `dpo.referenceModel` loads
another one instead. Pairs are tokenized by kubetune (`PairwiseProcessor`) with the run's chat
template, so TRL's own tokenization is skipped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.context import RunContext
from kubetune.trainer.train.samples import prompt_column_prompts

sample_prompts = prompt_column_prompts
"""The runner's hook: prompts for the before/after samples come from the rows' `prompt_ids`."""

log = logging.getLogger(__name__)

TRL_LOSS = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "simpo": "sigmoid_norm"}
REFERENCE_FREE = ("simpo", "orpo")
GENERATION_EVAL_LIMIT = 64
"""Held-out prompts answered greedily at each evaluation for `eval_chosen_exact_match`."""
MAX_ANSWER_TOKENS = 256
"""Greedy answers stop here (the cost of an evaluation); a longer chosen answer never counts as matched."""
TIE_TOLERANCE = 1e-6


def preference_rewards(loss: str, beta: float, logps: tuple[torch.Tensor, torch.Tensor], lengths: tuple[torch.Tensor, torch.Tensor],
                       reference: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's (chosen, rejected) reward under the loss trained: SimPO's is the length-normalised
    log-likelihood, the others' the log-ratio to the reference, each times beta."""
    if loss == "simpo":
        return tuple(beta * lp / n.clamp(min=1) for lp, n in zip(logps, lengths, strict=True))  # type: ignore[return-value]
    assert reference is not None
    return tuple(beta * (lp - ref) for lp, ref in zip(logps, reference, strict=True))  # type: ignore[return-value]


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Mean rewards, margin and accuracy; a tie counts half (neither answer is preferred)."""
    margins = chosen - rejected
    ties = margins.abs() <= TIE_TOLERANCE
    wins = (margins > 0) & ~ties
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": margins.mean().item(), "rewards/accuracies": (wins.float() + 0.5 * ties.float()).mean().item()}


def chosen_collapsed(start: float, now: float) -> bool:
    """The chosen answers' summed log-probability fell by more than max(1, |start|) nats: they
    became several times less likely than when training started."""
    return now < start - max(1.0, abs(start))


def preflight(spec: TrainingSpec) -> TrainingSpec:
    reference = spec.dpo.referenceModel
    if reference and spec.dpo.lossType in REFERENCE_FREE:
        raise SpecError("dpo.referenceModel", f"lossType {spec.dpo.lossType} is reference-free and uses no reference model.",
                        "remove dpo.referenceModel, or pick a loss that uses one (sigmoid, ipo, hinge, robust).")
    if reference:
        from kubetune.trainer.train.models.locations import resolve_location

        resolve_location(reference, spec.storage, "dpo.referenceModel")
    if spec.dpo.lossType == "robust" and spec.dpo.labelSmoothing == 0:
        log.info("dpo.lossType robust with labelSmoothing 0 is plain DPO")
    return spec


def _trainer_class():
    from trl import DPOTrainer

    from kubetune.trainer.train.stages._trl import labelled_positions_only

    class PreferenceTrainer(DPOTrainer):
        """DPOTrainer on kubetune-tokenized pairs, with fixed reference log-probs for SimPO, the
        rewards of the loss trained, a held-out generation metric and a collapse warning."""

        def __init__(self, *args: Any, loss: str = "sigmoid", reference_free_margin: float | None = None,
                     labelled_logits_only: bool = True, generation_metric: bool = True, **kwargs: Any):
            self.loss_name = loss
            self.generation_metric = generation_metric
            self.labelled_logits_only = labelled_logits_only
            self.reference_free_margin = reference_free_margin
            self.chosen_start: dict[str, float] = {}
            super().__init__(*args, **kwargs)

        def _compute_loss(self, model, inputs, return_outputs):
            """TRL's loss; its reward metrics are then replaced by the ones of this loss (TRL's
            are log-ratios to the placeholder reference for SimPO, and count ties as losses)."""
            captured: list[torch.Tensor] = []
            scored = [m for m in (self.accelerator.unwrap_model(self.model), self.ref_model) if m is not None]
            hooks = [m.register_forward_hook(lambda _m, _a, out: captured.append(out.log_probs.detach())) for m in scored]
            try:
                with labelled_positions_only() if self.labelled_logits_only else contextlib.nullcontext():
                    result = super()._compute_loss(model, inputs, return_outputs)
            finally:
                for hook in hooks:
                    hook.remove()
            record_loss_rewards(self, inputs, captured)
            return result

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            # Rank 0 generates alone: not with ZeRO-partitioned weights (the runner's samples skip them too).
            if dataset is not None and self.generation_metric and self.is_world_process_zero() and not self.is_deepspeed_enabled:
                policy = self.accelerator.unwrap_model(self.model)
                self._metrics["eval"]["chosen_exact_match"] = [chosen_exact_match(policy, self.processing_class, dataset)]
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            super().log(logs, start_time)  # TRL adds its metrics to `logs`
            warn_on_collapse(self, logs)

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


def record_loss_rewards(trainer, inputs: dict[str, torch.Tensor], captured: list[torch.Tensor]) -> None:
    """Overwrite the reward metrics TRL just recorded for this batch with the loss's own, from the
    per-token log-probs of the policy (and reference) forwards captured during the step."""
    mask = inputs["completion_mask"][:, 1:].float()
    sums = [(c[:, -mask.size(1):] * mask).sum(dim=1) for c in captured]  # policy first, then the reference
    logps, lengths = sums[0].chunk(2), mask.sum(dim=1).chunk(2)
    if "ref_chosen_logps" in inputs:
        reference = (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
    else:
        reference = sums[1].chunk(2) if len(sums) > 1 else None
    chosen, rejected = preference_rewards(trainer.loss_name, trainer.beta, logps, lengths, reference)
    mode = "train" if trainer.model.training else "eval"
    metrics = reward_metrics(trainer.accelerator.gather(chosen), trainer.accelerator.gather(rejected))
    for key, value in metrics.items():
        trainer._metrics[mode][key][-1] = value


def warn_on_collapse(trainer, logs: dict[str, float]) -> None:
    """Once per run: the chosen answers' log-probability collapsed since the first log. Watched on
    the held-out set when there is one (the same answers each time; training batches differ)."""
    key = "eval_logps/chosen" if trainer.eval_dataset is not None else "logps/chosen"
    if key not in logs:
        return
    start = trainer.chosen_start.setdefault(key, logs[key])
    if chosen_collapsed(start, logs[key]) and "warned" not in trainer.chosen_start:
        trainer.chosen_start["warned"] = 1.0
        rpo = trainer.args.loss_weights[-1] if "sft" in trainer.loss_types else 0.0
        log.warning("%s fell from %.2f to %.2f at step %d: the policy is moving away from the chosen answers too, "
                    "which degrades what it generates. Raise dpo.rpoAlpha (now %g) or dpo.beta, or lower "
                    "train.learningRate.", key, start, logs[key], trainer.state.global_step, rpo)


def chosen_exact_match(model, tokenizer, dataset) -> float:
    """Share of held-out prompts (the first GENERATION_EVAL_LIMIT) whose greedy answer is the
    chosen answer (case and surrounding space ignored, as the `exact_match` reward)."""
    from kubetune.trainer.train.reward_functions import exact_match
    from kubetune.trainer.train.samples import greedy_completions

    rows = dataset.select(range(min(len(dataset), GENERATION_EVAL_LIMIT)))
    prompts = [list(r) for r in rows["prompt_ids"]]
    chosen = [tokenizer.decode(ids, skip_special_tokens=True) for ids in rows["chosen_ids"]]
    longest = max(len(ids) for ids in rows["chosen_ids"])
    answers = greedy_completions(model, tokenizer, prompts, max_new_tokens=min(longest + 4, MAX_ANSWER_TOKENS))
    scores = exact_match(prompts, answers, reference=chosen)
    return sum(scores) / max(len(scores), 1)


def load_reference(spec: TrainingSpec, model, auto_class: Any = None) -> Any:
    """The frozen reference policy, or None when TRL derives it (LoRA: adapters off; SimPO: none).
    `auto_class` loads `dpo.referenceModel` as the policy was loaded (a vision-language model's)."""
    from peft import PeftModel

    if spec.dpo.lossType in REFERENCE_FREE:
        return None
    if spec.dpo.referenceModel:
        from kubetune.trainer.train.models.loader import load_model

        reference = load_model(spec.model_copy(update={"model": spec.model.model_copy(update={"path": spec.dpo.referenceModel}),
                                                       "method": "full"}), "fp32" if model.dtype.is_floating_point and model.dtype.itemsize == 4 else "bf16",
                               auto_class=auto_class)
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

    from kubetune.trainer.train.data.processors import IGNORE_INDEX

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

    from kubetune.trainer.train.stages._trl import trl_config

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


def build_trainer(ctx: RunContext, *, collator: Any = None, auto_class: Any = None, generation_metric: bool = True):
    """The DPO trainer of this run. A vision-language model's workflow (`stages.vision_dpo`) gives
    its pairs' collator, the class its reference loads with, and no text-only generation metric."""
    from peft import PeftModel
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from kubetune.trainer.train.stages._trl import count_tokens_with, trl_config

    spec = ctx.spec
    d = spec.dpo
    if d.lossType == "orpo":
        return build_orpo_trainer(ctx)
    reference_free = d.lossType in REFERENCE_FREE
    losses, weights = [TRL_LOSS[d.lossType]], None
    if d.rpoAlpha:
        losses, weights = [*losses, "sft"], [1.0, d.rpoAlpha]  # TRL's "sft": the chosen answers' mean token NLL
    args = trl_config(
        DPOConfig, ctx.training_args,
        beta=d.beta, loss_type=losses, loss_weights=weights, label_smoothing=d.labelSmoothing, max_length=None,
        precompute_ref_log_probs=reference_free, disable_dropout=True,
    )
    if collator is None:
        collator = DataCollatorForPreference(pad_token_id=ctx.tokenizer.pad_token_id)
    reference = load_reference(spec, ctx.model, auto_class)
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
        loss=d.lossType,
        reference_free_margin=d.simpoGamma / d.beta if reference_free else None,
        labelled_logits_only=spec.train.logitsOnLabels,
        generation_metric=generation_metric,
    )
    if isinstance(trainer.model, PeftModel) and "ref" in trainer.model.peft_config:
        # TRL copies a pre-existing adapter as the reference; ours is fresh (B = 0), so the base
        # with adapters disabled is the same policy at no memory cost.
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    return trainer

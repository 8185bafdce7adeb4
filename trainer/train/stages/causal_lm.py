"""`pt` and `sft`: next-token prediction with transformers' Trainer.

The two stages differ only in their data (plain text packed into full sequences, or chat turns
with the prompt masked), which `kubetune.trainer.train.data` prepares; the loss is the same.

The output layer runs only where a label is (`train.logitsOnLabels`, on by default). A model's own
loss computes (tokens x vocabulary) logits for every position and then ignores the prompt's: in SFT
that is often half the tokens, and for a 128k-token vocabulary the largest tensor of the step.
`LabelledLogitsTrainer` asks the model for logits at the labelled positions only
(`logits_to_keep`, which transformers' causal LMs take as a tensor of positions) and computes the
same token-summed cross-entropy, normalised as transformers does (by the batch's labelled tokens
across gradient accumulation, `num_items_in_batch`): the loss and gradients equal the full
computation's (tests/test_train.py checks both to 1e-5) at less compute and memory. Liger's fused
linear cross-entropy, when applied, already avoids full logits; the model's own loss runs then.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import Trainer

from kubetune.trainer.train.context import RunContext
from kubetune.trainer.train.data.processors import IGNORE_INDEX
from kubetune.trainer.train.models.moe import aux_loss_term


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token carries a label: the only logits a causal-LM loss reads.
    One index list for the whole batch (the union over rows; a padding-free batch is one row)."""
    has_target = labels[:, 1:] != IGNORE_INDEX
    return has_target.any(dim=0).nonzero().squeeze(-1)


def labelled_logits_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
    """Token-summed cross-entropy over labelled positions, divided by `num_items_in_batch` (the
    labelled tokens of every micro-batch in the optimizer step) or by this batch's labelled tokens."""
    labels = inputs["labels"]
    positions = labelled_positions(labels)
    model_inputs = {name: value for name, value in inputs.items() if name != "labels"}
    outputs = model(**model_inputs, logits_to_keep=positions)
    logits = outputs.logits
    targets = labels[:, 1:][:, positions].to(logits.device)
    total = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        loss = total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    aux = aux_loss_term(model, outputs)  # an MoE model's router loss, which its own loss would add
    return loss if aux is None else loss + aux.to(loss.device)


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the underlying causal LM's forward accepts `logits_to_keep` (transformers' causal LMs
    do; a remote-code model may not, and keeps its own loss)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def uses_fused_loss(model: Any) -> bool:
    """Liger's patched forward computes a fused linear cross-entropy from the labels itself."""
    return bool(getattr(model, "kubetune_liger", False))


class LabelledLogitsTrainer(Trainer):
    """transformers' Trainer whose training loss computes logits at labelled positions only."""

    def __init__(self, *args: Any, labelled_logits_only: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        self.labelled_logits_only = (labelled_logits_only and takes_logits_to_keep(model)
                                     and not uses_fused_loss(model) and self.label_smoother is None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Evaluation (which wants the outputs) and batches without labels keep the model's loss."""
        if not self.labelled_logits_only or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None  # then training_step divides by the accumulation steps itself
        loss = labelled_logits_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss


def build_trainer(ctx: RunContext) -> Trainer:
    return LabelledLogitsTrainer(
        model=ctx.model,
        args=ctx.training_args,
        train_dataset=ctx.data.train,
        eval_dataset=ctx.data.eval,
        data_collator=ctx.data_collator,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        optimizers=ctx.optimizers,
        labelled_logits_only=ctx.spec.train.logitsOnLabels,
    )

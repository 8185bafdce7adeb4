"""`dpo` of a vision-language model: preference pairs about pictures, on TRL's vision DPO path.

`stages.stage_for` picks this workflow for `stage: dpo` when the model has a vision encoder. The
model, its processor, LoRA on the language model (tower and projector frozen unless `vision` asks)
and the image rules are the vision SFT workflow's (`stages.vision`); the trainer is text DPO's
(`stages.dpo`: the same losses, rewards, collapse warning and reference: for LoRA the base with
the adapters disabled, for `full` a frozen copy, or `dpo.referenceModel`).

What differs from text DPO: the pairs carry an `images` column, which makes TRL's `DPOTrainer`
take its vision path (no dataset preparation of its own, no precomputed reference log-probs,
the processor as processing class). The batches come from `data.vision.VisionPreferenceCollator`,
which lays them out as TRL's `DataCollatorForVisionPreference` does (chosen rows, then rejected
rows, a `completion_mask` on the answers, the pictures once per half) but from kubetune's own
token rows, rendered with the run's chat template with each picture where its `<image>` stands
(TRL's collator re-renders every batch with the processor's template and puts every picture
before the first user turn). The log-probabilities come from TRL's fused head on the labelled
positions (`_trl.labelled_positions_only`, as for text): the pixels go through the model's own
forward, the head only scores the answers. Not here: `simpo` (its fixed reference log-probs are
TRL's precomputed ones, which TRL refuses for images), `orpo` (TRL's experimental trainer has no
image batches) and the held-out greedy `eval_chosen_exact_match` (text prompts only).
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.context import RunContext
from kubetune.trainer.train.stages import dpo, vision
from kubetune.trainer.train.stages.vision import (
    apply_method,
    build_datasets,
    load_model,
    load_tokenizer,
    sample_prompts,
)

__all__ = ["apply_method", "build_datasets", "build_trainer", "load_model", "load_tokenizer", "make_collator",
           "preflight", "sample_prompts"]

IMAGE_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
"""The `dpo.lossType`s trained on pictures: those with a reference forward in every step."""


def preflight(spec: TrainingSpec) -> TrainingSpec:
    """The vision workflow's data checks and text DPO's reference checks, and the losses that run
    on pictures only."""
    if spec.dpo.lossType not in IMAGE_LOSSES:
        raise SpecError("dpo.lossType", f"lossType {spec.dpo.lossType} is not trained on images: it needs reference "
                        "log-probabilities computed before training (simpo) or TRL's experimental ORPO trainer (orpo), "
                        "neither of which takes pictures.", f"use one of {', '.join(IMAGE_LOSSES)}.")
    return dpo.preflight(vision.preflight(spec))


def make_collator(processor: Any, spec: TrainingSpec) -> Any:
    from kubetune.trainer.train.data.vision import VisionPreferenceCollator

    return VisionPreferenceCollator(processor)


def build_trainer(ctx: RunContext) -> Any:
    from transformers import AutoModelForImageTextToText

    return dpo.build_trainer(ctx, collator=make_collator(ctx.tokenizer, ctx.spec), auto_class=AutoModelForImageTextToText,
                             generation_metric=False)

"""`sft` of a vision-language model: the causal-LM stage with images in its batches (its `dpo` is
`stages.vision_dpo`, which shares these hooks).

The runner picks this workflow for `stage: sft` when the model has a vision encoder
(`stages.stage_for`). It shares the causal-LM trainer (the loss at labelled positions only, which
LLaVA-style models accept with `pixel_values` beside the tokens) and replaces the hooks that differ:
the model's own processor stands in for the tokenizer (saved with the output, so `kubetune serve`
finds it), rows come from `data.vision`, batches carry pixels, the model loads with
`AutoModelForImageTextToText`, LoRA adapts the language model (`models.vision`), and the held-out
check answers each question with its picture.
"""

from __future__ import annotations

import logging
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.stages.causal_lm import build_trainer

log = logging.getLogger(__name__)

__all__ = ["apply_method", "build_datasets", "build_trainer", "learning_check", "load_model", "load_tokenizer",
           "make_collator", "preflight", "sample_prompts"]


IMAGE_STAGES = ("sft", "dpo")
"""The stages that train a vision-language model (`dpo`: `stages.vision_dpo`)."""


def preflight(spec: TrainingSpec) -> TrainingSpec:
    """Only `sft` and `dpo` train a vision-language model here (TRL's KTO, PPO and GRPO paths for
    pictures are not wired to kubetune's image rows yet); batches are padded rows (the image
    features replace tokens inside each row, which packing or padding-free rows would mix up)."""
    if spec.stage not in IMAGE_STAGES:
        raise SpecError("stage", f"{spec.model.path!r} is a vision-language model, which kubetune trains with stage sft or dpo, "
                        f"not {spec.stage} (pretraining, reward models, KTO, PPO, RAFT and GRPO on images are not supported yet).",
                        "use stage: sft, or stage: dpo with preference pairs about the pictures (conversations with <image>, "
                        "chosen, rejected, images).")
    if spec.data.packing or spec.data.paddingFree or spec.data.streaming:
        raise SpecError("data", "image-text conversations are trained in padded batches: packing, paddingFree and streaming do not apply.",
                        "leave data.packing, data.paddingFree and data.streaming unset (or false).")
    if spec.data.cache not in (None, "off"):
        raise SpecError("data.cache", "the tokenized-data cache does not hold image-text rows yet.", "leave data.cache unset.")
    data = spec.data.model_copy(update={"packing": False, "paddingFree": False})
    return spec.model_copy(update={"data": data})


def load_tokenizer(spec: TrainingSpec) -> Any:
    from kubetune.trainer.train.models.vision import load_processor

    return load_processor(spec)


def build_datasets(spec: TrainingSpec, processor: Any) -> Any:
    from kubetune.trainer.train.data.vision import build_vision_datasets

    return build_vision_datasets(spec, processor)


def make_collator(processor: Any, spec: TrainingSpec) -> Any:
    from kubetune.trainer.train.data.vision import VisionCollator

    return VisionCollator(processor)


def load_model(spec: TrainingSpec, precision: str, tokenizer: Any) -> Any:
    from transformers import AutoModelForImageTextToText

    from kubetune.trainer.train.models.loader import load_model as load

    return load(spec, precision, auto_class=AutoModelForImageTextToText)


def apply_method(model: Any, spec: TrainingSpec) -> Any:
    """The method on the language model; the tower and projector as `vision` says."""
    from kubetune.trainer.train.models.methods import apply_method as apply
    from kubetune.trainer.train.models.vision import freeze_vision, with_vision_targets

    if spec.uses_lora:
        spec = with_vision_targets(spec, model)
    model = apply(model, spec)
    freeze_vision(model, spec)
    return model


def sample_prompts(eval_rows: Any, count: int) -> list:
    """No text-only samples: a question about a picture means nothing without it (the held-out
    check below answers them with their pictures)."""
    return []


def learning_check(model: Any, processor: Any, eval_rows: Any, metrics_path: Any, *, vocab_size: int,
                   generate: bool = True) -> dict[str, Any] | None:
    """`heldout.learning_check` with each held-out question answered with its picture."""
    import torch

    from kubetune.trainer.train.data.vision import image_inputs, token_types
    from kubetune.trainer.train.heldout import learning_check as check

    def pictures(rows: list[int]) -> dict:
        inputs = image_inputs(processor, [path for row in rows for path in eval_rows[row]["images"]])
        for name in token_types(processor, torch.zeros(1, 1, dtype=torch.long)):  # Qwen2-VL's, from the ids
            inputs[name] = lambda ids, name=name: token_types(processor, ids)[name]
        return inputs

    return check(model, processor.tokenizer, eval_rows, metrics_path, vocab_size=vocab_size, generate=generate,
                 row_inputs=pictures)

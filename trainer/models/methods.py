"""Fine-tuning methods: which parameters train (`full`, `freeze`, `lora`)."""

from __future__ import annotations

import logging
import re

from kubetune.trainer.errors import SpecError
from kubetune.trainer.spec import TrainingSpec

log = logging.getLogger(__name__)

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def layer_index(name: str) -> int | None:
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def apply_freeze(model, spec: TrainingSpec) -> None:
    """Train only the last N (or first |N|) decoder layers plus named modules."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if n_layers is None:
        raise SpecError("freeze.trainableLayers", "the model config has no num_hidden_layers.", "use freeze.trainableModules.")
    n = spec.freeze.trainableLayers
    if abs(n) > n_layers:
        raise SpecError("freeze.trainableLayers", f"{n} exceeds the model's {n_layers} layers.", f"use a value between -{n_layers} and {n_layers}.")
    chosen = set(range(n_layers - n, n_layers)) if n > 0 else set(range(-n))
    patterns = spec.freeze.trainableModules
    matched_patterns: set[str] = set()
    for name, param in model.named_parameters():
        idx = layer_index(name)
        by_layer = idx is not None and idx in chosen
        by_name = [p for p in patterns if p in name]
        matched_patterns.update(by_name)
        param.requires_grad_(by_layer or bool(by_name))
    missing = [p for p in patterns if p not in matched_patterns]
    if missing:
        raise SpecError("freeze.trainableModules", f"{missing} match no parameter name.", "use substrings of the model's parameter names, e.g. norm, embed_tokens, lm_head.")


def apply_lora(model, spec: TrainingSpec):
    from peft import LoraConfig, TaskType, get_peft_model

    target = spec.lora.targetModules
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.lora.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora.dropout,
        target_modules="all-linear" if target == ["all-linear"] else target,
        modules_to_save=spec.lora.modulesToSave or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise SpecError("lora.targetModules", f"{exc}", "list module names that exist in the model (e.g. q_proj, v_proj) or use all-linear.") from None


def apply_method(model, spec: TrainingSpec):
    """Mark trainable parameters (or wrap with adapters) according to `spec.method`."""
    if spec.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    elif spec.method == "freeze":
        apply_freeze(model, spec)
    elif spec.method == "lora":
        model = apply_lora(model, spec)
    if spec.train.gradientCheckpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    log.info("method %s: %s of %s parameters trainable (%.2f%%)", spec.method, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model

"""Fine-tuning methods: which parameters train (`full`, `freeze`, `lora`)."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec

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


def lora_config(spec: TrainingSpec):
    """PEFT LoraConfig from the spec, variants included (DoRA, rsLoRA, PiSSA/OLoRA init)."""
    from peft import LoraConfig, TaskType

    target = spec.lora.targetModules
    init: bool | str = True if spec.lora.init == "default" else spec.lora.init
    return LoraConfig(
        # A reward model is a sequence classifier: PEFT must wrap it as one (and save its head).
        task_type=TaskType.SEQ_CLS if spec.stage == "rm" else TaskType.CAUSAL_LM,
        r=spec.lora.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora.effective_dropout,
        target_modules="all-linear" if target == ["all-linear"] else target,
        target_parameters=spec.lora.targetParameters or None,
        modules_to_save=spec.lora.modulesToSave or None,
        use_dora=spec.lora.useDora,
        use_rslora=spec.lora.useRslora,
        init_lora_weights=init,
    )


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns the layers changed.

    On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode without grad (an evaluation, a
    rollout, a sample) repacks the weight in place for a faster kernel and never unpacks it. The
    next training step then multiplies through `gemv_4bit`, which has no backward: the gradient
    that should flow through the frozen base to earlier layers' adapters is silently wrong. The
    model trains, so its weights must keep the layout that has a backward.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def _moe_dropout(model, spec: TrainingSpec, dropout: float) -> float:
    """LoRA dropout for this model: 0 where PEFT adapts MoE expert parameters (its `all-linear`
    adds them itself, or `lora.targetParameters` names them), whose adapters take no dropout,
    unless `lora.dropout` was set: then it is refused, naming the field."""
    from kubetune.trainer.train.models.moe import is_moe

    if not (spec.lora.targetParameters or (is_moe(model.config) and spec.lora.targetModules == ["all-linear"])):
        return dropout
    if "dropout" in spec.lora.model_fields_set and spec.lora.dropout > 0:
        raise SpecError("lora.dropout", "LoRA on this mixture of experts adapts its expert weights through PEFT's "
                        "parameter adapters (all-linear includes them), which take no dropout.",
                        "set lora.dropout to 0 or leave it unset, or list lora.targetModules without the experts.")
    return 0.0


PEFT_NOISE = (
    # PEFT reads the model's `is_gradient_checkpointing`, which transformers 5 deprecates for
    # `is_activation_checkpointing`: nothing a user can change.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # On a transformers-5 mixture of experts PEFT fuses the w1/w3 adapters into `gate_up_proj`
    # with a rank/alpha pattern of its own, applied to that parameter (its lora_A has twice the
    # rank, tests/test_moe.py), and then warns that the pattern matched no *module*.
    (RuntimeWarning, r"The following (rank|alpha)_pattern keys did not match any targeted module and were "
                     r"ignored: \['[^',]*gate_up_proj'\]"),
)
"""Warnings PEFT prints on LoRA runs that are not about anything the spec says (a clean run
prints no warning a user cannot act on); every other warning still shows."""


@contextlib.contextmanager
def _peft_noise_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in PEFT_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def apply_lora(model, spec: TrainingSpec):
    from peft import get_peft_model, prepare_model_for_kbit_training

    from kubetune.trainer.train.models.prequantized import quant_method, quantized_linear_names

    config = lora_config(spec)
    config.lora_dropout = _moe_dropout(model, spec, config.lora_dropout)
    prequantized = quant_method(model.config) is not None
    if prequantized and spec.lora.targetModules == ["all-linear"]:
        config.target_modules = quantized_linear_names(model) or "all-linear"
    if spec.method == "qlora" or prequantized:
        keep_4bit_weights_trainable(model)
        # Casts norms to fp32 and enables input grads so the frozen quantized base backpropagates.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.train.gradientCheckpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    try:
        with _peft_noise_silenced():
            return get_peft_model(model, config)
    except ValueError as exc:
        raise SpecError("lora.targetModules", f"{exc}", "list module names that exist in the model (e.g. q_proj, v_proj) or use all-linear.") from None


def apply_full(model, spec: TrainingSpec) -> None:
    """Everything trains except parameters named in `full.frozenModules`."""
    patterns = spec.full.frozenModules
    matched: set[str] = set()
    for name, param in model.named_parameters():
        hits = [p for p in patterns if p in name]
        matched.update(hits)
        param.requires_grad_(not hits)
    missing = [p for p in patterns if p not in matched]
    if missing:
        raise SpecError("full.frozenModules", f"{missing} match no parameter name.", "use substrings of the model's parameter names, e.g. embed_tokens, norm.")


def apply_method(model, spec: TrainingSpec):
    """Mark trainable parameters (or wrap with adapters) according to `spec.method`.

    `galore` trains like `full`; what differs is its optimizer (see `optimizer_settings`)."""
    if spec.method in ("full", "galore"):
        apply_full(model, spec)
    elif spec.method == "freeze":
        apply_freeze(model, spec)
    elif spec.uses_lora:
        model = apply_lora(model, spec)
    if spec.train.gradientCheckpointing and spec.method != "qlora":  # qlora: done by k-bit preparation
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    log.info("method %s: %s of %s parameters trainable (%.2f%%)", spec.method, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


OPTIMIZER_ALIASES = {"adamw_8bit": "adamw_bnb_8bit", "adam8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def optimizer_settings(spec: TrainingSpec) -> dict:
    """TrainingArguments fields that select the optimizer (8-bit AdamW, GaLore, ...)."""
    import importlib.util

    name = OPTIMIZER_ALIASES.get(spec.train.optimizer, spec.train.optimizer)
    if ("bnb" in name or "8bit" in name) and importlib.util.find_spec("bitsandbytes") is None:
        raise SpecError("train.optimizer", f"{spec.train.optimizer} needs bitsandbytes, which is not installed.", "pip install 'kubetune[quant]'.")
    if spec.method != "galore":
        return {"optim": name}
    if importlib.util.find_spec("galore_torch") is None:
        raise SpecError("method", "galore needs the galore-torch package, which is not installed.", "pip install 'kubetune[galore]'.")
    g = spec.galore
    base = {"adamw_torch": "galore_adamw", "adamw_bnb_8bit": "galore_adamw_8bit", "adafactor": "galore_adafactor"}.get(name, "galore_adamw")
    return {
        "optim": base + ("_layerwise" if g.layerwise else ""),
        "optim_target_modules": g.targetModules,
        "optim_args": f"rank={g.rank}, update_proj_gap={g.updateInterval}, scale={g.scale}",
    }


def loraplus_optimizer(model, spec: TrainingSpec, training_args):
    """LoRA+: one optimizer whose parameter groups give the B matrices `lr x loraplusRatio`."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    optimizer_kwargs.pop("lr", None)
    return create_loraplus_optimizer(
        model, optimizer_cls, lr=spec.train.learningRate, loraplus_lr_ratio=spec.lora.loraplusRatio,
        weight_decay=spec.train.weightDecay, **optimizer_kwargs,
    )

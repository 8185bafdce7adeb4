"""Vision-language models: recognising them, their processor, and which of their parts train.

A vision-language model (LLaVA, Qwen2-VL, ...) is a language model plus a vision tower (the image
encoder) and a projector that maps the tower's features into the language model's embeddings. A
model is one when its config has a `vision_config`. Under `method: lora` the adapters go on the
language model's linear layers only; the tower and the projector stay frozen unless
`vision.trainTower` / `vision.trainProjector` ask for them (the tower then gets adapters too, the
projector trains in full and is saved with the adapter, as PEFT's `modules_to_save`).
"""

from __future__ import annotations

import logging
from typing import Any

from kubetune.trainer.api.builtin import BUILTINS, builtin_name
from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec

log = logging.getLogger(__name__)

TOWER_NAMES = ("vision_tower", "visual", "vision_model", "image_encoder")
"""Module-name segments of vision encoders (LLaVA and most HF VLMs, Qwen2-VL, Idefics/Mllama)."""
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "mm_projector", "connector")
"""Module-name segments of projectors (LLaVA, Qwen2-VL's `visual.merger`, others)."""


def is_vision_config(config: Any) -> bool:
    """Whether a config (object or dict) describes a vision-language model."""
    value = config.get("vision_config") if isinstance(config, dict) else getattr(config, "vision_config", None)
    return value is not None


def is_vision_model(spec: TrainingSpec) -> bool:
    """Whether `model.path` names a vision-language model: the builtin catalogue says so without
    building, anything else by its config (read from the resolved location)."""
    name = builtin_name(spec.model.path)
    if name is not None:
        return "vision_config" in BUILTINS[name]
    from kubetune.trainer.train.models.locations import load_config, resolve_model_location

    # A location that does not resolve fails here, with the loader's own message: the first
    # access to a missing bucket is the only one (no second listing by the loader later).
    location = resolve_model_location(spec.model.path, spec.storage, "model.path")
    try:
        return is_vision_config(load_config(spec, location))
    except SpecError:
        return False  # no readable config: the loader reports that with its own message


def load_processor(spec: TrainingSpec) -> Any:
    """The model's own processor (tokenizer + image processor), padding on the right."""
    from transformers import AutoProcessor

    from kubetune.trainer.train.models.locations import resolve_location

    field = "model.tokenizer" if spec.model.tokenizer else "model.path"
    location = resolve_location(spec.model.tokenizer or spec.model.path, spec.storage, field)
    try:
        processor = AutoProcessor.from_pretrained(location, revision=spec.model.revision, trust_remote_code=spec.model.trustRemoteCode)
    except (OSError, ValueError) as exc:
        raise SpecError(field, f"no processor could be loaded from {location!r} ({str(exc).splitlines()[0]}).",
                        "a vision-language model needs its processor files (processor_config.json / preprocessor_config.json).") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise SpecError(field, f"{location!r} has no image processor and tokenizer pair.", "point model.path at a vision-language model.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return processor


def part_of(name: str) -> str:
    """`tower`, `projector` or `language` for a parameter or module name."""
    segments = name.split(".")
    if any(segment in PROJECTOR_NAMES for segment in segments):
        return "projector"
    if any(segment in TOWER_NAMES for segment in segments):
        return "tower"
    return "language"


def lora_targets(model: Any, spec: TrainingSpec) -> list[str]:
    """Full names of the linear layers that get adapters: the language model's (all of them, or
    those `lora.targetModules` names), the tower's too with `vision.trainTower`; never the output
    head or the projector."""
    import torch

    wanted = spec.lora.targetModules
    output = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        part = part_of(name)
        if part == "projector" or (part == "tower" and not spec.vision.trainTower):
            continue
        if wanted == ["all-linear"] or any(name == t or name.endswith("." + t) for t in wanted):
            names.append(name)
    if not names:
        raise SpecError("lora.targetModules", f"{wanted} match no linear layer of the language model.",
                        "use all-linear or module names such as q_proj, v_proj.")
    return names


def projector_modules(model: Any) -> list[str]:
    """Full names of the projector's linear layers: what PEFT trains and saves in full beside the
    adapter. Its layers rather than the projector module, so that PEFT's mixed-adapter batches
    (the server's rows with different adapters) can route each row, which it does for linear
    layers only."""
    import torch

    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and part_of(name) == "projector")


def with_vision_targets(spec: TrainingSpec, model: Any) -> TrainingSpec:
    """The spec whose LoRA settings adapt what `vision` asks for (see `lora_targets`)."""
    modules = list(spec.lora.modulesToSave)
    if spec.vision.trainProjector:
        modules += projector_modules(model)
    lora = spec.lora.model_copy(update={"targetModules": lora_targets(model, spec), "modulesToSave": modules})
    return spec.model_copy(update={"lora": lora})


def freeze_vision(model: Any, spec: TrainingSpec) -> dict[str, int]:
    """After the method: the tower and the projector keep `requires_grad` only where asked for
    (LoRA parameters on the tower and PEFT's projector copy count as asked). Returns trainable
    parameters per part, for the log."""
    counts = {"language": 0, "tower": 0, "projector": 0}
    for name, param in model.named_parameters():
        part = part_of(name)
        allowed = part == "language" or (part == "tower" and spec.vision.trainTower) or (
            part == "projector" and spec.vision.trainProjector)
        if not allowed:
            param.requires_grad_(False)
        if param.requires_grad:
            counts[part] += param.numel()
    log.info("vision-language model: trainable parameters by part: %s", counts)
    return counts

"""Loading the base model and tokenizer named by `spec.model`, wherever they live.

`model.path` may be a local directory, an `s3://` prefix (downloaded once into the cache by the
storage layer), a hub id, or `builtin:<name>`. Device-dependent choices (precision, attention
kernel) are made here, once, and logged, so a run's log says what actually ran.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import ModelSpec, StorageSpec, TrainingSpec
from kubetune.trainer.train.distributed import cuda_available
from kubetune.trainer.train.models.locations import load_config, resolve_location, resolve_model_location

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def pick_precision(requested: str) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if requested != "auto":
        if requested == "fp16" and not cuda_available():
            raise SpecError("train.precision", "fp16 mixed precision needs a GPU.", "use auto, fp32 or bf16 on CPU.")
        return requested
    if cuda_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def pick_attn_implementation(requested: str, shift_attention: bool = False) -> str:
    """`auto`: flash_attention_2 when installed on an Ampere+ GPU, else sdpa (always sdpa under
    `model.shiftAttention`, whose per-group masks flash-attn cannot take)."""
    if requested == "auto" and shift_attention:
        return "sdpa"
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise SpecError(
                "model.attnImplementation",
                "flash_attention_2 was requested but the flash-attn package is not installed.",
                "install kubetune[gpu] on a GPU machine, or use auto/sdpa.",
            )
        return requested
    import torch

    if (
        importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability()[0] >= 8
    ):
        choice = "flash_attention_2"
    else:
        choice = "sdpa"
    log.info("attention implementation: %s (model.attnImplementation=auto)", choice)
    return choice


def load_tokenizer(model: ModelSpec, storage: StorageSpec):
    """The tokenizer, with a pad token (eos when the model has none) and right padding."""
    from transformers import AutoTokenizer

    field = "model.tokenizer" if model.tokenizer else "model.path"
    location = resolve_location(model.tokenizer or model.path, storage, field)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=model.revision, trust_remote_code=model.trustRemoteCode
        )
    except (OSError, ValueError) as exc:
        raise SpecError(field, f"no tokenizer could be loaded from {location!r} ({_first_line(exc)}).",
                        "check the path or hub id, and that the hub is reachable (HF_HUB_OFFLINE).") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(spec: TrainingSpec, compute_dtype: str):
    """bitsandbytes settings for `method: qlora` (4-bit NF4 + double quantisation, or 8-bit)."""
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise SpecError("method", "qlora needs the bitsandbytes package, which is not installed.", "pip install 'kubetune[quant]'.")
    q = spec.quantization
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = DTYPES.get(q.computeDtype) or compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quantType,
        bnb_4bit_use_double_quant=q.doubleQuant,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )


def load_model(spec: TrainingSpec, precision: str, *, extra_kwargs: dict[str, Any] | None = None, auto_class: Any = None):
    """The causal LM (or `auto_class`'s model: a vision-language one) in the dtype that fits the
    precision, with the chosen attention kernel."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype_name = DTYPES.get(spec.model.dtype) or PRECISION_DTYPE[precision]
    if precision in ("bf16", "fp16") and spec.method in ("full", "freeze", "galore") and spec.model.dtype == "auto":
        # Mixed precision keeps fp32 master weights for fully trained parameters.
        dtype_name = "float32"
    from kubetune.trainer.train.models.prequantized import check_prequantized
    from kubetune.trainer.train.models.rope import warn_beyond_context

    location = resolve_model_location(spec.model.path, spec.storage, "model.path")
    config = load_config(spec, location)
    warn_beyond_context(config, spec)
    check_prequantized(spec, config, location)  # GPTQ/AWQ/AQLM: LoRA only, kernels present
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": getattr(torch, dtype_name),
        "attn_implementation": pick_attn_implementation(spec.model.attnImplementation, spec.model.shiftAttention),
        "revision": spec.model.revision,
        "trust_remote_code": spec.model.trustRemoteCode,
    }
    if spec.method == "qlora":
        kwargs["quantization_config"] = quantization_config(spec, PRECISION_DTYPE[precision])
        if cuda_available():
            from kubetune.trainer.train.distributed import world_info

            kwargs["device_map"] = {"": world_info()[1]}
    kwargs.update(extra_kwargs or {})
    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise SpecError("model.path", f"no model could be loaded from {location!r} ({_first_line(exc)}).",
                        "check the path or hub id, and that the hub is reachable (HF_HUB_OFFLINE).") from None
    log.info("loaded %s (%s, %s)", location, dtype_name, kwargs["attn_implementation"])
    if spec.model.shiftAttention:
        from kubetune.trainer.train.models.shift_attn import apply_shift_attention

        apply_shift_attention(model, spec.data.maxLength)
    elif spec.padding_free_enabled and auto_class is None:
        from kubetune.trainer.train.models.varlen import use_varlen_sdpa

        use_varlen_sdpa(model)  # SDPA per example of each padding-free row, not over a row x row mask
    from kubetune.trainer.train.models.moe import prepare_moe

    prepare_moe(model, spec)
    if spec.model.ligerKernel or (spec.model.ligerKernel is None and liger_available()):
        model.kubetune_liger = apply_liger(model)
    return model


def liger_available() -> bool:
    """Liger's kernels are Triton kernels: they need the package and a CUDA GPU."""
    return importlib.util.find_spec("liger_kernel") is not None and cuda_available()


def apply_liger(model) -> bool:
    """Swap in Liger's fused kernels where the package and a GPU are present."""
    if not liger_available():
        log.warning("model.ligerKernel is set but liger-kernel or a GPU is missing: using the standard kernels")
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
    log.info("applied Liger kernels")
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""Loading the base model and tokenizer named by `spec.model`, wherever they live.

`model.path` may be a local directory, an `s3://` prefix (downloaded once into the cache by the
storage layer), a hub id, or `builtin:<name>`. Device-dependent choices (precision, attention
kernel) are made here, once, and logged, so a run's log says what actually ran.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import ModelSpec, StorageSpec, TrainingSpec
from kubetune.trainer.api.specfile import REFERENCE_SCHEME
from kubetune.trainer.train.models.builtin import is_builtin, resolve_builtin

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_location(location: str, storage: StorageSpec, field: str) -> str:
    """A local path for builtin, local and S3 locations; hub ids are returned unchanged."""
    if location.startswith(REFERENCE_SCHEME):
        raise SpecError(field, f"comes from another job's output ({location[len(REFERENCE_SCHEME):]}), which only the operator resolves.",
                        "to run it here, pass that job's output location: --set model.path=outputs/NAME (or its s3:// URI).")
    if is_builtin(location):
        return str(resolve_builtin(location, field))
    if location.startswith("s3://"):
        from kubetune.trainer.artifacts import localize

        return str(localize(location, storage, field=field))
    path = Path(location).expanduser()
    if path.exists():
        return str(path)
    if location.startswith((".", "/", "~")) or location.count("/") > 1:
        raise SpecError(field, f"{location!r} does not exist.", "point it at a model directory, an s3:// URI or a hub id.")
    return location  # a hub id such as `meta-llama/Llama-3.2-1B`


def resolve_model_location(location: str, storage: StorageSpec, field: str) -> str:
    """Like `resolve_location`, but a LoRA output directory (the previous stage of a pipeline, or
    an AlignmentJob's `baseModelFrom` a LoRA FineTuneJob) becomes its adapter merged into its base:
    the next stage trains (and, for DPO/PPO, refers to) the model the previous stage produced.
    The merge is cached by the adapter's content, so ranks and retries share one copy."""
    resolved = resolve_location(location, storage, field)
    adapter_dir = Path(resolved)
    if not (adapter_dir / "adapter_config.json").is_file():
        return resolved
    return str(merged_adapter(adapter_dir, storage))


def merged_adapter(adapter_dir: Path, storage: StorageSpec) -> Path:
    import hashlib
    import os
    import shutil
    import tempfile

    from kubetune.trainer.artifacts.cache import cache_root, mark_used
    from kubetune.trainer.artifacts.hashing import file_hexdigest
    from kubetune.trainer.train.export import export_merged

    digest = hashlib.sha256()
    for file in sorted(p for p in adapter_dir.iterdir() if p.is_file()):
        digest.update(f"{file.name}:{file_hexdigest(file)}\n".encode())  # streamed, not read whole
    target = cache_root(storage) / "merged" / digest.hexdigest()[:24]
    if (target / "config.json").is_file():
        mark_used(target)  # for `kubetune storage gc`'s least-recently-used order
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".merging-", dir=target.parent))
    try:
        export_merged(str(adapter_dir), str(scratch / "model"), storage=storage)
        try:
            os.replace(scratch / "model", target)  # atomic: a reader never sees half a model
        except OSError:
            if not (target / "config.json").is_file():  # not another rank's finished copy
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("merged the adapter %s into its base for this stage (%s)", adapter_dir, target)
    return target


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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


def pick_attn_implementation(requested: str) -> str:
    """`auto`: flash_attention_2 when installed on an Ampere+ GPU, else sdpa."""
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


def load_config(spec: TrainingSpec, location: str):
    """The model config with spec-driven changes (RoPE scaling) applied before weights load."""
    from transformers import AutoConfig

    from kubetune.trainer.train.models.rope import apply_rope_scaling

    try:
        config = AutoConfig.from_pretrained(location, revision=spec.model.revision, trust_remote_code=spec.model.trustRemoteCode)
    except (OSError, ValueError) as exc:
        raise SpecError("model.path", f"no model config could be loaded from {location!r} ({_first_line(exc)}).",
                        "check the path or hub id, and that the hub is reachable (HF_HUB_OFFLINE).") from None
    return apply_rope_scaling(config, spec)


def load_model(spec: TrainingSpec, precision: str, *, extra_kwargs: dict[str, Any] | None = None):
    """The causal LM in the dtype that fits the precision, with the chosen attention kernel."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype_name = DTYPES.get(spec.model.dtype) or PRECISION_DTYPE[precision]
    if precision in ("bf16", "fp16") and spec.method in ("full", "freeze", "galore") and spec.model.dtype == "auto":
        # Mixed precision keeps fp32 master weights for fully trained parameters.
        dtype_name = "float32"
    from kubetune.trainer.train.models.rope import warn_beyond_context

    location = resolve_model_location(spec.model.path, spec.storage, "model.path")
    config = load_config(spec, location)
    warn_beyond_context(config, spec)
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": getattr(torch, dtype_name),
        "attn_implementation": pick_attn_implementation(spec.model.attnImplementation),
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
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise SpecError("model.path", f"no model could be loaded from {location!r} ({_first_line(exc)}).",
                        "check the path or hub id, and that the hub is reachable (HF_HUB_OFFLINE).") from None
    log.info("loaded %s (%s, %s)", location, dtype_name, kwargs["attn_implementation"])
    if spec.model.ligerKernel:
        apply_liger(model)
    return model


def apply_liger(model) -> bool:
    """Swap in Liger's fused kernels where the package and a GPU are present."""
    if importlib.util.find_spec("liger_kernel") is None or not cuda_available():
        log.warning("model.ligerKernel is set but liger-kernel or a GPU is missing: using the standard kernels")
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
    log.info("applied Liger kernels")
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

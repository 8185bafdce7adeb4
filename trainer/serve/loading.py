"""Loading what kubetune trained for inference: a full/merged model, or LoRA adapters on a base.

A location is a local directory, an `s3://` prefix (localized by the storage layer), a hub id
or `builtin:<name>`. What it holds decides how it loads:

- a model directory (`config.json`): loaded as-is; RoPE scaling is in its saved config;
- a LoRA output directory (`adapter_config.json`): its base comes from the `kubetune-spec.yaml`
  saved beside it (which also restores RoPE scaling on the base), else from the adapter's
  `base_model_name_or_path`; the adapter is attached with PEFT.

Several adapters share one base through PEFT's multi-adapter support: each is loaded under its
own name and picked per batch (`set_adapter`), the base alone runs with the adapters disabled.
The tokenizer (with the chat template used in training) comes from the first directory that has
one: the adapter's output, else the model's; each adapter keeps its own chat template.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.artifacts.adapters import (
    AdapterRef,
    adapter_base,
    has_tokenizer,
    is_adapter_dir,
    read_saved_spec,
)

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    """A model ready for generation, with the names it answers to."""

    model: Any
    tokenizer: Any
    base_name: str
    """The name the base model (adapters disabled) is served under."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Adapter name -> local directory."""
    templates: dict[str, str | None] = field(default_factory=dict)
    """Served name -> chat template (None: the tokenizer's)."""
    context_length: int = 2048
    location: str = ""
    """Local directory of the base model."""
    processor: Any = None
    """A vision-language model's processor (image token, image processor); None for text models."""
    default_model: str | None = None
    """The served name of what `location` pointed at: the adapter's for a LoRA output, else None
    (the base). Generation without an explicit model name uses it."""

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    @property
    def device(self):
        return next(self.model.parameters()).device


def resolve_path(location: str, storage: StorageSpec, field: str, *, merge_adapters: bool = False) -> Path | str:
    from kubetune.trainer.train.models.locations import resolve_location, resolve_model_location

    resolved = (resolve_model_location if merge_adapters else resolve_location)(location, storage, field)
    path = Path(resolved)
    return path if path.exists() else resolved


def default_name(location: str, spec: Any = None) -> str:
    if spec is not None and getattr(spec, "name", None):
        return spec.name
    if location.startswith("builtin:"):
        return location[len("builtin:"):]
    return Path(location.rstrip("/")).name or location


def _pick_dtype(dtype: str, device: str):
    import torch

    if dtype != "auto":
        if dtype not in DTYPES:
            raise SpecError("--dtype", f"{dtype!r} is not a dtype.", f"use one of {', '.join(DTYPES)}.")
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class _Target:
    """What a location resolves to before anything is loaded."""

    base_local: Path | str
    base_name: str
    tokenizer_dir: Path | str
    spec: Any = None
    default_model: str | None = None
    adapters: list[AdapterRef] = field(default_factory=list)


def load_model(
    location: str,
    *,
    adapters: list[AdapterRef] | None = None,
    base: str | None = None,
    served_name: str | None = None,
    storage: StorageSpec | None = None,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    max_model_len: int | None = None,
) -> LoadedModel:
    """Load a model (or an adapter output, or a base plus adapters) for generation.

    Raises SpecError (a user error: exit 2) for a missing path, a directory that holds no model,
    or an adapter that does not fit its base.
    """
    from kubetune.trainer.train.models.rope import context_length

    storage = storage or StorageSpec()
    device = pick_device(device)
    target = _resolve_target(location, list(adapters or []), base, served_name, storage)
    adapter_dirs, adapter_specs = _resolve_adapters(target.adapters, storage, target.base_name)
    spec = target.spec if target.spec is not None or not adapter_dirs else adapter_specs[next(iter(adapter_dirs))]
    config = _load_base_config(spec if adapter_dirs else None, target.base_local, trust_remote_code)
    tokenizer = _load_serving_tokenizer(target.tokenizer_dir, trust_remote_code)
    processor = _load_processor(target.tokenizer_dir, config, tokenizer, trust_remote_code)
    torch_dtype = _pick_dtype(dtype, device)
    model = _load_weights(target.base_local, config, torch_dtype, attn_implementation, trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # new rows come from the adapter

    templates: dict[str, str | None] = {target.base_name: template_of(target.base_local, tokenizer)}
    if adapter_dirs:
        model = _attach_adapters(model, adapter_dirs, str(target.base_local))
        for name, path in adapter_dirs.items():
            templates[name] = template_of(path, tokenizer)
    model.to(device)
    model.eval()
    context = context_length(model.config) or getattr(tokenizer, "model_max_length", 2048)
    if max_model_len:
        context = min(context, max_model_len) if context else max_model_len
    log.info("loaded %s on %s (%s); serving %s", target.base_local, device, torch_dtype,
             ", ".join([target.base_name, *adapter_dirs]))
    return LoadedModel(model=model, tokenizer=tokenizer, base_name=target.base_name,
                       adapters={k: str(v) for k, v in adapter_dirs.items()}, templates=templates,
                       context_length=int(context), location=str(target.base_local), default_model=target.default_model,
                       processor=processor)


def _resolve_target(location: str, adapters: list[AdapterRef], base: str | None, served_name: str | None,
                    storage: StorageSpec) -> _Target:
    """A model directory loads as-is; a LoRA output is served under its own name on its base."""
    local = resolve_path(location, storage, "model")
    if isinstance(local, Path) and is_adapter_dir(local):
        # The tokenizer saved with the adapter is the one it was trained with (chat template, added tokens).
        base_location, spec = adapter_base(local)
        base_location = base or base_location
        adapters.insert(0, AdapterRef(name=served_name or default_name(location, spec), location=str(local)))
        # A pipeline step's adapter sits on the previous step's output, itself maybe an adapter:
        # that base is the previous adapter merged into its own base (as the step trained on it).
        base_local = resolve_path(base_location, storage, "--base", merge_adapters=True)
        return _Target(base_local, default_name(base_location), local if has_tokenizer(local) else base_local,
                       spec, adapters[0].name, adapters)
    if isinstance(local, Path) and local.is_dir() and not (local / "config.json").is_file():
        raise SpecError("model", f"{str(local)!r} holds neither a model (config.json) nor a LoRA adapter (adapter_config.json).",
                        "point it at a training output directory, a merged model or a hub id.")
    if isinstance(local, Path) and local.is_file():
        raise SpecError("model", f"{str(local)!r} is a file, not a model directory.", "pass the directory that holds config.json.")
    spec = read_saved_spec(local) if isinstance(local, Path) else None
    return _Target(local, served_name or default_name(location, spec), local, spec, None, adapters)


def _resolve_adapters(adapters: list[AdapterRef], storage: StorageSpec,
                      base_name: str) -> tuple[dict[str, Path], dict[str, Any]]:
    """Adapter name -> local directory, and -> the training spec saved beside it."""
    adapter_dirs: dict[str, Path] = {}
    adapter_specs: dict[str, Any] = {}
    for ref in adapters:
        path = resolve_path(ref.location, storage, f"adapter {ref.name}")
        if not isinstance(path, Path) or not is_adapter_dir(path):
            raise SpecError(f"adapter {ref.name}", f"{ref.location!r} holds no LoRA adapter (adapter_config.json).",
                            "pass the output directory of a LoRA/QLoRA training run.")
        if ref.name in adapter_dirs or ref.name == base_name:
            raise SpecError(f"adapter {ref.name}", "the name is used twice.", "give every adapter its own name.")
        adapter_dirs[ref.name] = path
        adapter_specs[ref.name] = read_saved_spec(path)
    return adapter_dirs, adapter_specs


def _load_base_config(adapter_spec: Any, base_local: Path | str, trust_remote_code: bool):
    """The saved config (RoPE scaling included); for a base under an adapter, the adapter's
    training spec re-applies the RoPE scaling it was trained with."""
    from transformers import AutoConfig

    from kubetune.trainer.train.models.locations import load_config

    try:
        if adapter_spec is not None:
            return load_config(adapter_spec, str(base_local))
        return AutoConfig.from_pretrained(str(base_local), trust_remote_code=trust_remote_code)
    except SpecError:
        raise
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"no model config could be loaded from {str(base_local)!r} ({_first_line(exc)}).",
                        "check the path or hub id, and that the hub is reachable (HF_HUB_OFFLINE).") from None


def _load_serving_tokenizer(tokenizer_dir: Path | str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"no tokenizer could be loaded from {str(tokenizer_dir)!r} ({_first_line(exc)}).",
                        "the directory should hold the tokenizer saved by training.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation pads on the left
    return tokenizer


def _load_processor(directory: Path | str, config: Any, tokenizer: Any, trust_remote_code: bool) -> Any:
    """A vision-language model's processor (saved with its tokenizer, by training too), sharing the
    serving tokenizer; None for a text model."""
    from transformers import AutoProcessor

    from kubetune.trainer.train.models.vision import is_vision_config

    if not is_vision_config(config):
        return None
    try:
        processor = AutoProcessor.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"{str(directory)!r} is a vision-language model without its processor ({_first_line(exc)}).",
                        "serve the directory training wrote (it saves the processor), or copy the base's processor files.") from None
    processor.tokenizer = tokenizer
    return processor


def _load_weights(base_local: Path | str, config: Any, torch_dtype: Any, attn_implementation: str,
                  trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from kubetune.trainer.train.models.loader import pick_attn_implementation
    from kubetune.trainer.train.models.vision import is_vision_config

    auto_class = AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM
    try:
        return auto_class.from_pretrained(
            str(base_local), config=config, dtype=torch_dtype,
            attn_implementation=pick_attn_implementation(attn_implementation),
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"no model could be loaded from {str(base_local)!r} ({_first_line(exc)}).",
                        "check the path or hub id, and that the hub is reachable (HF_HUB_OFFLINE).") from None


def _attach_adapters(model, adapter_dirs: dict[str, Path], base_location: str):
    from peft import PeftModel

    peft_model = None
    for name, path in adapter_dirs.items():
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise SpecError(f"adapter {name}", f"does not fit the base model {base_location!r} ({_first_line(exc)}).",
                            "serve it on the base it was trained on (its kubetune-spec.yaml names it), or pass --base.") from None
    return peft_model


def template_of(directory: Path | str, tokenizer) -> str | None:
    """The chat template saved with the tokenizer in `directory` (training saves it there)."""
    from kubetune.trainer.train.data.templates import current_template

    path = Path(str(directory))
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text()).get("chat_template")
        except ValueError:
            template = None
        if isinstance(template, list):  # named templates
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template:
            return template
    return current_template(tokenizer)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

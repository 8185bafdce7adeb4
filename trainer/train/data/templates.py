"""Built-in chat templates and how a run picks one.

A chat template turns the internal conversation form (`messages` + optional `tools`) into the
exact text the model sees, at training time here and at inference time (the template is saved
with the tokenizer, so `kubetune serve`/vLLM render prompts identically). The built-ins are
plain Jinja strings in the Hugging Face `chat_template` convention, so any tokenizer's own
template can be used the same way.

Rules every built-in follows, because the SFT masking relies on them:
- an assistant turn ends with the template's turn terminator followed by the tokenizer's eos
  token (once, when they are the same token), so the model learns to stop;
- rendering the conversation up to turn k with `add_generation_prompt=True` is a string prefix
  of rendering it with turn k (the generation prompt is exactly what precedes the answer), which
  lets the masker find each assistant span by rendering prefixes;
- a leading `system` message and the `tools` list go into one system block.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from kubetune.trainer.api.errors import SpecError

log = logging.getLogger(__name__)

# Shared preamble: split off a leading system message, and fold `tools` into the system text.
# `{default_system}` is substituted per template (a Jinja string literal).
_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = {default_system} -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{%- set system = (system + '\\n\\n' if system else '') + 'You can call these tools:\\n' + (tools | tojson) -%}"
    "{%- endif -%}"
)


def _with_system(body: str, default_system: str = "''") -> str:
    return _SYSTEM.replace("{default_system}", default_system) + body


DEFAULT = _with_system(
    "{{- bos_token if bos_token else '' -}}"
    "{%- if system -%}{{- 'System: ' + system + '\\n\\n' -}}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}{{- 'User: ' + m['content'] + '\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- 'Assistant: ' + m['content'] + eos_token + '\\n' -}}"
    "{%- elif m['role'] == 'tool' -%}{{- 'Tool: ' + m['content'] + '\\n' -}}"
    "{%- elif m['role'] == 'system' -%}{{- 'System: ' + m['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)

CHATML = _with_system(
    "{%- if system -%}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' -}}"
    "{%- if m['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' -%}{{- eos_token -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = _with_system(
    "{{- bos_token if bos_token else '' -}}"
    "{%- if system -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- set role = 'ipython' if m['role'] == 'tool' else m['role'] -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- if m['role'] == 'assistant' and eos_token and eos_token != '<|eot_id|>' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

ALPACA = _with_system(
    "{{- bos_token if bos_token else '' -}}"
    "{%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '### Instruction:\\n' + m['content'] + '\\n\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '### Response:\\n' + m['content'] + eos_token + '\\n\\n' -}}"
    "{%- elif m['role'] == 'tool' -%}{{- '### Observation:\\n' + m['content'] + '\\n\\n' -}}"
    "{%- elif m['role'] == 'system' -%}{{- m['content'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}",
    default_system=(
        "'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.'"
    ),
)

VICUNA = _with_system(
    "{{- bos_token if bos_token else '' -}}"
    "{%- if system -%}{{- system + ' ' -}}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + m['content'] + eos_token -}}"
    "{%- elif m['role'] == 'tool' -%}{{- 'OBSERVATION: ' + m['content'] + ' ' -}}"
    "{%- elif m['role'] == 'system' -%}{{- m['content'] + ' ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}",
    default_system=(
        "'A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.'"
    ),
)

PLAIN = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{- m['content'] + eos_token -}}"
    "{%- else -%}{{- m['content'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
"""No wrapper: each turn's text as it is, an answer followed by eos; the generation prompt is
empty, so the model continues the prompt text. LMFlow trains `text2text` data exactly so (input,
then output, then eos) and LlamaFactory's `empty` template is the same."""

TEMPLATES: dict[str, str] = {
    "plain": PLAIN,
    "default": DEFAULT,
    "chatml": CHATML,
    "llama3": LLAMA3,
    "alpaca": ALPACA,
    "vicuna": VICUNA,
}
"""Built-in chat templates by name (Jinja, Hugging Face `chat_template` convention)."""

DESCRIPTIONS: dict[str, str] = {
    "plain": "prompt followed directly by the answer and eos, no wrapper (LMFlow text2text's rendering).",
    "default": "System:/User:/Assistant: lines, kubetune's own; works with any tokenizer.",
    "chatml": "<|im_start|>role ... <|im_end|> (Qwen, Yi, many chat fine-tunes).",
    "llama3": "<|start_header_id|>role<|end_header_id|> ... <|eot_id|> (Llama 3.x instruct).",
    "alpaca": "### Instruction: / ### Response: blocks (Stanford Alpaca).",
    "vicuna": "USER: ... ASSISTANT: ... (Vicuna v1.1).",
}
"""One line per built-in, for `kubetune templates`."""

TOKENIZER = "tokenizer"
CUSTOM = "custom"


def describe_templates() -> list[tuple[str, str]]:
    """(name, description) for every built-in template, in display order."""
    return [(name, DESCRIPTIONS.get(name, "")) for name in TEMPLATES]


def apply_template(tokenizer: Any, template: str | None, *, field: str = "data.template") -> str | None:
    """Install the spec's `data.template` on the tokenizer and return the name recorded for it.

    `None` changes nothing: it returns "tokenizer" when the tokenizer has its own template, else
    None, and the data decides once it is loaded (`resolve_template`), since a faithful default
    depends on the format. A built-in name installs that template; any other string containing
    Jinja syntax is used verbatim (returns "custom"). The template is compiled here so a syntax
    error is reported against the spec field instead of deep inside tokenization.
    """
    if template is None:
        return TOKENIZER if current_template(tokenizer) else None
    if template in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[template]
        return template
    if "{{" not in template and "{%" not in template:
        raise SpecError(
            field,
            f"{template!r} is neither a built-in template nor a Jinja template.",
            f"use one of {', '.join(TEMPLATES)}, or a Jinja chat template string.",
        )
    try:
        compile_template(template)
    except Exception as exc:  # jinja2.TemplateSyntaxError and friends
        raise SpecError(
            field, f"the Jinja template does not compile: {exc}.", "fix the template syntax."
        ) from exc
    tokenizer.chat_template = template
    return CUSTOM


TEXT_FORMATS = ("text", "lmflow:text_only")
"""Source formats whose rows are documents: trained as they are, no template involved."""
TEXT2TEXT = "lmflow:text2text"
NO_TEMPLATE = "none"


def resolve_template(tokenizer: Any, requested: str | None, formats: list[str]) -> tuple[str, str]:
    """The template a run uses, as (name, why), once its sources' `formats` are known.

    Each format renders the way its home toolkit trains it: `data.template` when set (already
    installed by `apply_template`); LMFlow text2text alone as input, output and eos (`plain`,
    what LMFlow does, whatever the tokenizer has); documents need no template; other
    conversations use the tokenizer's own template. A tokenizer without one gets no made-up
    wrapper (a base model trained on one learnt nothing in the issue that led here): that is a
    SpecError naming `data.template`.
    """
    if requested is not None:
        return (requested if requested in TEMPLATES else CUSTOM), "data.template"
    chats = sorted({f for f in formats if f not in TEXT_FORMATS})
    if chats == [TEXT2TEXT]:
        tokenizer.chat_template = PLAIN
        return "plain", "LMFlow text2text: the input followed directly by the output and eos, as LMFlow trains it"
    if not chats:
        return NO_TEMPLATE, "plain-text documents only: trained as they are"
    own = current_template(tokenizer)
    if own:
        if TEXT2TEXT in chats:
            log.warning("LMFlow text2text data is mixed with %s data: every conversation is rendered with the "
                        "tokenizer's chat template (set data.template: plain for LMFlow's own rendering)",
                        ", ".join(f for f in chats if f != TEXT2TEXT))
        return template_name(own), "the tokenizer's own chat template"
    raise SpecError(
        "data.template",
        f"the tokenizer has no chat template, and {', '.join(chats)} data holds conversations that need one to "
        "become training text; kubetune does not make one up (a wrapper the model was never prompted with can "
        "keep it from learning anything).",
        "set data.template to how the model is to be prompted: `plain` (the prompt followed directly by the "
        "answer and eos, no wrapper), a built-in chat template such as `alpaca`, `chatml` or `default` "
        "(`kubetune templates` lists them), or a Jinja template; or use a model whose tokenizer has one.",
    )


def template_name(template: str) -> str:
    """A template's built-in name when it is one (a tokenizer may ship a built-in), else "tokenizer"."""
    return next((name for name, text in TEMPLATES.items() if text == template), TOKENIZER)


def current_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template as one string (the `default` entry of a named-template dict)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


@lru_cache(maxsize=16)
def compile_template(template: str) -> Any:
    """Compile with the same sandboxed Jinja environment transformers uses for `apply_chat_template`,
    so training renders exactly what inference renders; direct rendering skips its per-call overhead."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template)
    except ImportError:  # pragma: no cover - transformers moved the helper
        import json

        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
            return json.dumps(value, ensure_ascii=False, indent=indent)

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template)

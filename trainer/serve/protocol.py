"""OpenAI API request bodies (the subset kubetune serves) and the error shape.

Unknown fields are accepted and ignored, as OpenAI's SDKs send fields a server may not know;
fields kubetune cannot honour with the value given are refused with a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kubetune.trainer.serve.params import MAX_TOP_LOGPROBS, InvalidRequest, SamplingParams

MAX_BEST_OF = 16
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""`--max-request-bytes`: 4 MiB; a 128k-token prompt is well under 1 MB of text (or of token ids)."""
DEFAULT_MAX_ADAPTERS = 64
"""`--max-adapters`: an InferenceService lists at most 64 adapters, so one the operator drives
never hits it."""


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    """Extension (vLLM has it too): keep the k most likely tokens; 0 is off."""
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    """A 64-bit signed integer, as in OpenAI's API (torch's generators take no more)."""
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = False
    """Extension (as in vLLM): keep generating past the end-of-sequence token (benchmarks)."""

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [value] if isinstance(value, str) else value

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            stop=list(self.stop or []), seed=self.seed, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, ignore_eos=self.ignore_eos, logprobs=self.logprob_count(),
            prompt_logprobs=self.prompt_logprob_count(),
        ).validate()

    def logprob_count(self) -> int | None:
        """Alternatives per token to report (0: the chosen token only; None: no logprobs)."""
        return None

    def prompt_logprob_count(self) -> int | None:
        """Alternatives per prompt token to report (None: the prompt is not scored)."""
        return None

    @property
    def samples_per_prompt(self) -> int:
        """Sequences generated per prompt (`best_of` for completions, else `n`)."""
        return self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def as_template_message(self, image_token: str | None = None) -> dict[str, Any]:
        """The message as chat templates take it: text content, each `image_url` part replaced by
        `image_token` (the served model's, None when it takes no images: such parts are refused)."""
        content = self.content
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind == "image_url" and image_token is not None:
                    parts.append(image_token)
                    continue
                if kind not in ("text", None):
                    why = "this model takes no images" if kind == "image_url" else f"content parts of type {kind!r} are not supported"
                    raise InvalidRequest("messages", f"{why}.", "send text content.")
                parts.append(str(part.get("text") or ""))
            content = "".join(parts)
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        # Tool-use turns keep their fields for templates that render them.
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def sampling(self) -> SamplingParams:
        params = super().sampling()
        if self.max_completion_tokens is not None:
            params.max_tokens = self.max_completion_tokens
        return params

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "top_logprobs needs logprobs set to true.", "send logprobs: true as well.")
        return (self.top_logprobs or 0) if self.logprobs else None

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the template should show the model (none with `tool_choice: "none"`)."""
        if self.tool_choice == "none":
            return None
        if self.tool_choice not in (None, "auto"):
            # The reply is free text: nothing makes the model call a tool, so promising it would be wrong.
            raise InvalidRequest("tool_choice", "forcing a tool call is not supported.",
                                 'use "auto" or "none", and ask for the tool in the messages.')
        return self.tools or None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    """OpenAI's default for completions is 16 tokens; 0 (with echo and logprobs) only scores the prompt."""
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """The chosen token's logprob and this many alternatives per position (OpenAI: up to 5)."""
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)
    """Generate this many per prompt and return the `n` with the highest mean token logprob."""

    def prompt_logprob_count(self) -> int | None:
        return self.logprobs if self.echo else None

    def logprob_count(self) -> int | None:
        if self.best_of is not None and self.best_of > 1 and self.logprobs is None:
            return 0  # ranking needs the chosen tokens' logprobs, even when the client did not ask for them
        return self.logprobs

    @property
    def samples_per_prompt(self) -> int:
        if self.best_of is None:
            return self.n
        if self.best_of < self.n:
            raise InvalidRequest("best_of", f"best_of ({self.best_of}) must be at least n ({self.n}).")
        if self.stream and self.best_of > self.n:
            raise InvalidRequest("best_of", "best_of cannot be used with stream.", "leave best_of unset when streaming.")
        return self.best_of

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or token ids; an empty one is refused (a model needs at least
        one token to predict from, and kubetune adds none of its own)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequest("prompt", "must not be empty, nor hold an empty prompt.",
                                 "send at least one character (or token id) per prompt.")
        return prompts


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter` body."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter` body."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)

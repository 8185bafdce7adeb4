"""OpenAI API request bodies (the subset kubetune serves) and the error shape.

Unknown fields are accepted and ignored, as OpenAI's SDKs send fields a server may not know;
fields kubetune cannot honour with the value given are refused with a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kubetune.trainer.infer.params import InvalidRequest, SamplingParams


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
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = False
    """Extension (as in vLLM): keep generating past the end-of-sequence token (benchmarks)."""
    logprobs: Any = None
    best_of: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [value] if isinstance(value, str) else value

    def sampling(self) -> SamplingParams:
        if self.logprobs:
            raise InvalidRequest("logprobs", "logprobs are not supported by this server.", "leave logprobs unset.")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of", "best_of is not supported by this server.", "use n instead.")
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            stop=list(self.stop or []), seed=self.seed, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, ignore_eos=self.ignore_eos,
        ).validate()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") not in ("text", None):
                    raise InvalidRequest("messages", f"content parts of type {part.get('type')!r} are not supported.",
                                         "send text content.")
                parts.append(str(part.get("text") or ""))
            content = "".join(parts)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None

    def sampling(self) -> SamplingParams:
        params = super().sampling()
        if self.max_completion_tokens is not None:
            params.max_tokens = self.max_completion_tokens
        return params


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    """OpenAI's default for completions is 16 tokens."""
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequest("prompt", "must not be empty.")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

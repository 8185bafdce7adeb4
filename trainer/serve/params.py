"""Sampling settings and the unit of work an engine runs: one sequence to generate.

The names follow OpenAI's API (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`, ...) so the
server maps a request onto them one to one, and the CLI flags are the same words.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune.trainer.api.errors import SpecError

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20


class InvalidRequest(SpecError):
    """A request parameter is out of range (CLI: exit 2; server: 400 with OpenAI's error shape)."""

    def __init__(self, param: str, problem: str, fix: str | None = None, code: str | None = None):
        super().__init__(param, problem, fix)
        self.param = param
        self.code = code


@dataclass
class SamplingParams:
    """How tokens are picked. `temperature` 0 is greedy decoding."""

    max_tokens: int | None = None
    """New tokens at most; None: up to the context length (or `default_max_tokens`)."""
    default_max_tokens: int | None = None
    """With `max_tokens` unset: at most this many new tokens, fewer when the context has less room
    left. The CLI's defaults are this kind: a default must fit any model, never be an error."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    stop: list[str] = field(default_factory=list)
    """Generation ends before the first of these strings; it is not part of the output."""
    seed: int | None = None
    """Makes sampling reproducible (per sequence; the i-th of `n` uses seed + i)."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    logprobs: int | None = None
    """Record the log-probability of every generated token and of this many most likely
    alternatives (0: the chosen token only; None: off). Values are of the model's own distribution,
    before temperature, top-p and penalties, as in OpenAI's API."""
    prompt_logprobs: int | None = None
    """Also score the prompt: the logprob of every prompt token after the first, with this many
    alternatives (None: off). With it, `max_tokens` 0 only scores the prompt."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self) -> SamplingParams:
        if self.max_tokens is not None and self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise InvalidRequest("max_tokens", f"must be at least 1, got {self.max_tokens}.",
                                 "0 is allowed only to score a prompt (echo with logprobs).")
        if not 0 <= self.temperature <= 2:
            raise InvalidRequest("temperature", f"must be between 0 and 2, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"must be >= 0, got {self.top_k}.")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequest(name, f"must be between -2 and 2, got {getattr(self, name)}.")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}.")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop", "stop sequences must be non-empty strings.")
        if self.seed is not None and not -(2**63) <= self.seed <= 2**63 - 1:
            raise InvalidRequest("seed", f"must be a 64-bit signed integer, got {self.seed}.",
                                 f"use a seed between {-(2**63)} and {2**63 - 1}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise InvalidRequest(name, f"must be between 0 and {MAX_TOP_LOGPROBS}, got {value}.")
        return self

    def for_choice(self, index: int) -> SamplingParams:
        """The settings of the `index`-th of `n` samples (distinct seeds stay reproducible)."""
        if self.seed is None or index == 0:
            return self
        return SamplingParams(**{**self.__dict__, "seed": self.seed + index})


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token, and the `top` alternatives (id, logprob) at its
    position, most likely first (empty unless `SamplingParams.logprobs` > 0)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Event:
    """Text produced for one sequence. The last event of a sequence has `finish_reason` set."""

    text: str = ""
    tokens: int = 0
    """New tokens since the previous event."""
    finish_reason: str | None = None
    """`stop` (eos or a stop string), `length` (max_tokens / context), `cancelled`, `error`."""
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    """With `SamplingParams.logprobs` set: one entry per token counted in `tokens`."""


@dataclass
class Sequence:
    """One sequence to generate: a prompt, its settings, its adapter, and where its text goes."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    """A loaded adapter's name; None runs the base model."""
    emit: Callable[[Event], None] | None = None
    """Called (on the engine's thread) with each piece of text as it is decoded."""
    lstrip: bool = False
    """Drop leading whitespace (chat replies: templates put a space after `Assistant:`)."""
    media: dict[str, Any] | None = None
    """The prompt's pictures as the engine takes them: the processor's tensors (`pixel_values`,
    ...) for the transformers engine, vLLM's `multi_modal_data` for vLLM; None for text."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set it (from any thread) to stop generating this sequence and free its batch slot."""
    # results, filled by the engine
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    """One entry per `token_ids` entry when `params.logprobs` is set."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """One entry per prompt token when `params.prompt_logprobs` is set (the first is None); filled
    when the sequence is prefilled, before its first event."""
    finish_reason: str | None = None
    tag: Any = None


@dataclass
class Completion:
    """A finished generation (library API)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

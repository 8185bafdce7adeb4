"""Token logprobs in OpenAI's response shapes.

- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
  "refusal": null}`;
- completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`.

A token's text is what it adds to the text before it: decoding a token alone drops the leading
space of SentencePiece pieces and splits multi-byte characters, so each piece is decoded after a
few preceding tokens and the preceding text is cut off. Alternatives are decoded the same way,
in the context of the chosen tokens before them.
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.serve.params import TokenLogprob

CONTEXT_TOKENS = 4
"""Preceding tokens decoded with a piece (enough for SentencePiece spaces and split characters)."""


class LogprobFormatter:
    """Formats one sequence's logprobs, piece by piece, as its events arrive."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], text_offset: int = 0):
        self.tokenizer = tokenizer
        self.context = list(prompt_ids[-CONTEXT_TOKENS:])
        self.offset = text_offset

    def _piece(self, token: int, *, chosen: bool = True) -> str:
        """What `token` adds to the text so far. Chosen tokens are decoded as the response text is
        (special tokens dropped, so the pieces add up to it); alternatives keep special tokens
        visible (an end-of-sequence alternative shows as such)."""
        skip = chosen
        context = self.context[-CONTEXT_TOKENS:]
        before = self.tokenizer.decode(context, skip_special_tokens=skip)
        after = self.tokenizer.decode([*context, token], skip_special_tokens=skip)
        if after.startswith(before):
            return after[len(before):]
        return self.tokenizer.decode([token], skip_special_tokens=skip)

    def chat(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        """Entries of a chat choice's `logprobs.content` for the next tokens."""
        content = []
        for entry in entries:
            token = self._piece(entry.token)
            top = [_chat_entry(self._piece(alt, chosen=False), lp) for alt, lp in entry.top]
            content.append({**_chat_entry(token, entry.logprob), "top_logprobs": top})
            self.context.append(entry.token)
        return content

    def completion(self, entries: list[TokenLogprob], *, prompt: list[int] | None = None,
                   prompt_entries: list[TokenLogprob | None] | None = None) -> dict[str, Any]:
        """A completion choice's `logprobs` object for the next tokens; with `prompt` (echo), the
        prompt's tokens come first (the first one has no logprob: nothing precedes it)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        scored: list[tuple[int, TokenLogprob | None]] = []
        if prompt is not None:
            scored += list(zip(prompt, prompt_entries or [None] * len(prompt), strict=True))
        scored += [(entry.token, entry) for entry in entries]
        for token_id, entry in scored:
            token = self._piece(token_id)
            tokens.append(token)
            offsets.append(self.offset)
            self.offset += len(token)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                alternatives: dict[str, float] = {}
                for alt, lp in entry.top:
                    alternatives.setdefault(self._piece(alt, chosen=False), lp)
                token_logprobs.append(entry.logprob)
                top_logprobs.append(alternatives)
            self.context.append(token_id)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _chat_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def mean_logprob(entries: list[TokenLogprob] | None) -> float:
    """The average logprob per token (how `best_of` ranks samples); -inf for an empty sample."""
    if not entries:
        return float("-inf")
    return sum(entry.logprob for entry in entries) / len(entries)

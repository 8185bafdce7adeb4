"""Incremental detokenization and stop-string handling for one sequence.

The engine feeds a sequence's tokens one at a time; the tracker decides when the sequence is done
(end-of-sequence, a stop string, max tokens, cancelled) and hands each new piece of text to the
sequence's `emit` callback, holding back only what could still become a stop string or an
incomplete UTF-8 character, so streamed text never has to be taken back.
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.serve.params import Event, Sequence, TokenLogprob


class TextTracker:
    """Follows one sequence's generated tokens and turns them into text and events."""

    def __init__(self, tokenizer: Any, seq: Sequence, max_new: int, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.seq = seq
        self.max_new = max_new
        self.eos_ids = set() if seq.params.ignore_eos else eos_ids
        self.emitted = 0
        self.counted = 0
        self.done = False
        if seq.params.logprobs is not None and seq.logprobs is None:
            seq.logprobs = []

    def add(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record one new token (and its logprob, when asked for); True when the sequence has finished."""
        seq = self.seq
        if seq.cancelled.is_set():
            return self.finish("cancelled")
        if token in self.eos_ids:
            return self.finish("stop")
        seq.token_ids.append(token)
        if seq.logprobs is not None and logprob is not None:
            seq.logprobs.append(logprob)
        text = self._text()
        stops = seq.params.stop
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                return self.finish("stop", text[:cut])
        if len(seq.token_ids) >= self.max_new:
            return self.finish("length", text)
        self._emit(text, self._safe_end(text))
        return False

    def _text(self) -> str:
        text = self.tokenizer.decode(self.seq.token_ids, skip_special_tokens=True)
        return text.lstrip() if self.seq.lstrip else text

    def _safe_end(self, text: str) -> int:
        """How much of `text` can be sent: not a trailing partial character or partial stop string."""
        end = len(text)
        if text.endswith("\ufffd"):
            end = len(text.rstrip("\ufffd"))
        for stop in self.seq.params.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return max(end, self.emitted)

    def _emit(self, text: str, end: int, finish_reason: str | None = None) -> None:
        delta = text[self.emitted:end]
        tokens = len(self.seq.token_ids) - self.counted
        if not delta and finish_reason is None:
            return
        logprobs = None
        if self.seq.logprobs is not None:
            logprobs = self.seq.logprobs[self.counted:len(self.seq.token_ids)]
        self.emitted = end
        self.counted = len(self.seq.token_ids)
        if self.seq.emit is not None:
            self.seq.emit(Event(text=delta, tokens=tokens, finish_reason=finish_reason, logprobs=logprobs))

    def finish(self, reason: str, text: str | None = None) -> bool:
        """End the sequence with `reason` (idempotent); the last event carries the rest of the text."""
        if self.done:
            return True
        text = self._text() if text is None else text
        self.seq.text = text
        self.seq.finish_reason = reason
        self.done = True
        self._emit(text, len(text), reason)
        return True

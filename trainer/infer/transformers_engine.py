"""The transformers engine: batched generation with a KV cache, streaming, speculative decoding.

`run()` takes sequences with their own prompts, sampling settings and adapters. Sequences on the
same adapter are decoded together in one left-padded batch: one prefill forward, then one forward
per step for the whole batch, with each row sampled by its own settings (greedy, temperature,
top-p/top-k, penalties, seed). A finished or cancelled row leaves the batch at once (its KV-cache
rows are dropped), so a long answer does not make short ones pay, and a client that disconnects
frees its slot. Text is decoded incrementally and handed to each sequence's `emit` callback as it
appears, holding back only what could still become a stop string or an incomplete character.

With a draft model (`draft=`) or prompt lookup (`prompt_lookup=N`), sequences run one at a time
through transformers' assisted generation (it verifies the draft's tokens with the target, so
greedy output is exactly the target's greedy output, only faster).
"""

from __future__ import annotations

import logging
from typing import Any

from kubetune.trainer.infer.engine import Engine
from kubetune.trainer.infer.params import Event, Sequence

log = logging.getLogger(__name__)


class TextTracker:
    """Incremental detokenization and stop-string handling for one sequence."""

    def __init__(self, tokenizer: Any, seq: Sequence, max_new: int, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.seq = seq
        self.max_new = max_new
        self.eos_ids = set() if seq.params.ignore_eos else eos_ids
        self.emitted = 0
        self.counted = 0
        self.done = False

    def add(self, token: int) -> bool:
        """Record one new token; returns True when the sequence has finished."""
        seq = self.seq
        if seq.cancelled.is_set():
            return self.finish("cancelled")
        if token in self.eos_ids:
            return self.finish("stop")
        seq.token_ids.append(token)
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
        self.emitted = end
        self.counted = len(self.seq.token_ids)
        if self.seq.emit is not None:
            self.seq.emit(Event(text=delta, tokens=tokens, finish_reason=finish_reason))

    def finish(self, reason: str, text: str | None = None) -> bool:
        if self.done:
            return True
        text = self._text() if text is None else text
        self.seq.text = text
        self.seq.finish_reason = reason
        self.done = True
        self._emit(text, len(text), reason)
        return True


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, loaded: Any, *, draft_model: Any = None, prompt_lookup: int | None = None,
                 num_assistant_tokens: int | None = None):
        super().__init__(base_name=loaded.base_name, adapters=loaded.adapters, templates=loaded.templates,
                         context_length=loaded.context_length, tokenizer=loaded.tokenizer)
        self.loaded = loaded
        self.model = loaded.model
        self.draft_model = draft_model
        self.prompt_lookup = prompt_lookup
        self.num_assistant_tokens = num_assistant_tokens
        self.is_peft = hasattr(self.model, "peft_config")
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos_list = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in [*eos_list, self.tokenizer.eos_token_id] if e is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)

    @property
    def speculative(self) -> bool:
        return self.draft_model is not None or bool(self.prompt_lookup)

    @classmethod
    def load(cls, model: str, *, adapters: list | None = None, draft: str | None = None, prompt_lookup: int | None = None,
             num_assistant_tokens: int | None = None, **kwargs: Any) -> TransformersEngine:
        from kubetune.trainer.infer.loading import load_model

        loaded = load_model(model, adapters=adapters, **kwargs)
        draft_model = None
        if draft:
            draft_kwargs = {k: v for k, v in kwargs.items() if k in ("storage", "dtype", "device", "trust_remote_code")}
            draft_model = load_model(draft, **draft_kwargs).model
        return cls(loaded, draft_model=draft_model, prompt_lookup=prompt_lookup, num_assistant_tokens=num_assistant_tokens)

    # -- scheduling ------------------------------------------------------------------------
    def run(self, sequences: list[Sequence]) -> None:
        import torch

        if not sequences:
            return
        with torch.inference_mode():
            if self.speculative:
                for seq in sequences:
                    self._with_adapter(seq.adapter, self._assisted, seq)
                return
            groups: dict[str | None, list[Sequence]] = {}
            for seq in sequences:
                groups.setdefault(seq.adapter, []).append(seq)
            for adapter, group in groups.items():
                self._with_adapter(adapter, self._decode_batch, group)

    def _with_adapter(self, adapter: str | None, fn, arg) -> None:
        if not self.is_peft:
            if adapter is not None:
                raise ValueError(f"no adapter {adapter!r} is loaded")
            fn(arg)
            return
        if adapter is None:
            with self.model.disable_adapter():
                fn(arg)
        else:
            self.model.set_adapter(adapter)
            fn(arg)

    # -- the batched decode loop -----------------------------------------------------------
    def _decode_batch(self, sequences: list[Sequence]) -> None:
        import torch
        from transformers import DynamicCache

        device = self.loaded.device
        trackers = [TextTracker(self.tokenizer, s, self.check_length(len(s.prompt_ids), s.params), self.eos_ids)
                    for s in sequences]
        width = max(len(s.prompt_ids) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            input_ids[i, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            attention[i, width - len(seq.prompt_ids):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        generators = [self._generator(s, device) for s in sequences]
        counts: list[dict[int, int]] = [{} for _ in sequences]
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                            past_key_values=cache, use_cache=True).logits[:, -1, :]
        active = list(range(len(sequences)))  # row r of the batch is sequence active[r]
        last_pos = positions[:, -1:]
        while True:
            rows = [sequences[i] for i in active]
            next_tokens = self._sample(logits, rows, [generators[i] for i in active], [counts[i] for i in active])
            keep: list[int] = []
            for r, i in enumerate(active):
                token = next_tokens[r]
                counts[i][token] = counts[i].get(token, 0) + 1
                if not trackers[i].add(token):
                    keep.append(r)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention, last_pos = attention[index], last_pos[index]
                next_tokens = [next_tokens[r] for r in keep]
                active = [active[r] for r in keep]
            feed = torch.tensor(next_tokens, dtype=torch.long, device=device)[:, None]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
            last_pos = last_pos + 1
            logits = self.model(input_ids=feed, attention_mask=attention, position_ids=last_pos,
                                past_key_values=cache, use_cache=True).logits[:, -1, :]

    @staticmethod
    def _generator(seq: Sequence, device):
        import torch

        if seq.params.greedy or seq.params.seed is None:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(seq.params.seed)
        return gen

    @staticmethod
    def _sample(logits, rows: list[Sequence], generators: list, counts: list[dict[int, int]]) -> list[int]:
        """The next token of every row, each by its own settings (vectorised across rows)."""
        import torch

        logits = logits.float()
        penalised = [r for r, seq in enumerate(rows) if (seq.params.frequency_penalty or seq.params.presence_penalty) and counts[r]]
        if penalised:
            logits = logits.clone()
            for r in penalised:
                p = rows[r].params
                ids = torch.tensor(list(counts[r]), device=logits.device)
                freq = torch.tensor(list(counts[r].values()), dtype=logits.dtype, device=logits.device)
                logits[r, ids] -= p.frequency_penalty * freq + p.presence_penalty
        out = logits.argmax(dim=-1).tolist()
        sampled = [r for r, seq in enumerate(rows) if not seq.params.greedy]
        if not sampled:
            return out
        index = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([rows[r].params.temperature for r in sampled], device=logits.device)
        scores = logits[index] / temps[:, None]
        for k, r in enumerate(sampled):
            top_k = rows[r].params.top_k
            if top_k:
                kth = torch.topk(scores[k], min(top_k, scores.shape[-1])).values[-1]
                scores[k] = scores[k].masked_fill(scores[k] < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        top_p = torch.tensor([rows[r].params.top_p for r in sampled], device=logits.device)
        if bool((top_p < 1).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]  # keep the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        shared = [k for k, r in enumerate(sampled) if generators[r] is None]
        if shared:
            picks = torch.multinomial(probs[shared], 1).squeeze(-1).tolist()
            for k, token in zip(shared, picks, strict=True):
                out[sampled[k]] = token
        for k, r in enumerate(sampled):
            if generators[r] is not None:  # seeded rows draw from their own generator: reproducible
                out[r] = int(torch.multinomial(probs[k], 1, generator=generators[r]))
        return out

    # -- speculative decoding --------------------------------------------------------------
    def _assisted(self, seq: Sequence) -> None:
        """One sequence through `generate` with a draft model or prompt lookup."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        max_new = self.check_length(len(seq.prompt_ids), seq.params)
        tracker = TextTracker(self.tokenizer, seq, max_new, self.eos_ids)
        prompt_len = len(seq.prompt_ids)

        class Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.first = True

            def put(self, value) -> None:
                if self.first:  # generate() first sends the prompt
                    self.first = False
                    return
                for token in value.reshape(-1).tolist():
                    if tracker.done or tracker.add(int(token)):
                        break

            def end(self) -> None:
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), tracker.done or seq.cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        p = seq.params
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": not p.greedy,
                                  "pad_token_id": self.pad_id, "eos_token_id": None if p.ignore_eos else sorted(self.eos_ids)}
        if not p.greedy:
            kwargs.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
            if p.seed is not None:
                torch.manual_seed(p.seed)
        if self.draft_model is not None:
            kwargs["assistant_model"] = self.draft_model
            if self.num_assistant_tokens:
                self.draft_model.generation_config.num_assistant_tokens = self.num_assistant_tokens
        else:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        ids = torch.tensor([seq.prompt_ids], device=self.loaded.device)
        output = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=Streamer(),
                                     stopping_criteria=StoppingCriteriaList([Stop()]), **kwargs)
        if not tracker.done:
            # generate() ended without the tracker seeing a terminal token (eos or max length).
            new = output[0, prompt_len:].tolist()
            finished_by_eos = bool(new) and new[-1] in self.eos_ids
            tracker.finish("stop" if finished_by_eos else "length")


def greedy_reference(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **generate_kwargs) -> list[int]:
    """Plain `model.generate` greedy tokens (the reference speculative decoding must reproduce)."""
    import torch

    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    return out[0, len(prompt_ids):].tolist()

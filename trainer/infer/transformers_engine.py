"""The transformers engine: continuous batching on a KV cache, streaming, speculative decoding.

Sequences carry their own prompts, sampling settings and adapters. They are decoded in a
`DecodeBatch` (see `decode.py`): one prefill forward when they join, then one forward per step for
every running row, each row sampled by its own settings (greedy, temperature, top-p/top-k,
penalties, seed) and, on request, with the logprobs of its tokens. Rows join between steps (the
server admits new requests into the running batch) and leave as soon as they finish or are
cancelled, so a long answer does not make short ones wait, and a client that disconnects frees
its slot. Text is decoded incrementally (`tracking.py`) and handed to each sequence's `emit`.

With a draft model (`draft=`) or prompt lookup (`prompt_lookup=N`), sequences run one at a time
through transformers' assisted generation (it verifies the draft's tokens with the target, so
greedy output is exactly the target's greedy output, only faster); logprobs are not available there.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from kubetune.trainer.infer.decode import DecodeBatch
from kubetune.trainer.infer.engine import Engine
from kubetune.trainer.infer.params import Sequence
from kubetune.trainer.infer.tracking import TextTracker

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, loaded: Any, *, draft_model: Any = None, prompt_lookup: int | None = None,
                 num_assistant_tokens: int | None = None):
        super().__init__(base_name=loaded.base_name, adapters=loaded.adapters, templates=loaded.templates,
                         context_length=loaded.context_length, tokenizer=loaded.tokenizer,
                         default_model=loaded.default_model)
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
        base = self.model.get_base_model() if self.is_peft else self.model
        self.supports_logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters

    @property
    def supports_logprobs(self) -> bool:
        return not self.speculative

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

    # -- generation ------------------------------------------------------------------------
    def open_batch(self) -> DecodeBatch | None:
        """A running batch for the server's continuous batching (None with speculative decoding,
        whose assisted generation runs one sequence at a time)."""
        if self.speculative:
            return None
        return DecodeBatch(self)

    def run(self, sequences: list[Sequence]) -> None:
        import torch

        if not sequences:
            return
        if self.speculative:
            with torch.inference_mode():
                for seq in sequences:
                    self._with_adapter(seq.adapter, self._assisted, seq)
            return
        batch = DecodeBatch(self)
        batch.admit(sequences)
        while batch:
            batch.step()

    def check_adapter(self, adapter: str | None) -> None:
        """Raise when `adapter` is not one this engine has loaded."""
        if adapter is not None and (not self.is_peft or adapter not in self.adapters):
            raise ValueError(f"no adapter {adapter!r} is loaded")

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _with_adapter(self, adapter: str | None, fn, arg) -> None:
        if not self.is_peft:
            self.check_adapter(adapter)
            fn(arg)
            return
        if adapter is None:
            with self.model.disable_adapter():
                fn(arg)
        else:
            self.model.set_adapter(adapter)
            fn(arg)

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

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

from kubetune.trainer.serve.decode import DecodeBatch
from kubetune.trainer.serve.engine import Engine
from kubetune.trainer.serve.params import Sequence
from kubetune.trainer.serve.tracking import TextTracker

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
        self.processor = getattr(loaded, "processor", None)
        """A vision-language model's processor (its image token, image processor), else None."""
        self.image_token = getattr(self.processor, "image_token", None)
        self.draft_model = draft_model
        self.prompt_lookup = prompt_lookup
        self.num_assistant_tokens = num_assistant_tokens
        self.is_peft = hasattr(self.model, "peft_config")
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos_list = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in [*eos_list, self.tokenizer.eos_token_id] if e is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        base = self.model.get_base_model() if self.is_peft else self.model
        forward_parameters = inspect.signature(base.forward).parameters
        self.supports_logits_to_keep = "logits_to_keep" in forward_parameters
        self.cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
        """transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` is deprecated)."""
        self.roots: dict[str, str] = {}
        """Served adapter name -> the `lora_path` it was loaded from at runtime (`/v1/models` root)."""
        self._peft_names: dict[str, str] = {name: name for name in self.adapters}
        """Served adapter name -> its PEFT adapter name (differs after an in-place reload)."""
        self._retired: set[str] = set()
        """PEFT adapters no longer served (unloaded, or replaced in place) that sequences admitted
        before may still use: deleted once none does (`release_adapters`)."""
        self._generation = 0

    @property
    def supports_logprobs(self) -> bool:
        return not self.speculative

    @property
    def speculative(self) -> bool:
        return self.draft_model is not None or bool(self.prompt_lookup)

    @classmethod
    def load(cls, model: str, *, adapters: list | None = None, draft: str | None = None, prompt_lookup: int | None = None,
             num_assistant_tokens: int | None = None, **kwargs: Any) -> TransformersEngine:
        from kubetune.trainer.serve.loading import load_model

        loaded = load_model(model, adapters=adapters, **kwargs)
        draft_model = None
        if draft:
            draft_kwargs = {k: v for k, v in kwargs.items() if k in ("storage", "dtype", "device", "trust_remote_code")}
            draft_model = load_model(draft, **draft_kwargs).model
        return cls(loaded, draft_model=draft_model, prompt_lookup=prompt_lookup, num_assistant_tokens=num_assistant_tokens)

    def encode_chat_images(self, messages: list[dict[str, Any]], images: list[Any], model: str | None = None,
                           tools: Any = None) -> tuple[list[int], dict[str, Any]]:
        """The processor expands each image token into the vision encoder's feature count; its
        image tensors go with the sequence and into the prefill forward (`DecodeBatch`)."""
        from kubetune.trainer.serve.params import InvalidRequest

        if self.processor is None:
            return super().encode_chat_images(messages, images, model, tools)
        if self.speculative:
            raise InvalidRequest("messages", "images are not served with speculative decoding.", "serve without --draft-model/--prompt-lookup.")
        if multimodal_positions(self.model):
            raise InvalidRequest("messages", "this model places image tokens with its own multimodal RoPE (Qwen2-VL style), "
                                 "which the transformers engine's batch does not compute.", "serve it with --engine vllm.")
        text = self.render_chat(messages, model, tools)
        if text.count(self.image_token) != len(images):
            raise InvalidRequest("messages", f"the text holds the image token {self.image_token!r} {text.count(self.image_token)} "
                                 f"time(s) for {len(images)} image(s).", "send images as image_url parts only.")
        out = self.processor(text=[text], images=images, add_special_tokens=False, return_tensors="pt")
        media = {k: v.to(self.loaded.device) for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        return out["input_ids"][0].tolist(), media

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

    def adapter_for(self, model: str | None) -> str | None:
        """The PEFT adapter a request's `model` selects (None: the base). Raises UnknownModel."""
        name = super().adapter_for(model)
        return None if name is None else self._peft_names.get(name, name)

    def check_adapter(self, adapter: str | None) -> None:
        """Raise when `adapter` is not one this engine has loaded."""
        if adapter is not None and (not self.is_peft or adapter not in self.model.peft_config):
            raise ValueError(f"no adapter {adapter!r} is loaded")

    # -- runtime adapters (the server calls these on the engine thread, between decode steps) --
    def load_adapter(self, name: str, path: Any, *, root: str | None = None, replace: bool = False) -> None:
        """Serve the LoRA adapter in local directory `path` as `name` from now on. With `replace`
        an adapter already served under `name` is swapped for it (sequences admitted before finish
        with the old one). Raises SpecError when it does not fit the base or the name is taken."""
        from kubetune.trainer.api.errors import SpecError
        from kubetune.trainer.serve.loading import template_of

        if name == self.base_name:
            raise SpecError("lora_name", f"{name!r} is the base model's name.", "give the adapter another name.")
        if name in self.adapters and not replace:
            raise SpecError("lora_name", f"the adapter {name!r} has already been loaded.",
                            "unload it first, or pass load_inplace: true.")
        stem = name.replace(".", "_")  # PEFT keeps adapters in ModuleDicts: no dots in their names
        peft_name = stem
        while self.is_peft and peft_name in self.model.peft_config:
            self._generation += 1
            peft_name = f"{stem}@{self._generation}"
        self.model = self._attach(self.model, peft_name, str(path))
        self.is_peft = True
        old = self._peft_names.get(name)
        if old is not None:
            self._retired.add(old)
        self._peft_names[name] = peft_name
        self.adapters[name] = str(path)
        self.roots[name] = root or str(path)
        self.templates[name] = template_of(path, self.tokenizer) or self.templates[self.base_name]

    def _attach(self, model: Any, peft_name: str, path: str) -> Any:
        import contextlib

        from peft import PeftModel

        from kubetune.trainer.api.errors import SpecError
        from kubetune.trainer.serve.loading import _first_line

        wrapped = isinstance(model, PeftModel)
        try:
            if wrapped:
                model.load_adapter(path, adapter_name=peft_name, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, path, adapter_name=peft_name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            # Undo what was injected before the weights were refused: the model must serve as before.
            if wrapped:
                with contextlib.suppress(Exception):
                    if peft_name in model.peft_config:
                        model.delete_adapter(peft_name)
            else:
                _strip_lora(model)
            raise SpecError(f"adapter {peft_name}", f"does not fit the base model {self.loaded.location!r} "
                            f"({_first_line(exc)}).", "load it on a server of the base it was trained on.") from None
        model.to(self.loaded.device)
        model.eval()
        return model

    def unload_adapter(self, name: str) -> None:
        """Stop serving `name` (UnknownModel when it is not an adapter served here). Sequences
        admitted before finish with it; its weights go once none uses them."""
        from kubetune.trainer.serve.engine import UnknownModel

        if name not in self.adapters:
            raise UnknownModel(name, self.adapters)
        del self.adapters[name]
        self.roots.pop(name, None)
        self.templates.pop(name, None)
        self._retired.add(self._peft_names.pop(name, name))

    @property
    def retired_adapters(self) -> set[str]:
        """PEFT adapters waiting for `release_adapters`."""
        return self._retired

    def release_adapters(self, in_use: set[str | None]) -> None:
        """Delete the retired adapters no sequence in `in_use` still needs (engine thread)."""
        for peft_name in sorted(self._retired - in_use):
            self._retired.discard(peft_name)
            if not self.is_peft or peft_name not in self.model.peft_config:
                continue
            if len(self.model.peft_config) == 1:
                self.model = self.model.unload()  # the last one: back to the plain base model
                self.is_peft = False
            else:
                if self.model.active_adapter == peft_name:
                    self.model.set_adapter(next(n for n in self.model.peft_config if n != peft_name))
                self.model.delete_adapter(peft_name)
            log.info("adapter %s released", peft_name)

    def new_cache(self) -> Any:
        from kubetune.trainer.serve.kvcache import growing_cache

        return growing_cache(self.model.config)

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


def multimodal_positions(model: Any) -> bool:
    """Whether the model computes its own 3-D rotary positions for image tokens (Qwen2-VL's
    M-RoPE, `get_rope_index`): the decode batch's plain positions would misplace them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(hasattr(part, "get_rope_index") for part in (base, getattr(base, "model", None)) if part is not None)


def _strip_lora(model: Any) -> None:
    """Put the base layers back where a failed PEFT load injected LoRA layers into a plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)


def greedy_reference(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **generate_kwargs) -> list[int]:
    """Plain `model.generate` greedy tokens (the reference speculative decoding must reproduce)."""
    import torch

    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    return out[0, len(prompt_ids):].tolist()

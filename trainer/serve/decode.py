"""The transformers engine's running batch: iteration-level (continuous) batching on a KV cache.

A `DecodeBatch` is the set of sequences being decoded right now. Between two decode steps
sequences join and leave it, as in Orca and vLLM, so a request that arrives while others are
generating starts at the next step instead of waiting for the whole batch to finish:

- `admit()` prefills the new sequences together (left-padded, their own `DynamicCache`) and then
  merges them into the running batch: both caches are left-padded to the same length and
  concatenated along the batch axis, and the attention mask marks the padding. Padding is masked
  out, and every row has its own position ids, so each row computes what it would compute alone.
- `step()` samples one token for every row (each by its own settings), retires the rows that
  finished (end of sequence, stop string, max tokens, or cancelled because the client went away),
  trims padding columns no remaining row needs, and runs one batched forward for the rest. The
  halves are `advance()` and `forward()`, so the scheduler can report freed slots in between.

Rows may use different LoRA adapters: PEFT's mixed-adapter batches (`adapter_names`) apply each
row's adapter in the same forward pass. Merging caches needs plain full-attention layers
(`DynamicLayer`, or kubetune's `GrowingLayer`, which appends in place: see `kvcache.py`); for
models whose cache is different (sliding-window or hybrid layers) new sequences are admitted only
when the batch is empty, which is still correct, just less eager.

We do not use transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`):
it runs the model on its own paged KV cache (switching eager attention to a paged variant), takes
only temperature/top-k/top-p per request (one global seed, no penalties), has no per-row LoRA
adapters, and returns no logprobs of alternatives, all of which the OpenAI API needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubetune.trainer.serve.params import Event, Sequence, TokenLogprob
from kubetune.trainer.serve.sampling import make_generator, sample, token_logprobs
from kubetune.trainer.serve.tracking import TextTracker

if TYPE_CHECKING:
    from kubetune.trainer.serve.transformers_engine import TransformersEngine

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"
"""PEFT's name for "no adapter" in a mixed-adapter batch."""


@dataclass
class _Row:
    seq: Sequence
    tracker: TextTracker
    generator: Any
    position: int
    """Position id of the next token fed to the model (the number of tokens so far)."""
    counts: dict[int, int] = field(default_factory=dict)
    """How often each token was generated (frequency and presence penalties)."""


def fail(seq: Sequence, reason: str, error: str | None = None) -> None:
    """Finish a sequence that will not (or no longer) run, telling its consumer why."""
    seq.finish_reason = reason
    if seq.emit is not None:
        seq.emit(Event(finish_reason=reason, error=error))


class DecodeBatch:
    """Sequences decoded together; they join with `admit()` and leave as they finish."""

    def __init__(self, engine: TransformersEngine):
        self.engine = engine
        self.device = engine.loaded.device
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.attention: Any = None
        """[rows, cache length] 1 for real tokens, 0 for padding."""
        self.logits: Any = None
        """[rows, vocab] the next-token logits of every row, not yet sampled."""
        self.mergeable = True
        self._fed: list[int] | None = None
        """Tokens sampled by `advance()` that `forward()` has yet to feed (one per row)."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def can_admit(self) -> bool:
        """Whether new sequences may join now (always, unless the cache cannot be merged)."""
        return not self.rows or self.mergeable

    @property
    def model(self) -> Any:
        """The engine's model (a runtime adapter load may wrap it in a PEFT model)."""
        return self.engine.model

    @property
    def sequences(self) -> list[Sequence]:
        return [row.seq for row in self.rows]

    # -- joining ---------------------------------------------------------------------------
    def admit(self, sequences: list[Sequence]) -> None:
        """Prefill `sequences` and add them to the batch. A sequence that cannot run (over the
        context, an adapter that is not loaded) finishes at once with an error; the rows already
        running are not touched until the prefill has succeeded."""
        import torch

        with torch.inference_mode():
            self._admit(sequences)

    def _admit(self, sequences: list[Sequence]) -> None:
        import torch

        if self._fed is not None:
            raise RuntimeError("admit() between advance() and forward()")
        if self.rows and not self.mergeable:
            raise RuntimeError("this batch cannot take new sequences until it is empty")
        rows: list[_Row] = []
        for seq in sequences:
            if seq.cancelled.is_set():
                fail(seq, "cancelled")
                continue
            try:
                max_new = self.engine.check_length(len(seq.prompt_ids), seq.params)
                self.engine.check_adapter(seq.adapter)
            except Exception as exc:
                fail(seq, "error", str(exc))
                continue
            rows.append(_Row(seq, TextTracker(self.engine.tokenizer, seq, max_new, self.engine.eos_ids),
                             make_generator(seq, self.device), len(seq.prompt_ids)))
        if not rows:
            return
        width = max(len(row.seq.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.engine.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row.seq.prompt_ids
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = self.engine.new_cache()
        scored = [i for i, row in enumerate(rows) if row.seq.params.prompt_logprobs is not None]
        logits = self._forward(rows, input_ids, attention, positions, cache, prefill=True, all_positions=bool(scored))
        if scored:
            for i in scored:
                rows[i].seq.prompt_logprobs = _prompt_logprobs(logits[i], rows[i].seq)
            logits = logits[:, -1, :]
        # Rows that only score their prompt (max_tokens 0) are done; the rest join the batch.
        keep = [i for i, row in enumerate(rows) if not (row.tracker.max_new == 0 and row.tracker.finish("length"))]
        if len(keep) < len(rows):
            if not keep:
                return
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            rows, attention, logits = [rows[i] for i in keep], attention[index], logits[index]
        self._merge(rows, cache, attention, logits)

    def _merge(self, rows: list[_Row], cache: Any, attention: Any, logits: Any) -> None:
        import torch

        if not self.rows:
            self.rows, self.cache, self.attention, self.logits = rows, cache, attention, logits
            self.mergeable = _plain_layers(cache, attention.shape[1])
            return
        width = max(self.attention.shape[1], attention.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, dim=-2), _pad_left(new.keys, width, dim=-2)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width, dim=-2), _pad_left(new.values, width, dim=-2)], dim=0)
        self.attention = torch.cat([_pad_left(self.attention, width, dim=-1), _pad_left(attention, width, dim=-1)], dim=0)
        self.logits = torch.cat([self.logits, logits], dim=0)
        self.rows = self.rows + rows

    # -- one decode step -------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One decode step: `advance()` then `forward()`. Returns the sequences that finished."""
        finished = self.advance()
        self.forward()
        return finished

    def advance(self) -> list[Sequence]:
        """Sample one token for every row and retire the rows that finished (their slots are
        free as soon as this returns). Returns the sequences that finished."""
        import torch

        if not self.rows or self._fed is not None:
            return []
        with torch.inference_mode():
            seqs = self.sequences
            tokens = sample(self.logits, seqs, [row.generator for row in self.rows], [row.counts for row in self.rows])
            logprobs = token_logprobs(self.logits, tokens, [seq.params.logprobs for seq in seqs])
            finished: list[Sequence] = []
            keep: list[int] = []
            for i, row in enumerate(self.rows):
                token = tokens[i]
                row.counts[token] = row.counts.get(token, 0) + 1
                if row.tracker.add(token, logprobs[i]):
                    finished.append(row.seq)
                else:
                    keep.append(i)
            if len(keep) < len(self.rows):
                self._retain(keep)
            if not self.rows:
                self.clear()
            else:
                self._fed = [tokens[i] for i in keep]
        return finished

    def forward(self) -> None:
        """Feed every remaining row its new token: one batched forward computes the next logits."""
        import torch

        if self._fed is None:
            return
        tokens, self._fed = self._fed, None
        with torch.inference_mode():
            feed = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
            self.attention = torch.cat([self.attention, self.attention.new_ones((len(self.rows), 1))], dim=-1)
            positions = torch.tensor([row.position for row in self.rows], dtype=torch.long, device=self.device)[:, None]
            for row in self.rows:
                row.position += 1
            self.logits = self._forward(self.rows, feed, self.attention, positions, self.cache, prefill=False)

    def _retain(self, keep: list[int]) -> None:
        """Drop the rows not in `keep` from the cache, mask and logits; then drop the leading
        cache columns that are padding for every remaining row (a long finished prompt)."""
        import torch

        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.attention = self.attention[index]
        if self.mergeable:
            used = self.attention.any(dim=0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first > 0:
                for layer in self.cache.layers:
                    layer.keys = layer.keys[..., first:, :]
                    layer.values = layer.values[..., first:, :]
                self.attention = self.attention[:, first:]

    def _forward(self, rows: list[_Row], input_ids: Any, attention: Any, positions: Any, cache: Any, *, prefill: bool,
                 all_positions: bool = False) -> Any:
        """Logits of the last position ([rows, vocab]), or of every position ([rows, len, vocab])."""
        kwargs: dict[str, Any] = {}
        if self.engine.is_peft:
            kwargs["adapter_names"] = [row.seq.adapter or BASE_ADAPTER for row in rows]
        if prefill and not all_positions and self.engine.supports_logits_to_keep:
            kwargs["logits_to_keep"] = 1  # the prompt's other positions need no logits (memory: rows x len x vocab)
        if prefill:
            kwargs.update(prefill_media([row.seq.media for row in rows]))
        kwargs[self.engine.cache_argument] = cache
        out = self.engine.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                                **kwargs)
        return out.logits if all_positions else out.logits[:, -1, :]

    # -- leaving ---------------------------------------------------------------------------
    def fail_all(self, error: str) -> None:
        """A step failed (e.g. out of memory): end every row with the error and start afresh."""
        for row in self.rows:
            if not row.tracker.done:
                fail(row.seq, "error", error)
        self.clear()

    def clear(self) -> None:
        self.rows, self.cache, self.attention, self.logits = [], None, None, None
        self.mergeable = True
        self._fed = None


def prefill_media(media: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The pictures of the rows being prefilled as one set of model inputs: each tensor (pixel
    values, grid sizes) concatenated in row order, the order in which the model fills the rows'
    image tokens with features."""
    import torch

    present = [m for m in media if m]
    if not present:
        return {}
    return {key: torch.cat([m[key] for m in present if key in m]) for key in present[0]}


def _prompt_logprobs(logits: Any, seq: Sequence) -> list[TokenLogprob | None]:
    """Logprobs of a prompt's tokens from its prefill logits ([padded len, vocab], left-padded):
    each token scored by the position before it; the first token has none."""
    ids = seq.prompt_ids
    start = logits.shape[0] - len(ids)  # the first real position
    scored = token_logprobs(logits[start:start + len(ids) - 1], ids[1:], [seq.params.prompt_logprobs] * (len(ids) - 1))
    return [None, *scored]


def _plain_layers(cache: Any, width: int) -> bool:
    """Whether every layer is a plain full-attention `DynamicLayer` holding `width` positions:
    then caches can be padded and concatenated along the batch axis."""
    from kubetune.trainer.serve.kvcache import is_plain_layer

    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(is_plain_layer(layer) and layer.is_initialized and layer.keys.shape[-2] == width for layer in layers)


def _pad_left(tensor: Any, width: int, *, dim: int) -> Any:
    """`tensor` with zeros prepended along `dim` up to `width` (masked positions: zeros are fine)."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

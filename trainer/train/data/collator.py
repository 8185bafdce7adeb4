"""Batch collation for `transformers.Trainer(data_collator=...)`.

Padding-free (`data.paddingFree`, the default for `pt`/`sft`): every row of the batch is
concatenated into one `[1, total]` row whose `position_ids` restart at 0 for each row (a packed
row keeps its own positions), the first label of each row is -100 (it would be predicted from the
previous row), and there is no attention mask: transformers reads the boundaries from the
positions (a block-diagonal causal mask for sdpa/eager, varlen kernels for flash attention), so
the loss equals the padded batch's and no compute goes to pad tokens. The row also carries the
examples' boundaries as transformers' flattening collator gives them to flash attention
(`cu_seq_lens_q`/`_k`, `max_length_q`/`_k`), which flash attention's varlen kernel and kubetune's
per-example SDPA (`models/varlen.py`) read instead of a row x row mask.

Otherwise: unpacked rows are right-padded (pad id, labels -100) with an `attention_mask`. Packed rows carry
`position_ids` that restart at 0 for every example and get NO attention mask: transformers then
detects the packing from the position ids and builds a block-diagonal causal mask (sdpa/eager),
so packed examples never attend to each other. Two ways to batch packed rows:

- padded (default for sdpa/eager): rows are right-padded; the padding gets its own positions
  (0, 1, ...) so it forms a separate block, and labels -100;
- flattened (for flash_attention_2, whose varlen path only reads packing from position ids
  when the batch is a single row): all rows are concatenated into one `[1, total]` row.

Packed batches also carry `use_cache=False`: transformers only looks for packed sequences when
no KV cache is passed, and a model in training mode with `config.use_cache=True` (the default
of most checkpoints) creates one, which silently turns the block-diagonal mask back into a plain
causal one (examples would attend to each other). The training runner should set
`model.config.use_cache = False` as well.
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.data.processors import IGNORE_INDEX


def example_bounds(positions: list[int]) -> list[int]:
    """Cumulative example lengths of a flattened row from its positions (each example starts at
    0), as `cu_seq_lens_q`/`cu_seq_lens_k` carry them: [0, len1, len1 + len2, ..., total]."""
    return [i for i, p in enumerate(positions) if p == 0 or i == 0] + [len(positions)]


class DataCollator:
    """Pads token rows into tensors; see the module docstring for packed rows."""

    def __init__(
        self, pad_token_id: int, *, flatten_packed: bool = False, pad_to_multiple_of: int | None = None,
        padding_free: bool = False,
    ):
        self.pad_token_id = pad_token_id
        self.flatten_packed = flatten_packed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free

    @staticmethod
    def flatten(features: list[dict[str, Any]]) -> dict[str, Any]:
        """All rows as one row, positions restarting per row, no label across a row boundary."""
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:
            row = list(f["input_ids"])
            ids += row
            row_labels = list(f["labels"]) if "labels" in f else list(row)
            labels += [IGNORE_INDEX, *row_labels[1:]] if row_labels else []
            positions += list(f["position_ids"]) if "position_ids" in f else list(range(len(row)))
        bounds = torch.tensor(example_bounds(positions), dtype=torch.int32)
        longest = int((bounds[1:] - bounds[:-1]).max()) if len(bounds) > 1 else 0
        return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long), "use_cache": False,
                "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}

    def _target_length(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        if multiple and longest % multiple:
            return longest + multiple - longest % multiple
        return longest

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        packed = "position_ids" in features[0]
        if self.padding_free or (packed and self.flatten_packed):
            return self.flatten(features)
        length = self._target_length(max(len(f["input_ids"]) for f in features))
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        if packed:
            batch["position_ids"] = []
        else:
            batch["attention_mask"] = []
        for f in features:
            ids = list(f["input_ids"])
            pad = length - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            labels = list(f["labels"]) if "labels" in f else list(ids)
            batch["labels"].append(labels + [IGNORE_INDEX] * pad)
            if packed:
                batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        out: dict[str, Any] = {name: torch.tensor(rows, dtype=torch.long) for name, rows in batch.items()}
        if packed:
            out["use_cache"] = False
        return out


def make_collator(
    tokenizer: Any,
    spec: TrainingSpec,
    *,
    flatten_packed: bool | None = None,
    pad_to_multiple_of: int | None = None,
) -> DataCollator:
    """The collator for this run. `flatten_packed` defaults to True only when the spec asks for
    flash_attention_2 explicitly; a runner that resolves `attnImplementation: auto` to flash
    attention should pass `flatten_packed=True`."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if flatten_packed is None:
        flatten_packed = spec.model.attnImplementation == "flash_attention_2"
    return DataCollator(pad, flatten_packed=flatten_packed, pad_to_multiple_of=pad_to_multiple_of,
                        padding_free=spec.padding_free_enabled)

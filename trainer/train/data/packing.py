"""Packing: several examples per training row, kept apart by `position_ids`.

Both packers emit `input_ids`, `labels` and `position_ids`, where positions restart at 0 for
every packed example: transformers builds a block-diagonal causal mask from that (sdpa/eager) or
uses varlen kernels (flash attention), so examples never attend to each other and each one sees
exactly the positions it would see alone. The first label of every packed example is -100:
predicting an example's first token from the previous example is noise.

The work is vectorised with numpy over a whole map batch; with `datasets`' arrow formatting the
batch arrives as an Arrow table and leaves as one without any per-token Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kubetune.trainer.train.data.processors import IGNORE_INDEX

PACKED_COLUMNS = ("input_ids", "labels", "position_ids")


def _flat(batch: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, row lengths) of a list column from an Arrow table or a dict of lists."""
    if isinstance(batch, pa.Table):
        column = batch.column(name)
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        return values.astype(np.int64, copy=False), lengths.astype(np.int64, copy=False)
    rows = batch[name]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    values = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    return values, lengths


def _emit(batch: Any, columns: dict[str, np.ndarray], lengths: np.ndarray) -> Any:
    """Cut flat columns into rows of `lengths`, in the batch's own representation."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    if isinstance(batch, pa.Table):
        return pa.table(
            {
                name: pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
                for name, values in columns.items()
            }
        )
    return {
        name: [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(lengths))]
        for name, values in columns.items()
    }


def _positions(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for every segment of the given lengths, concatenated."""
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


def pack_concat(max_length: int, drop_tail: bool) -> Callable[[Any], Any]:
    """Pretraining packing: concatenate the batch's documents and cut `max_length` chunks.

    Documents are split across chunk boundaries (nothing is lost but the batch's last partial
    chunk when `drop_tail`, as for training; evaluation keeps it). Positions restart at each
    document start and at each chunk start.
    """

    def pack(batch: Any) -> Any:
        ids, lengths = _flat(batch, "input_ids")
        labels, _ = _flat(batch, "labels")
        total = len(ids) - len(ids) % max_length if drop_tail else len(ids)
        ids, labels = ids[:total], labels[:total].copy()
        doc_start = np.zeros(len(ids), dtype=bool)
        starts = (np.cumsum(lengths) - lengths)[lengths > 0]
        doc_start[starts[starts < total]] = True
        doc_start[::max_length] = True  # a chunk starts a new segment
        segment = np.cumsum(doc_start) - 1
        seg_lengths = np.bincount(segment, minlength=int(segment[-1]) + 1) if total else np.zeros(0, np.int64)
        positions = _positions(seg_lengths)
        labels[doc_start] = IGNORE_INDEX
        n_rows = -(-total // max_length)
        row_lengths = np.full(n_rows, max_length, dtype=np.int64)
        if n_rows and total % max_length:
            row_lengths[-1] = total % max_length
        return _emit(batch, {"input_ids": ids, "labels": labels, "position_ids": positions}, row_lengths)

    return pack


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of example indices (each bin's total <= capacity), in the examples' original order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-int(lengths[k]), k)):
        size = int(lengths[i])
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(i)
                room[b] -= size
                break
        else:
            bins.append([i])
            room.append(capacity - size)
    for members in bins:
        members.sort()
    bins.sort(key=lambda members: members[0])
    return bins


def pack_greedy(max_length: int) -> Callable[[Any], Any]:
    """SFT packing: whole examples (already <= `max_length`) placed into rows by first-fit
    decreasing within each batch. Examples are never split, so every answer keeps its prompt."""

    def pack(batch: Any) -> Any:
        ids, lengths = _flat(batch, "input_ids")
        labels, _ = _flat(batch, "labels")
        bins = first_fit_decreasing(lengths, max_length)
        order = np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(lengths))
        starts = np.cumsum(lengths) - lengths
        new_lengths = lengths[order]
        gather = np.repeat(starts[order], new_lengths) + _positions(new_lengths)
        positions = _positions(new_lengths)
        new_labels = labels[gather]
        new_labels[positions == 0] = IGNORE_INDEX
        row_lengths = np.fromiter((int(lengths[m].sum()) for m in bins), dtype=np.int64, count=len(bins))
        return _emit(
            batch, {"input_ids": ids[gather], "labels": new_labels, "position_ids": positions}, row_lengths
        )

    return pack

"""`build_datasets`: the whole data pipeline for one run, from spec to token rows.

    load (loader) -> align to the internal form (aligners) -> hold out eval -> mix -> shuffle
    -> tokenize + mask for the stage (processors) -> pack

With `data.cache` the result is stored once by `kubetune prepare` and read back here instead
(`cache.py`): then no rank of a distributed run spends the collective timeout tokenizing.

Eval rows are held out per source *before* mixing, so oversampling (`interleave_over`) can never
put the same example in both splits. Everything random is seeded by `train.seed`, so a restarted
or multi-rank run sees the same data in the same order.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import datasets
import pyarrow.compute as pc

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import DatasetSpec, TrainingSpec
from kubetune.trainer.train.data.aligners import align_source
from kubetune.trainer.train.data.loader import load_source
from kubetune.trainer.train.data.packing import pack_concat, pack_greedy
from kubetune.trainer.train.data.processors import (
    IGNORE_INDEX,
    LM_STAGES,
    PROCESSORS,
    STAGE_DATA,
    ProcessorConfig,
    check_template,
    processor_config,
)
from kubetune.trainer.train.data.templates import PLAIN, apply_template, resolve_template

log = logging.getLogger(__name__)
AnyDataset = datasets.Dataset | datasets.IterableDataset
INTERNAL_COLUMNS = ["messages", "tools", "text"]
BATCH_SIZE = 1000
PACK_BATCH_SIZE = 2000
"""Examples per packing batch: larger wastes less (one partial chunk per batch), costs memory."""
STREAM_SHUFFLE_BUFFER = 10_000
TEMPLATE_CHECK_ROWS = 64
"""Rows searched for a first conversation to try the chat template on before tokenizing."""
MIN_ROWS_PER_PROC = 2000
"""Below this many rows, worker processes cost more to start than they save. Only tokenization
(Jinja rendering is single-threaded Python) uses workers: aligning and the vectorised packing cost
less than shipping their rows to another process."""


@dataclass
class DataBundle:
    """What the training runner gets: token datasets plus numbers worth logging."""

    train: AnyDataset
    eval: AnyDataset | None
    stats: dict[str, Any] = field(default_factory=dict)


def build_datasets(spec: TrainingSpec, tokenizer: Any) -> DataBundle:
    """Load, align, split, mix, shuffle, tokenize and (optionally) pack the spec's datasets.

    Sets `tokenizer.chat_template` from `data.template` (`apply_template`, the one place a run
    applies it), or from the data when unset (`resolve_template`). With `data.cache` set, a
    complete entry of the tokenized-dataset cache for this spec and tokenizer (written by
    `kubetune prepare`) is read instead, so no rank of a distributed run tokenizes; without one
    the rows are built here. Raises SpecError for anything wrong with the data or its
    description, naming the spec field.
    """
    from kubetune.trainer.train.data.cache import load_cached

    apply_template(tokenizer, spec.data.template)
    cached = load_cached(spec, tokenizer)
    if cached is not None:
        splits, stats = cached
        train = splits["train"]
        assert train is not None  # an entry always has training rows
        if stats.get("template") == "plain" and spec.data.template is None:
            tokenizer.chat_template = PLAIN  # what the entry was rendered with (`resolve_template`)
        log_data_summary(stats)
        return DataBundle(train=train, eval=splits.get("eval"), stats=stats)
    return build_uncached(spec, tokenizer)


def build_uncached(spec: TrainingSpec, tokenizer: Any) -> DataBundle:
    """`build_datasets` without the cache: what `kubetune prepare` stores. The caller has applied
    `data.template` (`apply_template`): the cache key is computed from the tokenizer so set up."""
    data = spec.data
    seed = spec.train.seed
    num_proc = data.numProc if data.numProc and data.numProc > 1 else None

    train_sources, source_stats = _load_all(spec, data.datasets, "data.datasets")
    eval_raw: AnyDataset | None = None
    eval_stats: list[dict[str, Any]] = []
    if data.evalDatasets:
        eval_sources, eval_stats = _load_all(spec, data.evalDatasets, "data.evalDatasets")
        eval_raw = _concat(eval_sources)
    elif data.evalSize > 0:
        train_sources, eval_parts = split_eval(train_sources, data.evalSize, seed)
        eval_raw = _concat(eval_parts)
    template, why = resolve_template(tokenizer, data.template, source_formats(source_stats + eval_stats))

    weights = [s.weight if s.weight is not None else 1.0 for s in data.datasets]
    train_raw = mix(train_sources, data.mixStrategy, weights, seed)
    if data.shuffle:
        train_raw = _shuffle(train_raw, seed)

    train, train_stats = tokenize(train_raw, spec, tokenizer, is_eval=False, num_proc=num_proc)
    stats: dict[str, Any] = {
        "template": template,
        "templateReason": why,
        "stage": spec.stage,
        "packing": spec.packing_enabled,
        "mixStrategy": data.mixStrategy,
        "sources": source_stats,
        "train": train_stats,
    }
    eval_ds = None
    if eval_raw is not None:
        eval_ds, stats["eval"] = tokenize(eval_raw, spec, tokenizer, is_eval=True, num_proc=num_proc)
        if eval_stats:
            stats["evalSources"] = eval_stats
    log_data_summary(stats)
    return DataBundle(train=_require_rows(train, train_stats, spec), eval=eval_ds, stats=stats)


def source_formats(source_stats: list[dict[str, Any]]) -> list[str]:
    """Each source's format as `resolve_template` reads it (`lmflow:text2text`, `alpaca`, ...)."""
    return [f"lmflow:{s['lmflowType']}" if s.get("lmflowType") else s["format"] for s in source_stats]


def log_data_summary(stats: dict[str, Any]) -> None:
    """What a run trains on, said before it starts: the template and why, the first example with
    the tokens it is not trained on marked, the token statistics. A wrong rendering or a mask
    that hides the answers shows here, not as a loss that never falls."""
    log.info("chat template: %s (%s)", stats.get("template"), stats.get("templateReason", "recorded with the cached data"))
    train = stats.get("train") or {}
    if train.get("firstExample"):
        log.info("first training example, untrained (masked) tokens in [[...]]: %r", show_example(train["firstExample"]))
    if train.get("meanLength") is not None:
        log.info("training tokens: %d examples, mean length %.1f tokens, %.1f%% of tokens masked from the loss",
                 train.get("examples") or 0, train["meanLength"], 100 * train["maskedFraction"])


def show_example(segments: list[dict[str, Any]]) -> str:
    """An example's text with its masked segments in [[...]]."""
    return "".join(seg["text"] if seg["trained"] else f"[[{seg['text']}]]" for seg in segments)


def _require_rows(train: AnyDataset, train_stats: dict[str, Any], spec: TrainingSpec) -> AnyDataset:
    """A run with no training rows is a spec problem: say why instead of failing in the trainer."""
    if isinstance(train, datasets.Dataset) and len(train) == 0:
        if spec.packing_enabled and spec.stage == "pt":
            raise SpecError(
                "data.maxLength",
                f"the training data has {train_stats.get('tokens')} tokens, fewer than one packed "
                f"sequence of {spec.data.maxLength}.",
                "add data, lower data.maxLength, or set data.packing: false.",
            )
        raise SpecError("data.datasets", "no training example is left after tokenization.", "check the data.")
    return train


def _load_all(
    spec: TrainingSpec, sources: list[DatasetSpec], prefix: str
) -> tuple[list[AnyDataset], list[dict[str, Any]]]:
    loaded, stats = [], []
    for index, source in enumerate(sources):
        where = f"{prefix}[{index}]"
        raw = load_source(source, field=where, streaming=spec.data.streaming, storage=spec.storage)
        aligned, info = align_source(raw, source, field=where, kind=STAGE_DATA[spec.stage])
        loaded.append(aligned)
        stats.append(info)
    return loaded, stats


def _concat(parts: list[AnyDataset]) -> AnyDataset:
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _shuffle(ds: AnyDataset, seed: int) -> AnyDataset:
    if isinstance(ds, datasets.Dataset):
        return ds.shuffle(seed=seed, keep_in_memory=True)
    return ds.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)


def mix(sources: list[AnyDataset], strategy: str, weights: list[float], seed: int) -> AnyDataset:
    """Merge sources: `concat` keeps every row once; `interleave_under` samples source i with
    probability weight_i / sum(weights) until the first source runs out; `interleave_over` until
    every source has been seen in full (smaller/heavier ones repeat)."""
    if len(sources) == 1:
        return sources[0]
    if strategy == "concat":
        return datasets.concatenate_datasets(sources)
    total = sum(weights)
    return datasets.interleave_datasets(
        sources,
        probabilities=[w / total for w in weights],
        seed=seed,
        stopping_strategy="first_exhausted" if strategy == "interleave_under" else "all_exhausted",
    )


def split_eval(
    sources: list[AnyDataset], eval_size: float, seed: int
) -> tuple[list[AnyDataset], list[AnyDataset]]:
    """Hold out `eval_size` (a fraction < 1, or a count >= 1) of the examples, from each source in
    proportion to its size. Returns (train parts, eval parts)."""
    sizes = [len(s) for s in sources]  # type: ignore[arg-type]  # streaming is refused by the spec
    total = sum(sizes)
    if eval_size < 1:
        counts = [round(n * eval_size) for n in sizes]
    else:
        wanted = int(eval_size)
        if wanted >= total:
            raise SpecError(
                "data.evalSize",
                f"asks for {wanted} evaluation examples but the training data has only {total}.",
                "use a smaller number, or a fraction below 1.",
            )
        exact = [wanted * n / total for n in sizes]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
        for i in by_remainder[: wanted - sum(counts)]:
            counts[i] += 1
    if sum(counts) == 0:
        raise SpecError(
            "data.evalSize",
            f"{eval_size} of {total} examples rounds to no evaluation example.",
            "use a larger fraction, or a count >= 1.",
        )
    train_parts, eval_parts = [], []
    for source, size, count in zip(sources, sizes, counts, strict=True):
        if count == 0:
            train_parts.append(source)
            continue
        if count >= size:
            raise SpecError(
                "data.evalSize",
                f"would hold out all {size} examples of a dataset, leaving none to train on.",
                "use a smaller evalSize.",
            )
        split = source.train_test_split(test_size=count, seed=seed, shuffle=True, keep_in_memory=True)
        train_parts.append(split["train"])
        eval_parts.append(split["test"])
    return train_parts, eval_parts


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def tokenize(
    ds: AnyDataset, spec: TrainingSpec, tokenizer: Any, *, is_eval: bool, num_proc: int | None = None
) -> tuple[AnyDataset, dict[str, Any]]:
    """Run the stage's processor (and the packer when packing is on); returns rows and stats."""
    cfg = processor_config(spec)
    processor = PROCESSORS[spec.stage](tokenizer, cfg)
    if spec.stage not in LM_STAGES:
        return _tokenize_rows(ds, spec, processor, cfg, tokenizer, is_eval=is_eval, num_proc=num_proc)
    if isinstance(ds, datasets.Dataset):
        check_template(tokenizer, ds.select(range(min(len(ds), TEMPLATE_CHECK_ROWS))))
    else:
        check_template(tokenizer, ds.take(TEMPLATE_CHECK_ROWS))
        ds = ds.map(processor, batched=True, batch_size=BATCH_SIZE, remove_columns=INTERNAL_COLUMNS)
        ds = ds.remove_columns(["truncated"])
        if spec.packing_enabled:
            ds = ds.map(
                _lm_packer(spec, is_eval), batched=True, batch_size=PACK_BATCH_SIZE, remove_columns=["input_ids", "labels"]
            )
        return ds, {"examples": None, "streaming": True}
    ds, stats = _tokenize_lm_in_memory(ds, spec, processor, cfg, tokenizer, is_eval=is_eval, num_proc=num_proc)
    if spec.packing_enabled and len(ds):
        ds = _pack_in_memory(ds, spec, is_eval=is_eval)
        stats["packedRows"] = len(ds)
        stats["packedTokens"] = len(pc.list_flatten(ds.data.column("labels"))) if len(ds) else 0
    return ds, stats


def _lm_packer(spec: TrainingSpec, is_eval: bool) -> Any:
    """pt concatenates and cuts (dropping a training tail); sft packs whole examples greedily."""
    if spec.stage == "pt":
        return pack_concat(spec.data.maxLength, drop_tail=not is_eval)
    return pack_greedy(spec.data.maxLength)


def _tokenize_lm_in_memory(
    ds: datasets.Dataset, spec: TrainingSpec, processor: Any, cfg: ProcessorConfig, tokenizer: Any, *, is_eval: bool,
    num_proc: int | None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Tokenize an in-memory pt/sft split: rows, token stats, dropped and truncated counts; every
    example dropped is a spec error (unless pt packs them)."""
    name = "eval" if is_eval else "train"
    before = len(ds)
    procs = num_proc if num_proc and before >= MIN_ROWS_PER_PROC else None
    ds = ds.map(
        processor,
        batched=True,
        batch_size=BATCH_SIZE,
        remove_columns=ds.column_names,
        num_proc=procs,
        keep_in_memory=True,
        new_fingerprint=_fingerprint(ds._fingerprint, "tokenize", spec.stage, cfg, tokenizer.chat_template),
        desc=f"Tokenizing {name}",
    )
    truncated = int(pc.sum(ds.data.column("truncated")).as_py() or 0)
    ds = ds.remove_columns(["truncated"])
    stats = token_stats(ds, tokenizer, first=not is_eval)
    stats.update(droppedNoLabels=before - len(ds), truncated=truncated)
    if len(ds) == 0 and not (spec.packing_enabled and spec.stage == "pt"):
        raise SpecError(
            "data.evalDatasets" if is_eval and spec.data.evalDatasets else "data.datasets",
            f"every {name} example was dropped: none has a token to train on after templating and "
            f"truncation to data.maxLength={spec.data.maxLength} ({before} had no assistant answer left).",
            "check that conversations contain assistant turns, or raise data.maxLength.",
        )
    return ds, stats


def _pack_in_memory(ds: datasets.Dataset, spec: TrainingSpec, *, is_eval: bool) -> datasets.Dataset:
    """Pack tokenized rows into sequences of data.maxLength."""
    return (
        ds.with_format("arrow")
        .map(
            _lm_packer(spec, is_eval),
            batched=True,
            batch_size=PACK_BATCH_SIZE,
            remove_columns=ds.column_names,
            keep_in_memory=True,
            new_fingerprint=_fingerprint(
                ds._fingerprint, "pack", spec.stage, spec.data.maxLength, is_eval
            ),
            desc=f"Packing {'eval' if is_eval else 'train'}",
        )
        .with_format(None)
    )


def _tokenize_rows(
    ds: AnyDataset, spec: TrainingSpec, processor: Any, cfg: ProcessorConfig, tokenizer: Any, *, is_eval: bool,
    num_proc: int | None,
) -> tuple[AnyDataset, dict[str, Any]]:
    """Tokenization for the stages with their own columns (preference pairs, RL prompts)."""
    name = "eval" if is_eval else "train"
    assert isinstance(ds, datasets.Dataset)  # streaming is refused for these stages by the spec
    check_template(tokenizer, ds.select(range(min(len(ds), TEMPLATE_CHECK_ROWS))))
    before = len(ds)
    ds = ds.map(
        processor,
        batched=True,
        batch_size=BATCH_SIZE,
        remove_columns=ds.column_names,
        num_proc=num_proc if num_proc and before >= MIN_ROWS_PER_PROC else None,
        keep_in_memory=True,
        new_fingerprint=_fingerprint(ds._fingerprint, "tokenize", spec.stage, cfg, tokenizer.chat_template),
        desc=f"Tokenizing {name}",
    )
    truncated = int(pc.sum(ds.data.column("truncated")).as_py() or 0) if len(ds) else 0
    ds = ds.remove_columns(["truncated"])
    stats: dict[str, Any] = {"examples": len(ds), "dropped": before - len(ds), "truncated": truncated}
    if len(ds) and not is_eval:
        stats["firstExample"] = first_example(tokenizer, ds[0])
    if len(ds) == 0:
        raise SpecError(
            "data.evalDatasets" if is_eval and spec.data.evalDatasets else "data.datasets",
            f"every {name} example was dropped after templating ({before} rows): preference pairs need "
            "two different non-empty answers, prompts a user turn.",
            "check the data.",
        )
    return ds, stats


def token_stats(ds: datasets.Dataset, tokenizer: Any, *, first: bool) -> dict[str, Any]:
    """Examples, tokens, trained tokens, mean length and masked share of unpacked token rows, and
    (`first`) the first example's segments: what the run logs and records before training."""
    labels = pc.list_flatten(ds.data.column("labels"))
    stats: dict[str, Any] = {
        "examples": len(ds),
        "tokens": len(labels),
        "trainedTokens": int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0),
    }
    if len(ds):
        stats["meanLength"] = round(stats["tokens"] / len(ds), 2)
        stats["maskedFraction"] = round(1 - stats["trainedTokens"] / max(stats["tokens"], 1), 4)
        if first:
            stats["firstExample"] = first_example(tokenizer, ds[0])
    return stats


def first_example(tokenizer: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    """A token row as decoded text segments, each marked trained or not (masked from the loss):
    a language-model row by its labels; a preference or prompt row as its prompt (never trained
    on) and its (chosen) answer."""
    if "labels" in row:
        segments: list[dict[str, Any]] = []
        for token, label in zip(row["input_ids"], row["labels"], strict=True):
            trained = label != IGNORE_INDEX
            if segments and segments[-1]["trained"] == trained:
                segments[-1]["ids"].append(token)
            else:
                segments.append({"trained": trained, "ids": [token]})
    else:
        answer = row.get("chosen_ids") or row.get("completion_ids") or []
        segments = [{"trained": False, "ids": list(row["prompt_ids"])}]
        if answer:
            segments.append({"trained": True, "ids": list(answer)})
    return [{"trained": seg["trained"], "text": tokenizer.decode(seg["ids"])} for seg in segments]

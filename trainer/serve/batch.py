"""Batch generation over a dataset (`kubetune generate`): prompts in, JSONL with outputs out.

The dataset is read by the training data pipeline's loader and aligners, so every format
training accepts works here (text, alpaca, sharegpt, LMFlow text2text/text_only, local files or
`s3://`): a conversation's prompt is every turn before its last assistant turn (which, when
present, is kept as the `reference`); a plain-text row is a raw completion prompt.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import DatasetSpec, StorageSpec
from kubetune.trainer.serve.params import SamplingParams, Sequence

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One prompt: a conversation (`messages`, chat) or a plain `text` (completion)."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    reference: str | None = None
    tools: str | None = None
    """Tool definitions (JSON) offered to the model, from sharegpt data."""
    images: list[str] | None = None
    """Local paths of the pictures the conversation's `<image>` placeholders stand for, in order."""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def prompt_record(self) -> Any:
        return self.messages if self.is_chat else self.text


def dataset_spec(data: str | DatasetSpec, *, format: str = "auto", max_samples: int | None = None,
                 split: str = "train", field: str = "--data") -> DatasetSpec:
    from pydantic import ValidationError

    if isinstance(data, DatasetSpec):
        return data if max_samples is None else data.model_copy(update={"maxSamples": max_samples})
    try:
        return DatasetSpec(path=data, format=format, split=split, maxSamples=max_samples)
    except ValidationError as exc:
        raise SpecError(field, f"invalid dataset settings ({exc.errors(include_url=False)[0]['msg']}).") from None


def load_rows(data: str | DatasetSpec, *, format: str = "auto", max_samples: int | None = None,
              storage: StorageSpec | None = None, field: str = "--data"):
    """The dataset in the training pipeline's internal form (messages / tools / text)."""
    from kubetune.trainer.train.data.loader import load_source

    source_spec = dataset_spec(data, format=format, max_samples=max_samples, field=field)
    return aligned_rows(load_source(source_spec, field=field, storage=storage), source_spec, field)


def aligned_rows(source: Any, source_spec: DatasetSpec, field: str):
    """A loaded source's rows aligned to the internal form, without datasets' progress bars."""
    import datasets

    from kubetune.trainer.train.data.aligners import align_source

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        rows, _ = align_source(source, source_spec, field=field)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return rows


def load_examples(data: str | DatasetSpec, *, format: str = "auto", max_samples: int | None = None,
                  storage: StorageSpec | None = None, field: str = "--data") -> list[Example]:
    """Read a dataset into prompts (+ references) with the training pipeline's loader/aligners;
    image-text rows (sharegpt `images`, LLaVA/LMFlow `image`) keep their pictures."""
    from kubetune.trainer.train.data.loader import load_source
    from kubetune.trainer.train.data.vision import has_images

    path = data.path if isinstance(data, DatasetSpec) else data
    source_spec = dataset_spec(data, format=format, max_samples=max_samples, field=field)
    source = load_source(source_spec, field=field, storage=storage)
    if format in ("auto", "sharegpt") and has_images(source.columns):
        return image_examples(source, source_spec, field, storage or StorageSpec())
    examples: list[Example] = []
    for row in aligned_rows(source, source_spec, field):
        messages = row["messages"]
        if messages:
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            reference = None
            if messages[-1]["role"] == "assistant":
                reference = messages[-1]["content"]
                messages = messages[:-1]
            if not messages:
                continue
            examples.append(Example(messages=messages, reference=reference, tools=row.get("tools")))
        elif row["text"] is not None:
            examples.append(Example(text=row["text"]))
    if not examples:
        raise SpecError(field, f"{path!r} holds no usable prompts.", "check the file and --format.")
    return examples


def image_examples(source: Any, source_spec: DatasetSpec, field: str, storage: StorageSpec) -> list[Example]:
    """The examples of an image-text dataset, answers held back as references."""
    from kubetune.trainer.api.spec import VisionSpec
    from kubetune.trainer.train.data.vision import image_rows

    examples = []
    for row in image_rows(source, source_spec, field, storage, VisionSpec()):
        messages = row["messages"]
        reference = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        examples.append(Example(messages=messages[:-1] if reference is not None else messages, reference=reference,
                                images=row["images"]))
    return examples


def encode_example(engine: Any, example: Example, model: str | None = None) -> list[int]:
    return encode_example_media(engine, example, model)[0]


def encode_example_media(engine: Any, example: Example, model: str | None = None) -> tuple[list[int], dict | None]:
    """The example's prompt ids and, for an image-text example, its pictures (`Sequence.media`)."""
    if example.images:
        from kubetune.trainer.train.data.vision import PLACEHOLDER, image_text, open_image

        # As in training: the image token inside the model's own markers (Qwen2-VL's vision start/end).
        processor = getattr(engine, "processor", None)
        token = image_text(processor) if processor is not None else engine.image_token or PLACEHOLDER
        messages = [{**m, "content": m["content"].replace(PLACEHOLDER, token)} for m in example.messages or []]
        return engine.encode_chat_images(messages, [open_image(p) for p in example.images], model)
    return encode_plain(engine, example, model), None


def encode_plain(engine: Any, example: Example, model: str | None = None) -> list[int]:
    if example.is_chat:
        tools = json.loads(example.tools) if example.tools else None
        return engine.encode_chat(example.messages, model, tools=tools)
    return engine.encode_text(example.text or "")


def generate_examples(engine: Any, examples: list[Example], params: SamplingParams, *, model: str | None = None,
                      batch_size: int = 8, progress: bool = False, on_batch: Any = None) -> list[Sequence]:
    """Generate for every example in batches; a prompt that does not fit the context is an error."""
    from tqdm.auto import tqdm

    params = params.validate()
    adapter = engine.adapter_for(model)
    done: list[Sequence] = []
    bar = tqdm(total=len(examples), desc="Generating", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(examples), batch_size):
            batch = []
            for i, example in enumerate(examples[start:start + batch_size], start=start):
                ids, media = encode_example_media(engine, example, model)
                try:
                    engine.check_length(len(ids), params, "prompt")
                except SpecError as exc:
                    raise SpecError(f"example {i}", exc.problem, "raise the model's context (--max-model-len with RoPE "
                                    "scaling), lower --max-tokens, or drop long examples.") from None
                batch.append(Sequence(prompt_ids=ids, params=params, adapter=adapter, lstrip=example.is_chat, tag=i, media=media))
            engine.run(batch)
            done += batch
            if on_batch is not None:
                on_batch(batch)
            bar.update(len(batch))
    finally:
        bar.close()
    return done


def generate_file(engine: Any, data: str, out: str, params: SamplingParams, *, format: str = "auto",
                  model: str | None = None, batch_size: int = 8, max_samples: int | None = None,
                  storage: StorageSpec | None = None, progress: bool = True) -> int:
    """`kubetune generate`: write one JSON line per example to a file or `s3://` object; returns
    the number written. `model` None generates with what the engine was loaded from (a LoRA output
    directory: its adapter)."""
    from kubetune.trainer.serve.output import open_output

    examples = load_examples(data, format=format, max_samples=max_samples, storage=storage)
    served = model or engine.default_model
    with open_output(out, storage) as handle:
        def write(batch: list[Sequence]) -> None:
            for seq in batch:
                example = examples[seq.tag]
                record = {"index": seq.tag, "model": served, "prompt": example.prompt_record(), "output": seq.text,
                          "finish_reason": seq.finish_reason, "prompt_tokens": len(seq.prompt_ids),
                          "completion_tokens": len(seq.token_ids)}
                if example.reference is not None:
                    record["reference"] = example.reference
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()

        generate_examples(engine, examples, params, model=served, batch_size=batch_size, progress=progress, on_batch=write)
    return len(examples)

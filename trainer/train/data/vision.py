"""Image-text conversations for vision-language SFT and DPO: rows, pictures, token rows, batches.

Two source forms, both aligned to (messages, image locations):

- sharegpt / LlamaFactory: `messages` (or `conversations`) whose turns hold `<image>`
  placeholders, and an `images` list, one entry per placeholder in order;
- LMFlow's image-text form (its multimodal dataset reads LLaVA's JSON): `image` (one picture) and
  `conversations` with `from`/`value` turns, the first holding `<image>`.

An image location is `s3://...` (downloaded once into the cache by the storage layer) or a path
relative to the dataset file's directory, joined by `safe_join` (the storage layer's one checked
join: no `..`, no absolute path leaves the dataset's directory). A row with images but no
placeholder gets them before its first user turn, as LlamaFactory does.

Token rows are rendered with the tokenizer's chat template exactly as text SFT renders them
(`ChatRenderer`), each `<image>` replaced by the processor's image token (inside the model's
vision start/end markers where it has them: Qwen2-VL); every text piece is then
encoded by the model's own processor, which expands an image token into as many tokens as the
vision encoder yields features. Labels are -100 everywhere but the assistant's answers: prompt,
template and image tokens are never trained on. Pixels are computed per batch by the collator
(`VisionCollator`) from the stored paths, so the token cache holds no tensors.

Preference pairs about pictures (`stage: dpo`, LlamaFactory's multimodal preference form: a prompt
under `conversations`/`messages` with `<image>`, `chosen`, `rejected`, `images`) are read by the
text preference format's aligner plus the image rules above (`preference_row`), split into prompt
and answers as text DPO splits them, and batched by `VisionPreferenceCollator` in the layout of
TRL's vision DPO collator.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import DatasetSpec, StorageSpec, TrainingSpec, VisionSpec
from kubetune.trainer.api.uri import is_s3, safe_join
from kubetune.trainer.train.data.aligners import SHAREGPT_ROLES, InvalidRow, _text
from kubetune.trainer.train.data.pipeline import DataBundle, log_data_summary
from kubetune.trainer.train.data.processors import IGNORE_INDEX, ChatRenderer

log = logging.getLogger(__name__)

PLACEHOLDER = "<image>"
"""The image placeholder in dataset text (LlamaFactory's and LLaVA's)."""
IMAGE_WRAPPERS = {"<|image_pad|>": ("<|vision_start|>", "<|vision_end|>")}
"""Tokens around a picture's tokens, by image token: the Qwen2-VL family marks where each picture
starts and ends, as its own chat template and LlamaFactory's qwen2_vl plugin write it."""


def image_token(processor: Any) -> str:
    """The token the processor expands into one picture's feature tokens."""
    return getattr(processor, "image_token", None) or PLACEHOLDER


def image_text(processor: Any) -> str:
    """What replaces one `<image>` placeholder in the rendered text: the image token, inside the
    start and end markers of a model family that has them (when its tokenizer knows them)."""
    token = image_token(processor)
    start, end = IMAGE_WRAPPERS.get(token, ("", ""))
    tokenizer = processor.tokenizer
    known = [tokenizer.convert_tokens_to_ids(marker) for marker in (start, end)] if start else [None]
    return f"{start}{token}{end}" if None not in known and tokenizer.unk_token_id not in known else token


def with_image_text(processor: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with every `<image>` placeholder replaced by the model's `image_text`."""
    text = image_text(processor)
    return [{**m, "content": m["content"].replace(PLACEHOLDER, text)} for m in messages]


def token_types(processor: Any, input_ids: Any) -> dict[str, Any]:
    """`mm_token_type_ids` (0 text, 1 image) for a processor whose model needs them (Qwen2-VL's
    multimodal RoPE places image tokens by them, and refuses pixels without them); {} otherwise."""
    if "mm_token_type_ids" not in getattr(processor, "model_input_names", ()):
        return {}
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token(processor))
    return {"mm_token_type_ids": (input_ids == image_id).int()}


def align_row(row: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """(messages, image locations) of one row in either form; InvalidRow when it fits neither."""
    turns = row.get("messages") or row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise InvalidRow("needs `messages` (or `conversations`): a non-empty list of turns")
    messages = []
    for turn in turns:
        speaker = turn.get("role") if turn.get("role") is not None else turn.get("from")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise InvalidRow(f"unknown speaker {speaker!r}")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        messages.append({"role": role, "content": _text(content)})
    images = image_locations(row)
    return place_images(messages, images), images


def image_locations(row: dict[str, Any]) -> list[str]:
    """The row's `images` list (or LLaVA's single `image`), checked to be locations."""
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    images = [images] if isinstance(images, str) else list(images or [])
    if not all(isinstance(image, str) and image for image in images):
        raise InvalidRow("`images` must list image locations (paths or s3:// URIs)")
    return images


def place_images(messages: list[dict[str, str]], images: list[str]) -> list[dict[str, str]]:
    """The messages with one placeholder per image: those without any get them before the first
    user turn (LlamaFactory's rule); a count that differs from the images' is an InvalidRow."""
    placeholders = sum(m["content"].count(PLACEHOLDER) for m in messages)
    if images and placeholders == 0:
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
        messages = [*messages[:first], {**messages[first], "content": PLACEHOLDER * len(images) + messages[first]["content"]},
                    *messages[first + 1:]]
    elif placeholders != len(images):
        raise InvalidRow(f"{placeholders} {PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
    return messages


def conversation_row(row: dict[str, Any]) -> dict[str, Any]:
    """`align_row` as the {messages, images} row SFT tokenizes."""
    messages, images = align_row(row)
    return {"messages": messages, "images": images}


def preference_row(row: dict[str, Any]) -> dict[str, Any]:
    """{prompt, chosen, rejected, images} of a preference pair about pictures: the text preference
    format's reading (`PreferenceAligner`: a prompt string or turns under `conversations`,
    `messages`, `prompt`...; answers as strings or turns), the pictures as `align_row` reads them.
    The placeholders belong in the prompt: both answers are about the same pictures."""
    from kubetune.trainer.train.data.aligners import PreferenceAligner

    aligner = PreferenceAligner()
    cols = {role: next((name for name in names if name in row), None) for role, names in aligner.defaults.items()}
    missing = [role for role in aligner.required if cols[role] is None]
    if missing:
        raise InvalidRow(f"a preference pair needs {', '.join(missing)}")
    pair = aligner.align_row(row, cols)
    if any(PLACEHOLDER in turn["content"] for turn in pair["chosen"] + pair["rejected"]):
        raise InvalidRow(f"{PLACEHOLDER} belongs in the prompt, not in `chosen` or `rejected`")
    images = image_locations(row)
    return {"prompt": place_images(pair["prompt"], images), "chosen": pair["chosen"], "rejected": pair["rejected"],
            "tools": pair["tools"], "images": images}


def resolve_image(location: str, root: Path, storage: StorageSpec, *, field: str, max_mb: float) -> Path:
    """The local file of an image: an `s3://` object through the cache, or a path below the
    dataset's directory (the checked join); refused when missing or larger than `max_mb`."""
    if is_s3(location):
        from kubetune.trainer.artifacts import localize

        path = localize(location, storage, field=field)
    else:
        path = safe_join(root, location, location=location, field=field)
    if not path.is_file():
        raise SpecError(field, f"image {location!r} does not exist (looked for {path}).",
                        "image paths are relative to the dataset file's directory, or s3:// URIs.")
    if path.stat().st_size > max_mb * 1024 * 1024:
        raise SpecError(field, f"image {location!r} is {path.stat().st_size / 2**20:.1f} MB, over vision.maxImageMb ({max_mb}).",
                        "shrink the picture or raise vision.maxImageMb.")
    return path


def open_image(path: str | Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def dataset_root(source: DatasetSpec, storage: StorageSpec, field: str) -> Path:
    """The directory relative image paths start from: the dataset file's (or directory's)."""
    from kubetune.trainer.artifacts import localize

    local = localize(source.path, storage, field=f"{field}.path")
    return local if local.is_dir() else local.parent


ROW_FORMS = {
    conversation_row: ("an image-text conversation", "use messages + images (sharegpt) or image + conversations (LLaVA/LMFlow)."),
    preference_row: ("an image-text preference pair", "use conversations (or messages) with <image> + chosen + rejected + images "
                     "(LlamaFactory's multimodal preference form)."),
}
"""What each row reader reads, and the fix its error suggests."""


def load_rows(spec: TrainingSpec, sources: list[DatasetSpec], prefix: str, align: Callable = conversation_row) -> list[dict[str, Any]]:
    """Every source's rows as `align` reads them (conversations, or preference pairs with `preference_row`),
    their images as local paths; a bad row is an error naming it."""
    return load_image_rows(sources, prefix, spec.storage, spec.vision, align)


def load_image_rows(sources: list[DatasetSpec], prefix: str, storage: StorageSpec, limits: VisionSpec,
                    align: Callable = conversation_row) -> list[dict[str, Any]]:
    """`load_rows` for any caller: the storage settings and the `vision` limits given."""
    from kubetune.trainer.train.data.loader import load_source

    rows: list[dict[str, Any]] = []
    for index, source in enumerate(sources):
        field = f"{prefix}[{index}]"
        rows += image_rows(load_source(source, field=field, storage=storage), source, field, storage, limits, align)
    return rows


def image_rows(loaded: Any, source: DatasetSpec, field: str, storage: StorageSpec, limits: VisionSpec,
               align: Callable = conversation_row) -> list[dict[str, Any]]:
    """One loaded source's rows as `align` reads them, images as local paths; a bad row is an error naming it."""
    root = dataset_root(source, storage, field)
    what, fix = ROW_FORMS[align]
    rows = []
    for number, row in enumerate(loaded.dataset):
        try:
            aligned = align(row)
        except InvalidRow as exc:
            raise SpecError(field, f"row {number} is not {what}: {exc}.", fix) from None
        images = aligned["images"]
        if len(images) > limits.maxImages:
            raise SpecError(field, f"row {number} has {len(images)} images, over vision.maxImages ({limits.maxImages}).",
                            "split the conversation or raise vision.maxImages.")
        paths = [str(resolve_image(image, root, storage, field=f"{field} row {number}", max_mb=limits.maxImageMb))
                 for image in images]
        rows.append({**aligned, "images": paths})
    return rows


def has_images(columns: list[str]) -> bool:
    """Whether rows with these columns carry pictures (`images`, or LLaVA's `image`)."""
    return "images" in columns or "image" in columns


def encode_row(processor: Any, renderer: ChatRenderer, row: dict[str, Any], max_length: int) -> dict[str, Any] | None:
    """input_ids and labels of one conversation (answers trained, everything else -100) and the
    text pieces for the log; None when no answer token is left within `max_length`."""
    token = image_token(processor)
    messages = with_image_text(processor, row["messages"])
    full, spans = renderer.spans(messages, None)
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [(full[cursor:start], False), (full[start:end], True)]
        cursor = max(cursor, end)
    pieces.append((full[cursor:], False))
    images = [open_image(path) for path in row["images"]]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        if not text:
            continue
        count = text.count(token)
        kwargs = {"images": images[:count]} if count else {}
        images = images[count:]
        encoded = processor(text=[text], add_special_tokens=False, **kwargs)["input_ids"][0]
        encoded = encoded.tolist() if hasattr(encoded, "tolist") else list(encoded)
        ids += encoded
        labels += encoded if trained else [IGNORE_INDEX] * len(encoded)
    if len(ids) > max_length:
        # The model needs every image's tokens: a cut through (or before) one drops the row.
        image_id = processor.tokenizer.convert_tokens_to_ids(token)
        if image_id in ids[max_length:]:
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels, "images": row["images"],
            "segments": [{"text": text, "trained": trained} for text, trained in pieces if text]}


def tokenize(processor: Any, rows: list[dict[str, Any]], spec: TrainingSpec) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Token rows of `rows` (dropped: those with nothing to train on) and their statistics."""
    renderer = ChatRenderer(processor.tokenizer)
    encoded = [e for e in (encode_row(processor, renderer, row, spec.data.maxLength) for row in rows) if e is not None]
    tokens = sum(len(e["input_ids"]) for e in encoded)
    masked = sum(sum(label == IGNORE_INDEX for label in e["labels"]) for e in encoded)
    stats: dict[str, Any] = {"examples": len(encoded), "dropped": len(rows) - len(encoded), "tokens": tokens,
                             "images": sum(len(e["images"]) for e in encoded),
                             "meanLength": tokens / max(len(encoded), 1), "maskedFraction": masked / max(tokens, 1)}
    if encoded:
        stats["firstExample"] = encoded[0]["segments"]
    table = {name: [e[name] for e in encoded] for name in ("input_ids", "labels", "images")}
    return datasets.Dataset.from_dict(table), stats


def encode_pair(processor: Any, renderer: ChatRenderer, row: dict[str, Any], max_length: int) -> dict[str, Any] | None:
    """prompt_ids (the pictures' tokens expanded by the processor), chosen_ids and rejected_ids of
    one pair, split as text DPO splits them (`split_prompt`: the prompt as inference renders it);
    answers cut to fit `max_length`. None when the pair has nothing to compare: identical or empty
    answers, or a prompt that leaves no room (its image tokens cannot be cut)."""
    from kubetune.trainer.train.data.processors import split_prompt

    prompt = with_image_text(processor, row["prompt"])
    tools = renderer.parse_tools(row.get("tools"))
    try:
        prompt_text, chosen_text = split_prompt(renderer, prompt, row["chosen"], tools)
        _, rejected_text = split_prompt(renderer, prompt, row["rejected"], tools)
    except Exception:  # the template rejects this conversation: dropped and counted, as text pairs are
        return None
    if not chosen_text.strip() or not rejected_text.strip() or chosen_text == rejected_text:
        return None
    images = [open_image(path) for path in row["images"]]
    encoded = processor(text=[prompt_text], add_special_tokens=False, **({"images": images} if images else {}))["input_ids"][0]
    prompt_ids = encoded.tolist() if hasattr(encoded, "tolist") else list(encoded)
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    chosen_ids, rejected_ids = (ids[:room] for ids in processor.tokenizer([chosen_text, rejected_text], add_special_tokens=False)["input_ids"])
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "images": row["images"],
            "segments": [{"text": prompt_text, "trained": False}, {"text": chosen_text, "trained": True}]}


def tokenize_pairs(processor: Any, rows: list[dict[str, Any]], spec: TrainingSpec) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Token pairs of `rows` (dropped: those with nothing to compare) and their statistics."""
    renderer = ChatRenderer(processor.tokenizer)
    encoded = [e for e in (encode_pair(processor, renderer, row, spec.data.maxLength) for row in rows) if e is not None]
    # Each pair is two rows (prompt + chosen, prompt + rejected); the prompts are not scored.
    masked = sum(2 * len(e["prompt_ids"]) for e in encoded)
    tokens = masked + sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in encoded)
    stats: dict[str, Any] = {"examples": len(encoded), "dropped": len(rows) - len(encoded), "tokens": tokens,
                             "images": sum(len(e["images"]) for e in encoded), "meanLength": tokens / max(2 * len(encoded), 1),
                             "maskedFraction": masked / max(tokens, 1)}
    if encoded:
        stats["firstExample"] = encoded[0]["segments"]
    table = {name: [e[name] for e in encoded] for name in ("prompt_ids", "chosen_ids", "rejected_ids", "images")}
    return datasets.Dataset.from_dict(table), stats


def build_vision_datasets(spec: TrainingSpec, processor: Any) -> DataBundle:
    """Training (and held-out) token rows of the spec's image-text datasets: conversations, or
    preference pairs for `dpo`. The held-out split is `data.evalDatasets`, else a seeded
    `data.evalSize` share of the training rows."""
    from kubetune.trainer.train.data.templates import apply_template, current_template

    apply_template(processor.tokenizer, spec.data.template)
    if current_template(processor.tokenizer) is None:
        raise SpecError("data.template", "the model's tokenizer has no chat template.", "set data.template (see `kubetune templates`).")
    align, encode = (preference_row, tokenize_pairs) if spec.stage == "dpo" else (conversation_row, tokenize)
    train_rows = load_rows(spec, spec.data.datasets, "data.datasets", align)
    eval_rows = load_rows(spec, spec.data.evalDatasets, "data.evalDatasets", align) if spec.data.evalDatasets else []
    rng = random.Random(spec.train.seed)
    if not eval_rows and spec.data.evalSize > 0:
        rng.shuffle(train_rows)
        size = spec.data.evalSize
        count = min(len(train_rows) - 1, int(size) if size >= 1 else max(1, round(size * len(train_rows))))
        eval_rows, train_rows = train_rows[:count], train_rows[count:]
    if spec.data.shuffle:
        rng.shuffle(train_rows)
    train, train_stats = encode(processor, train_rows, spec)
    if len(train) == 0:
        raise SpecError("data.datasets", "no training example is left after tokenization.", "check the data and data.maxLength.")
    stats: dict[str, Any] = {"template": "tokenizer", "templateReason": "the model's own chat template, images by its processor",
                             "stage": spec.stage, "packing": False, "train": train_stats}
    eval_ds = None
    if eval_rows:
        eval_ds, stats["eval"] = encode(processor, eval_rows, spec)
    log_data_summary(stats)
    return DataBundle(train=train, eval=eval_ds, stats=stats)


class VisionCollator:
    """Right-padded token rows with an attention mask, plus the pictures as the processor's image
    tensors (`pixel_values`, and `image_grid_thw` and the like for models that have them), in row
    order: the model replaces the image tokens with their features in that order."""

    def __init__(self, processor: Any):
        tokenizer = processor.tokenizer
        self.processor = processor
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask, images = [], [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
            images += list(f.get("images") or [])
        batch: dict[str, Any] = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}
        batch.update(image_inputs(self.processor, images))
        batch.update(token_types(self.processor, batch["input_ids"]))
        return batch


def image_inputs(processor: Any, images: list[Any]) -> dict[str, Any]:
    """The image processor's tensors for pictures (local paths or PIL images), in order; {} for none."""
    if not images:
        return {}
    pictures = [open_image(image) if isinstance(image, str | Path) else image for image in images]
    return dict(processor.image_processor(pictures, return_tensors="pt"))


class VisionPreferenceCollator:
    """Preference pairs with their pictures, as TRL's `DataCollatorForVisionPreference` lays them
    out for `DPOTrainer`: the chosen rows, then the rejected rows (prompt + answer, right-padded),
    `completion_mask` on the answers, and the pictures twice (once per half), in row order.
    The prompt tokens are kubetune's (`encode_pair`: the run's template, pictures where their
    placeholders are) instead of TRL's re-rendering of each batch."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.pad = VisionCollator(processor).pad

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [(list(f["prompt_ids"]), list(f[answer])) for answer in ("chosen_ids", "rejected_ids") for f in features]
        width = max(len(prompt) + len(answer) for prompt, answer in rows)
        ids, mask, completion = [], [], []
        for prompt, answer in rows:
            pad = width - len(prompt) - len(answer)
            ids.append(prompt + answer + [self.pad] * pad)
            mask.append([1] * (len(prompt) + len(answer)) + [0] * pad)
            completion.append([0] * len(prompt) + [1] * len(answer) + [0] * pad)
        images = [image for f in features for image in f.get("images") or []]
        batch: dict[str, Any] = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                                 "completion_mask": torch.tensor(completion)}
        batch.update(image_inputs(self.processor, images * 2))
        batch.update(token_types(self.processor, batch["input_ids"]))
        return batch

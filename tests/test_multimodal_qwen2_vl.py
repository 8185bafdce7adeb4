"""Qwen2-VL-style vision-language models (#22 item 1), the family LlamaFactory fine-tunes most:
`builtin:tiny-qwen2-vl` (Qwen2-VL's architecture: its vision encoder and merger, multimodal RoPE)
trains on the same image-text rows as LLaVA. Each picture is written as Qwen2-VL writes it
(`<|vision_start|><|image_pad|>...<|vision_end|>`, the pad expanded by the processor into one token
per merged patch), and every batch carries `mm_token_type_ids`, without which Qwen2-VL's forward
refuses pixels (its 3-D positions are computed from them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.trainer.api.spec import TrainingSpec

from .conftest import EXAMPLES

SHAPES = EXAMPLES / "data" / "shapes"
IMAGE_TOKENS = 16  # 64x64 pixels in 8x8 patches, merged 2x2


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(_isolated_cache: Path) -> Path:
    from kubetune.trainer.train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-qwen2-vl")


def spec_for(tmp_path: Path, rows: int | None = 8, **changes) -> TrainingSpec:
    limit = {"maxSamples": rows} if rows else {}
    doc = {"model": {"path": "builtin:tiny-qwen2-vl"},
           "data": {"datasets": [{"path": str(SHAPES / "train.json"), **limit}],
                    "evalDatasets": [{"path": str(SHAPES / "eval.json"), "maxSamples": 4}], "maxLength": 64},
           "output": {"path": str(tmp_path / "out")}, **changes}
    return TrainingSpec.model_validate(doc)


def test_the_builtin_is_a_qwen2_vl_and_the_estimate_counts_its_tower_and_merger(tiny_qwen2_vl_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kubetune.trainer.api.estimate import shape_for_path

    config = json.loads((tiny_qwen2_vl_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and "vision_config" in config
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl_dir)
    assert processor.image_token == "<|image_pad|>" and "mm_token_type_ids" in processor.model_input_names
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl_dir)
    params = dict(model.named_parameters())
    tower = sum(p.numel() for name, p in params.items() if ".visual." in f".{name}" and ".merger." not in name)
    merger = sum(p.numel() for name, p in params.items() if ".merger." in name)
    shape = shape_for_path("builtin:tiny-qwen2-vl")
    assert abs(shape.vision_params - tower) / tower < 0.05, (shape.vision_params, tower)
    assert abs(shape.projector_params - merger) / merger < 0.05, (shape.projector_params, merger)


def test_rows_wrap_each_picture_in_vision_markers_and_batches_carry_token_types(tiny_qwen2_vl_dir, tmp_path):
    """The shapes rows: the picture's 16 pad tokens sit between the start and end markers, none of
    them labelled; the collator adds pixels, grids and token types (1 exactly on the pad tokens),
    and Qwen2-VL's forward takes the batch and gives a finite loss that falls when trained on."""
    import torch

    from kubetune.trainer.train.data.vision import VisionCollator, build_vision_datasets
    from kubetune.trainer.train.models.vision import load_processor

    spec = spec_for(tmp_path, rows=4)
    processor = load_processor(spec)
    bundle = build_vision_datasets(spec, processor)
    tokenizer = processor.tokenizer
    start, end, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
    row = bundle.train[0]
    ids, labels = row["input_ids"], row["labels"]
    first = ids.index(start)
    assert ids[first + 1:first + 1 + IMAGE_TOKENS] == [pad] * IMAGE_TOKENS and ids[first + 1 + IMAGE_TOKENS] == end
    assert all(label == -100 for label in labels[:first + IMAGE_TOKENS + 2]) and any(label != -100 for label in labels)
    batch = VisionCollator(processor)([bundle.train[i] for i in range(4)])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 4
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == pad).int())
    assert int(batch["mm_token_type_ids"].sum()) == 4 * IMAGE_TOKENS
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_image_text_is_the_bare_token_where_a_family_has_no_markers(_isolated_cache):
    from transformers import AutoProcessor

    from kubetune.trainer.train.data.vision import image_text, token_types
    from kubetune.trainer.train.models.builtin import resolve_builtin

    llava = AutoProcessor.from_pretrained(resolve_builtin("builtin:tiny-llava"))
    assert image_text(llava) == "<image>"
    import torch

    assert token_types(llava, torch.zeros(1, 3, dtype=torch.long)) == {}


@pytest.mark.slow
def test_qwen2_vl_learns_to_answer_from_the_picture(tiny_qwen2_vl_dir, tmp_path):
    """examples/multimodal.yaml's recipe on the Qwen2-VL builtin: the held-out exact match (greedy
    answers generated with the pictures and their token types) rises far above the random base's
    0 and above guessing; the adapter is saved beside Qwen2-VL's processor."""
    import yaml

    from kubetune.trainer.train.runner import run

    doc = yaml.safe_load((EXAMPLES / "multimodal.yaml").read_text())
    doc["model"]["path"] = "builtin:tiny-qwen2-vl"
    doc["output"]["path"] = str(tmp_path / "out")
    doc["train"]["epochs"] = 4
    doc["data"]["datasets"][0]["path"] = str(SHAPES / "train.json")
    doc["data"]["evalDatasets"][0]["path"] = str(SHAPES / "eval.json")
    result = run(TrainingSpec.model_validate(doc))
    heldout = json.loads((tmp_path / "out" / "status.json").read_text())["heldout"]
    assert result.global_step > 0 and heldout["learned"]
    assert heldout["exact_match"] > 50, heldout
    assert json.loads((tmp_path / "out" / "processor_config.json").read_text())["image_processor"]["merge_size"] == 2

"""DPO on images (#22 item 1): preference pairs about pictures in LlamaFactory's multimodal form,
their token rows and batches, the stages that stay refused on images, a LoRA run with the vision
tower frozen and the adapters disabled as the reference, and a run on the shapes pairs whose
held-out reward margin and accuracy rise, checked again from the saved adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec

from .conftest import EXAMPLES

SHAPES = EXAMPLES / "data" / "shapes"


@pytest.fixture(scope="session")
def tiny_llava_dir(_isolated_cache: Path) -> Path:
    from kubetune.trainer.train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-llava")


def dpo_spec(tmp_path: Path, pairs: int | None = 8, held_out: int | None = 4, **changes) -> TrainingSpec:
    def source(name: str, count: int | None) -> dict:
        return {"path": str(SHAPES / name), **({"maxSamples": count} if count else {})}

    doc = {"stage": "dpo", "model": {"path": "builtin:tiny-llava"},
           "data": {"datasets": [source("preferences.json", pairs)], "evalDatasets": [source("preferences_eval.json", held_out)],
                    "maxLength": 64},
           "output": {"path": str(tmp_path / "out")}}
    for key, value in changes.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainingSpec.model_validate(doc)


def eval_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_rewards/margins" in r]


# --- data -------------------------------------------------------------------------------------

def test_preference_pairs_about_pictures_in_both_forms():
    from kubetune.trainer.train.data.aligners import InvalidRow
    from kubetune.trainer.train.data.vision import preference_row

    sharegpt = {"conversations": [{"from": "human", "value": "<image>\nWhat colour?"}], "chosen": {"from": "gpt", "value": "red"},
                "rejected": {"from": "gpt", "value": "blue"}, "images": ["a.png"]}
    messages = {"messages": [{"role": "user", "content": "What colour?"}], "chosen": "red", "rejected": "blue", "images": "a.png"}
    for row in (sharegpt, messages):
        pair = preference_row(row)
        assert pair["prompt"] == [{"role": "user", "content": "<image>\nWhat colour?" if row is sharegpt else "<image>What colour?"}]
        assert (pair["chosen"], pair["rejected"], pair["images"]) == ([{"role": "assistant", "content": "red"}],
                                                                      [{"role": "assistant", "content": "blue"}], ["a.png"])
    for bad, match in (({**messages, "rejected": "<image> blue"}, "belongs in the prompt"),
                       ({**sharegpt, "images": ["a.png", "b.png"]}, "1 <image> placeholder"),
                       ({k: v for k, v in messages.items() if k != "rejected"}, "needs rejected")):
        with pytest.raises(InvalidRow, match=match):
            preference_row(bad)


def test_pairs_keep_their_pictures_in_the_prompt_and_batch_as_trl_lays_them_out(tiny_llava_dir, tmp_path):
    from kubetune.trainer.train.data.vision import VisionPreferenceCollator, build_vision_datasets
    from kubetune.trainer.train.models.vision import load_processor

    spec = dpo_spec(tmp_path, data={"shuffle": False})
    processor = load_processor(spec)
    data = build_vision_datasets(spec, processor)
    assert (len(data.train), len(data.eval)) == (8, 4) and data.stats["train"]["images"] == 8
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    rows = json.loads((SHAPES / "preferences.json").read_text())
    for row, pair in zip(rows, data.train, strict=False):
        assert pair["prompt_ids"].count(image_id) == 16  # 32x32 picture, 8x8 patches
        assert image_id not in pair["chosen_ids"] + pair["rejected_ids"]
        for name in ("chosen", "rejected"):
            assert processor.tokenizer.decode(pair[f"{name}_ids"]).strip() == row[name]["value"] + "</s>"
    batch = VisionPreferenceCollator(processor)([data.train[0], data.train[1]])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["completion_mask"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape == (4, 3, 32, 32)
    # chosen rows, then rejected rows: the same prompt and picture, the answer under completion_mask
    assert batch["pixel_values"][0].equal(batch["pixel_values"][2]) and not batch["pixel_values"][0].equal(batch["pixel_values"][1])
    for index, (pair, answer) in enumerate([(0, "chosen_ids"), (1, "chosen_ids"), (0, "rejected_ids"), (1, "rejected_ids")]):
        ids, mask = batch["input_ids"][index], batch["completion_mask"][index].bool()
        assert ids[mask].tolist() == data.train[pair][answer]
        assert ids[: len(data.train[pair]["prompt_ids"])].tolist() == data.train[pair]["prompt_ids"]
    # a conversation without answers to compare is named as a bad preference row
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>?"}], "chosen": "x", "images": ["pic.png"]}]))
    with pytest.raises(SpecError, match="row 0 is not an image-text preference pair: a preference pair needs rejected"):
        build_vision_datasets(dpo_spec(tmp_path, data={"datasets": [{"path": str(bad)}], "evalDatasets": []}), processor)


def test_our_batches_equal_trls_vision_preference_collator_on_the_same_texts(tiny_llava_dir, tmp_path):
    """Given the prompt and answer texts kubetune renders (the model's template, the processor's
    image token), TRL's `DataCollatorForVisionPreference` builds the same batch as
    `VisionPreferenceCollator`: token for token, the masks and the pixels. Only who renders the
    text differs (TRL re-renders conversations with the processor's template every batch)."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from kubetune.trainer.train.data.processors import ChatRenderer, split_prompt
    from kubetune.trainer.train.data.vision import (
        PLACEHOLDER,
        VisionPreferenceCollator,
        build_vision_datasets,
        open_image,
        preference_row,
    )
    from kubetune.trainer.train.models.vision import load_processor

    spec = dpo_spec(tmp_path, pairs=3, data={"shuffle": False})
    processor = load_processor(spec)
    ours = VisionPreferenceCollator(processor)(list(build_vision_datasets(spec, processor).train))
    renderer, examples = ChatRenderer(processor.tokenizer), []
    for row in map(preference_row, json.loads((SHAPES / "preferences.json").read_text())[:3]):
        prompt = [{**m, "content": m["content"].replace(PLACEHOLDER, processor.image_token)} for m in row["prompt"]]
        prompt_text, chosen = split_prompt(renderer, prompt, row["chosen"], None)
        rejected = split_prompt(renderer, prompt, row["rejected"], None)[1]
        examples.append({"prompt": prompt_text, "chosen": chosen, "rejected": rejected,
                         "images": [open_image(SHAPES / image) for image in row["images"]]})
    theirs = DataCollatorForVisionPreference(processor=processor)(examples)
    assert sorted(theirs) == sorted(ours) == ["attention_mask", "completion_mask", "input_ids", "pixel_values"]
    real = ours["attention_mask"].bool()
    assert theirs["attention_mask"].equal(ours["attention_mask"]) and theirs["completion_mask"].equal(ours["completion_mask"])
    assert theirs["input_ids"][real].equal(ours["input_ids"][real]) and theirs["pixel_values"].equal(ours["pixel_values"])


# --- what trains on images ----------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["pt", "rm", "kto", "ppo", "grpo"])
def test_other_stages_on_images_are_refused_naming_the_fix(tmp_path, stage):
    from kubetune.trainer.train.stages import stage_for

    spec = dpo_spec(tmp_path).model_copy(update={"stage": stage})
    with pytest.raises(SpecError, match=f"stage sft or dpo, not {stage}") as refused:
        stage_for(spec).preflight(spec)
    assert refused.value.field == "stage" and "stage: dpo with preference pairs" in refused.value.fix


def test_dpo_on_images_takes_the_losses_with_a_reference_forward(tmp_path):
    from kubetune.trainer.train.stages import stage_for, vision_dpo

    assert stage_for(dpo_spec(tmp_path)) is vision_dpo
    for loss in ("simpo", "orpo"):
        spec = dpo_spec(tmp_path, dpo={"lossType": loss})
        with pytest.raises(SpecError, match=f"lossType {loss} is not trained on images") as refused:
            vision_dpo.preflight(spec)
        assert refused.value.field == "dpo.lossType"
    with pytest.raises(SpecError, match="padded batches"):
        vision_dpo.preflight(dpo_spec(tmp_path, data={"packing": True}))
    assert vision_dpo.preflight(dpo_spec(tmp_path, dpo={"lossType": "ipo"})).stage == "dpo"


@pytest.mark.slow
def test_lora_dpo_on_images_freezes_the_tower_and_uses_the_base_as_reference(tiny_llava_dir, tmp_path):
    """Defaults (LoRA on the language model, tower and projector frozen): at step 0 the policy is
    its reference (adapters disabled), so every held-out reward is exactly 0; the adapter saved
    holds language-model weights only, beside the processor."""
    from safetensors.torch import load_file

    from kubetune.trainer.train.runner import run

    result = run(dpo_spec(tmp_path, train={"epochs": 1, "batchSize": 4}))
    out = tmp_path / "out"
    assert result.global_step == 2 and json.loads((out / "status.json").read_text())["phase"] == "Succeeded"
    start = eval_records(out)[0]
    assert start["step"] == 0 and start["eval_rewards/margins"] == start["eval_rewards/chosen"] == 0.0
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("language_model" in name and "lora_" in name for name in weights)
    assert (out / "processor_config.json").is_file() or (out / "preprocessor_config.json").is_file()


@pytest.mark.slow
def test_full_dpo_on_images_loads_its_reference_as_a_vision_language_model(tiny_llava_dir, tmp_path):
    """`method: full` with `dpo.referenceModel`: the reference loads with the image-text class (its
    forward takes the pixels) and, being the same weights, gives 0 rewards before training; the
    saved model and processor load back as a vision-language model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kubetune.trainer.train.runner import run

    run(dpo_spec(tmp_path, pairs=4, method="full", dpo={"referenceModel": "builtin:tiny-llava"}, train={"batchSize": 4}))
    start = eval_records(tmp_path / "out")[0]
    assert start["step"] == 0 and start["eval_rewards/margins"] == 0.0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and AutoProcessor.from_pretrained(tmp_path / "out").image_token


def heldout_margins(model, processor, pairs) -> list[float]:
    """Each held-out pair's log p(chosen) - log p(rejected) under `model`, with its picture."""
    import torch

    from kubetune.trainer.train.data.vision import VisionPreferenceCollator

    batch = VisionPreferenceCollator(processor)(list(pairs))
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits.float()
    targets = batch["input_ids"][:, 1:]
    logps = logits[:, :-1].log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    chosen, rejected = (logps * batch["completion_mask"][:, 1:]).sum(dim=1).chunk(2)
    return (chosen - rejected).tolist()


@pytest.mark.slow
def test_dpo_on_images_prefers_the_right_answer_about_held_out_pictures(tiny_llava_dir, tmp_path):
    """examples/multimodal-dpo.yaml on the shapes pairs (right vs wrong colour or shape; without the picture the two are equally
    likely): the loss falls, and on the 60 held-out pictures the reward margin and the share of
    pairs preferred rise from 0 and 0.5. The saved adapter, loaded back, prefers the chosen
    answers over the base model by the same measure."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kubetune.trainer.train.data.vision import build_vision_datasets
    from kubetune.trainer.train.runner import run

    doc = yaml.safe_load((EXAMPLES / "multimodal-dpo.yaml").read_text())
    doc["output"]["path"] = str(tmp_path / "out")
    doc["data"]["datasets"][0]["path"] = str(SHAPES / "preferences.json")
    doc["data"]["evalDatasets"][0]["path"] = str(SHAPES / "preferences_eval.json")
    spec = TrainingSpec.model_validate(doc)
    run(spec)
    out = tmp_path / "out"
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    start, end = eval_records(out)[0], eval_records(out)[-1]
    assert losses[-1] < losses[0] - 0.15 and end["eval_loss"] < start["eval_loss"] - 0.1, (losses, start, end)
    assert start["eval_rewards/margins"] == 0.0 and end["eval_rewards/margins"] > 0.5, end
    assert start["eval_rewards/accuracies"] == 0.5 and end["eval_rewards/accuracies"] > 0.6, end

    processor = AutoProcessor.from_pretrained(out)
    pairs = build_vision_datasets(spec, processor).eval
    base = heldout_margins(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval(), processor, pairs)
    policy = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir), out).eval()
    trained = heldout_margins(policy, processor, pairs)
    gains = [t - b for t, b in zip(trained, base, strict=True)]  # beta 1: each pair's DPO reward margin
    assert len(gains) == 60 and sum(gains) / len(gains) > 0.5 and sum(g > 0 for g in gains) / len(gains) > 0.6, gains

"""Merging a vision-language LoRA (#22): `kubetune export`, `output.mergeAdapter` and a pipeline
stage that starts from a LoRA stage's output all merge through `export_merged`, which must load
the base with its image-text class (transformers has no causal-LM class for LLaVA) and keep the
processor, or the merged model serves no picture and the next stage cannot read its images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import EXAMPLES

SHAPES = EXAMPLES / "data" / "shapes"


@pytest.fixture(scope="session")
def tiny_llava_dir(_isolated_cache: Path) -> Path:
    from kubetune.trainer.train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-llava")


def picture_batch(processor):
    from PIL import Image

    image = Image.new("RGB", (32, 32), (220, 30, 30))
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat colour?"}], tokenize=False,
                                                   add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")


def make_adapter(base: Path, out: Path):
    """A LoRA adapter on the language model and the tower, with a trained copy of the projector,
    all away from their initial values (a merge of untouched adapters would prove nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["multi_modal_projector"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    assert any("vision_tower" in name and "lora_A" in name for name, _ in peft_model.named_parameters())
    peft_model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return peft_model.eval()


def test_export_merges_a_vision_lora_and_keeps_its_processor(tiny_llava_dir, tmp_path):
    """The merged model gives the adapted model's logits on a picture, loads as the image-text
    class with its processor, and its tower is saved under the hub's names (what vLLM reads)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kubetune.trainer.train.models.locations import export_merged

    adapted = make_adapter(tiny_llava_dir, tmp_path / "adapter")
    export_merged(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    batch = picture_batch(processor)
    with torch.no_grad():
        expected, got = adapted(**batch).logits, merged(**batch).logits
    assert torch.allclose(expected, got, atol=1e-4), (expected - got).abs().max()
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    with torch.no_grad():
        assert (base(**batch).logits - got).abs().max() > 1e-3  # the merge changed the model
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert any(name.startswith("vision_tower.vision_model.") for name in names)
    assert not any("lora_" in name or "modules_to_save" in name for name in names)


def test_export_names_the_base_that_has_no_config(tiny_llava_dir, tmp_path):
    from kubetune.trainer.api.errors import SpecError
    from kubetune.trainer.train.models.locations import export_merged

    make_adapter(tiny_llava_dir, tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError) as refused:
        export_merged(str(tmp_path / "adapter"), str(tmp_path / "merged"), base=str(tmp_path / "empty"))
    assert refused.value.field == "--base" and "no model config" in str(refused.value)


@pytest.mark.slow
def test_vision_sft_then_dpo_starts_from_the_merged_sft_model(tiny_llava_dir, tmp_path):
    """A two-stage vision pipeline: LoRA SFT with `output.mergeAdapter` writes a merged model with
    its processor; a DPO stage whose model.path is the SFT output trains on pictures from the SFT
    model merged (its reference too: 0 rewards at step 0), and saves its adapter with the processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kubetune.trainer.api.spec import TrainingSpec
    from kubetune.trainer.train.runner import run

    sft = TrainingSpec.model_validate({
        "model": {"path": "builtin:tiny-llava"}, "method": "lora",
        "data": {"datasets": [{"path": str(SHAPES / "train.json"), "maxSamples": 8}], "maxLength": 64},
        "train": {"epochs": 1, "batchSize": 4}, "output": {"path": str(tmp_path / "sft"), "mergeAdapter": True}})
    run(sft)
    merged = tmp_path / "sft" / "merged"
    assert type(AutoModelForImageTextToText.from_pretrained(merged)).__name__ == "LlavaForConditionalGeneration"
    assert AutoProcessor.from_pretrained(merged).image_token
    dpo = TrainingSpec.model_validate({
        "stage": "dpo", "model": {"path": str(tmp_path / "sft")}, "method": "lora",
        "data": {"datasets": [{"path": str(SHAPES / "preferences.json"), "maxSamples": 8}],
                 "evalDatasets": [{"path": str(SHAPES / "preferences_eval.json"), "maxSamples": 4}], "maxLength": 64},
        "train": {"epochs": 1, "batchSize": 4}, "output": {"path": str(tmp_path / "dpo")}})
    result = run(dpo)
    assert result.global_step == 2
    records = [r for r in map(json.loads, (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()) if "eval_rewards/margins" in r]
    assert records[0]["step"] == 0 and records[0]["eval_rewards/margins"] == 0.0
    saved = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    assert "merged" in saved["base_model_name_or_path"]
    assert any((tmp_path / "dpo" / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))

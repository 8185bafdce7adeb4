"""Vision-language weights saved in the hub's layout (#22): transformers 5 saves a CLIP tower built
from a config as `vision_tower.embeddings.*`, which vLLM refuses; kubetune writes
`vision_tower.vision_model.embeddings.*` (the hub's, read by both) for builtin:tiny-llava and for
every full model it saves (`train.models.hub_layout`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

HUB_PREFIX = "vision_tower.vision_model."


@pytest.fixture(scope="module")
def tiny_llava_dir(_isolated_cache: Path) -> Path:
    from kubetune.trainer.train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-llava")


def saved_keys(directory: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys.update(f.keys())
    return keys


def from_scratch(model_dir: Path):
    """A LLaVA built from the tiny one's config: what transformers saves in its own layout."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    torch.manual_seed(3)
    return LlavaForConditionalGeneration(AutoConfig.from_pretrained(model_dir))


def load_checked(directory: Path):
    """transformers loads the directory with no missing or unexpected key."""
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_builtin_tiny_llava_is_saved_in_the_hub_layout(tiny_llava_dir):
    tower = {key for key in saved_keys(tiny_llava_dir) if key.startswith("vision_tower.")}
    assert tower and all(key.startswith(HUB_PREFIX) for key in tower), sorted(tower)[:3]
    assert tiny_llava_dir.name == "tiny-llava-v3"  # a new cache entry: old builds are not reused
    load_checked(tiny_llava_dir)


def test_sharded_weights_are_renamed_to_the_hub_layout_and_load_identically(tiny_llava_dir, tiny_model_dir, tmp_path):
    """Shards and their index are renamed; transformers loads the same weights; a second call
    and a text model change nothing."""
    from kubetune.trainer.train.models.hub_layout import INDEX_FILE, write_hub_layout

    model = from_scratch(tiny_llava_dir)
    model.save_pretrained(tmp_path / "vlm", max_shard_size="300KB")
    index = tmp_path / "vlm" / INDEX_FILE
    assert index.is_file() and not all(k.startswith(HUB_PREFIX) for k in saved_keys(tmp_path / "vlm") if k.startswith("vision_tower."))

    renamed = write_hub_layout(tmp_path / "vlm")
    keys = saved_keys(tmp_path / "vlm")
    tower = {key for key in keys if key.startswith("vision_tower.")}
    assert renamed == len(tower) > 0 and all(key.startswith(HUB_PREFIX) for key in tower)
    weight_map = json.loads(index.read_text())["weight_map"]
    assert set(weight_map) == keys and len(set(weight_map.values())) > 1
    assert same_weights(load_checked(tmp_path / "vlm"), model)
    assert write_hub_layout(tmp_path / "vlm") == 0

    text = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, text)
    before = (text / "model.safetensors").read_bytes()
    assert write_hub_layout(text) == 0 and (text / "model.safetensors").read_bytes() == before


def test_a_full_training_output_is_saved_in_the_hub_layout(tiny_llava_dir, tmp_path):
    """`save_final` (the runner's last save) through transformers' Trainer, for a `method: full`
    run of a model in transformers' own layout: the output is in the hub's and loads identically."""
    from transformers import Trainer, TrainingArguments

    from kubetune.trainer.api.spec import TrainingSpec
    from kubetune.trainer.train.models.vision import load_processor
    from kubetune.trainer.train.runner import save_final

    spec = TrainingSpec.model_validate({"model": {"path": str(tiny_llava_dir)}, "method": "full",
                                        "data": {"datasets": [{"path": "unused.json"}]}, "output": {"path": str(tmp_path / "out")}})
    model = from_scratch(tiny_llava_dir)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none"))
    save_final(trainer, spec, load_processor(spec), tmp_path / "out")
    tower = {key for key in saved_keys(tmp_path / "out") if key.startswith("vision_tower.")}
    assert tower and all(key.startswith(HUB_PREFIX) for key in tower)
    assert (tmp_path / "out" / "processor_config.json").is_file()
    assert same_weights(load_checked(tmp_path / "out"), model)

"""Shared builders for the inference, server and eval tests (cached per test session on disk).

Plain functions with an in-process cache rather than fixtures, so every test module that needs
the trained tiny model or the LoRA adapters gets the same copy without training twice.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import yaml

from .conftest import EXAMPLES

DEMO = EXAMPLES / "data" / "demo_alpaca.json"


def _root() -> Path:
    root = Path(os.environ["KUBETUNE_CACHE"]) / "infer-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.lru_cache(maxsize=1)
def capitals_data() -> Path:
    """A small learnable slice of the demo task (capital cities, three phrasings each)."""
    from kubetune.trainer.train.demo import demo_examples

    rows = [r for r in demo_examples() if "capital" in r["instruction"].lower()][:24]
    path = _root() / "capitals.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


@functools.lru_cache(maxsize=1)
def trained_model() -> Path:
    """The tiny model trained a few dozen steps on `capitals_data()` with kubetune's runner."""
    from kubetune.trainer.api.specfile import validate_training
    from kubetune.trainer.train.runner import run

    out = _root() / "trained"
    if (out / "model.safetensors").is_file():
        return out
    spec = {
        "name": "capitals",
        "model": {"path": "builtin:tiny-llama"},
        "data": {"datasets": [{"path": str(capitals_data()), "format": "alpaca"}], "maxLength": 48},
        "method": "full",
        "train": {"maxSteps": 40, "batchSize": 8, "learningRate": 3e-3, "scheduler": "constant"},
        "checkpoint": {"everySteps": 1000},
        "logging": {"everySteps": 10, "samples": 0},
        "output": {"path": str(out)},
    }
    run(validate_training(spec))
    return out


def build_adapter(name: str, base: Path, *, seed: int, rank: int = 4) -> Path:
    """A LoRA adapter saved like a kubetune LoRA output (adapter + tokenizer + kubetune-spec.yaml),
    with random (non-zero) weights so it visibly changes the base model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _root() / f"adapter-{name}"
    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    spec = {"name": name, "model": {"path": str(base)}, "data": {"datasets": [{"path": str(DEMO)}]}, "method": "lora"}
    (out / "kubetune-spec.yaml").write_text(yaml.safe_dump(spec))
    return out


@functools.lru_cache(maxsize=1)
def foreign_adapter() -> Path:
    """An adapter trained on a different base (hidden size 64): it must not load on tiny-llama."""
    from kubetune.trainer.train.models.builtin import build_tiny_llama

    other = _root() / "other-base"
    if not (other / "config.json").is_file():
        build_tiny_llama(other, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=128)
    return build_adapter("foreign", other, seed=3)

"""Efficient fine-tuning methods: each trains, and each is what it claims to be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.train.runner import run

from .test_train import read_metrics, small_spec

pytestmark = pytest.mark.slow


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def train_spec(tmp_path: Path, method: str, steps: int = 12, lr: float = 1e-2, **blocks):
    spec = small_spec(tmp_path, method=method, train={"maxSteps": steps, "learningRate": lr}, **blocks)
    spec["data"]["evalSize"] = 0
    spec["checkpoint"] = {"everySteps": 1000}
    return validate_training(spec)


def assert_learns(out: Path) -> None:
    values = losses(out)
    assert len(values) >= 4, values
    first, last = sum(values[:2]) / 2, sum(values[-2:]) / 2
    assert last < 0.95 * first, values


class Capture:
    """Wraps a function in a module to record what it was called with and returned."""

    def __init__(self, monkeypatch, module, name):
        self.calls: list = []
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            self.calls.append((args, kwargs, result))
            return result

        monkeypatch.setattr(module, name, wrapper)


def test_qlora_uses_4bit_layers_and_learns(tmp_path, monkeypatch):
    import bitsandbytes as bnb

    from kubetune.trainer.train.models import methods

    seen = Capture(monkeypatch, methods, "apply_lora")
    spec = train_spec(tmp_path, "qlora", lora={"rank": 8})
    result = run(spec)
    model = seen.calls[0][2]
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "no Linear4bit layers"
    assert all(m.weight.quant_type == "nf4" for m in four_bit)
    assert four_bit[0].weight.quant_state.nested  # double quantisation
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert_learns(result.output_dir)


def qlora_gradients(tmp_path: Path, evaluate_first: bool) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """One training step's adapter gradients on the model the runner builds, optionally after a
    no-grad eval-mode forward (the runner's baseline evaluation, a rollout, a sample)."""
    from kubetune.trainer.train.models.loader import load_model
    from kubetune.trainer.train.models.methods import apply_method

    spec = train_spec(tmp_path, "qlora", lora={"rank": 8})
    base = load_model(spec, "fp32")
    torch.manual_seed(0)  # the same adapter initialisation and LoRA dropout masks in both runs
    model = apply_method(base, spec)
    ids = torch.randint(5, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    if evaluate_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, model


def test_qlora_gradients_are_the_same_after_an_eval_pass(tmp_path):
    """#17 item 6: on CPUs with AVX512-BF16 an eval pass used to repack the 4-bit weights into a
    layout whose matmul has no backward, so layer-0 adapter gradients were wrong afterwards."""
    import bitsandbytes as bnb

    plain, _ = qlora_gradients(tmp_path, evaluate_first=False)
    after_eval, model = qlora_gradients(tmp_path, evaluate_first=True)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)
    assert plain.keys() == after_eval.keys()
    first_layer = [n for n in plain if ".layers.0." in n and "lora_B" in n]
    assert first_layer and all(plain[n].abs().sum() > 0 for n in first_layer)  # gradients reach layer 0
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)


def test_dora_adapters_carry_magnitude_vectors(tmp_path):
    from safetensors.torch import load_file

    result = run(train_spec(tmp_path, "lora", lora={"rank": 4, "useDora": True}))
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in name for name in adapter)
    assert json.loads((result.output_dir / "adapter_config.json").read_text())["use_dora"] is True
    assert_learns(result.output_dir)


def test_rslora_and_pissa_are_configured(tmp_path):
    result = run(train_spec(tmp_path, "lora", steps=6, lora={"rank": 4, "useRslora": True, "init": "pissa"}))
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] is True
    assert config["init_lora_weights"] == "pissa"


def test_loraplus_puts_b_matrices_in_a_group_with_scaled_lr(tmp_path, monkeypatch):
    from kubetune.trainer.train.models import methods

    seen = Capture(monkeypatch, methods, "loraplus_optimizer")
    result = run(train_spec(tmp_path, "lora", lr=1e-3, lora={"rank": 4, "loraplusRatio": 16}, steps=16))
    optimizer = seen.calls[0][2]
    model = seen.calls[0][0][0]
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lrs[names[id(p)]] = group.get("initial_lr", group["lr"])  # the scheduler has decayed "lr"
    b_lrs = {lr for n, lr in lrs.items() if "lora_B" in n}
    a_lrs = {lr for n, lr in lrs.items() if "lora_A" in n}
    assert len(b_lrs) == 1 and b_lrs.pop() == pytest.approx(1e-3 * 16)
    assert len(a_lrs) == 1 and a_lrs.pop() == pytest.approx(1e-3)
    assert_learns(result.output_dir)


def test_galore_uses_the_galore_optimizer(tmp_path, monkeypatch):
    from transformers import Trainer

    created = []
    original = Trainer.create_optimizer

    def spy(self, *args, **kwargs):
        optimizer = original(self, *args, **kwargs)
        created.append(optimizer)
        return optimizer

    monkeypatch.setattr(Trainer, "create_optimizer", spy)
    result = run(train_spec(tmp_path, "galore", lr=2e-3, galore={"rank": 4, "updateInterval": 5, "targetModules": ["attn", "mlp"]}))
    optimizer = created[0]
    inner = getattr(optimizer, "optimizer", optimizer)
    assert type(inner).__module__.startswith("galore_torch"), type(inner)
    assert any("rank" in group for group in inner.param_groups)  # the GaLore-projected group
    assert_learns(result.output_dir)


def test_full_with_frozen_embeddings_and_8bit_adamw(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    result = run(train_spec(tmp_path, "full", full={"frozenModules": ["embed_tokens"]}, lr=1e-3))
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(result.output_dir / "model.safetensors"))
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])

    spec = train_spec(tmp_path / "8bit", "lora", lr=5e-3)
    spec = validate_training({**spec.to_document(), "train": {**spec.to_document()["train"], "optimizer": "adamw_8bit"}})
    from kubetune.trainer.train.models.methods import optimizer_settings

    assert optimizer_settings(spec)["optim"] == "adamw_bnb_8bit"
    assert_learns(run(spec).output_dir)
